"""Where xnorcam's resident memory goes: RSS after each step of a start, and by mapping at the end.

    python benchmarks/memory.py [--frames N] [--json]

The steps are those of ``python -m app --source demo --preview none``, in its
order: numba and its runtime first (app.memory.warm_numba), then OpenCV and
the rest, the model, the warm-up (numba's cache, or compiling when it is cold:
set NUMBA_CACHE_DIR to an empty folder to see that), then N demo frames
through the pipeline. At the end the resident memory is split by what maps
it: the shared libraries by package (LLVM, OpenCV, numpy's OpenBLAS, ...)
and the anonymous memory (the Python and C heaps, numba's compiled code, the
frame buffers). The last line is JSON. Linux only (/proc/self/smaps).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


GROUPS = (
    ("llvmlite (LLVM)", re.compile(r"llvmlite")),
    ("numba", re.compile(r"/numba/")),
    ("opencv", re.compile(r"cv2|opencv")),
    ("numpy + OpenBLAS", re.compile(r"numpy|openblas|gfortran|quadmath")),
    ("python + stdlib", re.compile(r"python3|/lib-dynload/|libpython")),
    ("libc, libstdc++, ...", re.compile(r"^/(usr/)?lib")),
)


def by_mapping() -> dict[str, float]:
    """Resident MiB by what maps it, from /proc/self/smaps."""
    out: dict[str, float] = defaultdict(float)
    name = ""
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            name = head[5] if len(head) > 5 else ""
        elif head and head[0] == "Rss:":
            kib = int(head[1])
            if not name or name.startswith("["):
                group = "anonymous (heaps, JIT code, buffers)" if name in ("", "[heap]") else name
            else:
                group = next((g for g, pattern in GROUPS if pattern.search(name)), "other files")
            out[group] += kib / 1024
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=60, help="demo frames through the pipeline (0: none)")
    p.add_argument("--json", action="store_true", help="only the JSON line")
    args = p.parse_args(argv)
    steps: list[tuple[str, float, float, float]] = []

    def step(name: str) -> None:
        steps.append((name, status_kib("VmRSS") / 1024, status_kib("VmHWM") / 1024, time.perf_counter()))

    step("python")
    import numpy  # noqa: F401

    step("import numpy")
    import numba  # noqa: F401

    step("import numba (loads LLVM)")
    from app.memory import warm_numba

    warm_numba()
    step("numba's runtime (NRT compiled, LLVM dropped)")
    import cv2  # noqa: F401

    step("import cv2")
    from app.detector import Detector

    step("import app.detector (kernels declared)")
    detector = Detector()
    step("model loaded")
    detector.warmup()
    step("warm-up (kernels from the cache or compiled)")
    del detector  # the app loads its own
    if args.frames:
        from app.__main__ import main as app_main

        rc = app_main(["--source", "demo", "--preview", "none", "--fps", "0", "--max-frames", str(args.frames)])
        if rc:
            return rc
        step(f"{args.frames} demo frames (the app: its Detector, the pipeline)")
    peak = status_kib("VmHWM") / 1024
    mapping = by_mapping()
    result = {
        "steps_mib": {name: round(rss, 1) for name, rss, _, _ in steps},
        "peak_rss_mib": round(peak, 1),
        "by_mapping_mib": {k: round(v, 1) for k, v in mapping.items() if v >= 0.05},
        "numba_cache_dir": os.environ.get("NUMBA_CACHE_DIR", "(beside the modules)"),
    }
    if not args.json:
        prev, t0 = steps[0][1], steps[0][3]
        print(f"{'step':48s} {'RSS':>7s}      {'change':>7s}  {'peak':>7s}  {'time':>6s}")
        for name, rss, hwm, t in steps:
            print(f"{name:48s} {rss:7.1f} MiB  {rss - prev:+7.1f}  {hwm:7.1f}  {t - t0:6.1f} s")
            prev = rss
        print(f"{'peak':48s} {peak:7.1f} MiB")
        print("resident at the end, by mapping:")
        for group, mib in mapping.items():
            if mib >= 0.05:
                print(f"  {group:46s} {mib:7.1f} MiB")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
