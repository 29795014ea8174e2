"""app.memory: LLVM's clean pages dropped after the warm-up, the kernels unchanged, the app's peak under the floor."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from app import memory

ROOT = Path(__file__).resolve().parents[1]
LINUX = sys.platform.startswith("linux")
# The floor for `python -m app --source demo --preview none` with numba's cache warm.
PEAK_FLOOR_MIB = 140.0  # the floor for a Zero 2 W; 116.5 MiB on the development machine (docs/memory.md)

SMAPS = """\
7f0000000000-7f0000400000 r--p 00000000 fd:01 42 /venv/llvmlite/binding/libllvmlite.so
Rss:                1024 kB
Anonymous:             0 kB
7f0000400000-7f0004000000 r-xp 00400000 fd:01 42 /venv/llvmlite/binding/libllvmlite.so
Rss:               30000 kB
Anonymous:             0 kB
7f0004000000-7f0004200000 r--p 04000000 fd:01 42 /venv/llvmlite/binding/libllvmlite.so
Rss:                2048 kB
Anonymous:          2040 kB
7f0004200000-7f0004300000 rw-p 04200000 fd:01 42 /venv/llvmlite/binding/libllvmlite.so
Rss:                  12 kB
Anonymous:             0 kB
7f0005000000-7f0005100000 r-xp 00000000 fd:01 43 /venv/cv2/cv2.abi3.so
Rss:                 900 kB
Anonymous:             0 kB
7f0006000000-7f0006100000 rw-p 00000000 00:00 0
Rss:                 100 kB
Anonymous:           100 kB
"""


def test_clean_mappings_are_the_compilers_unwritten_read_only_ones(tmp_path):
    smaps = tmp_path / "smaps"
    smaps.write_text(SMAPS)
    got = memory.clean_mappings(smaps=str(smaps))
    # The code and the read-only data; not the relocated (written) RELRO part, not the writable
    # data, not another library, not anonymous memory.
    assert got == [(0x7F0000000000, 0x7F0000400000), (0x7F0000400000, 0x7F0004000000)]
    assert memory.clean_mappings(smaps=str(tmp_path / "absent")) == []


@pytest.mark.skipif(not LINUX, reason="/proc/self/smaps and madvise are Linux's")
def test_release_drops_llvms_pages_and_the_kernels_still_agree():
    # A fresh interpreter: compile something without the cache so LLVM's code is resident, release,
    # and check that the detector's output is the same before and after.
    code = r"""
import json, numpy as np
from numba import njit
from app import memory
from app.detector import Detector

def llvm_mib():
    total, cur = 0, False
    for line in open("/proc/self/smaps"):
        head = line.split()
        if "-" in head[0] and not head[0].endswith(":"):
            cur = len(head) > 5 and "libllvmlite" in head[5]
        elif head[0] == "Rss:" and cur:
            total += int(head[1])
    return total / 1024

det = Detector()
det.warmup()
image = (np.arange(240 * 320 * 3) % 251).astype(np.uint8).reshape(240, 320, 3)
before = det.detect(image)
@njit(cache=False)
def fresh(x):
    return (x * 3 + 1).sum()
fresh(np.arange(10))
held = llvm_mib()
dropped = memory.release_compiler_pages()
after = det.detect(image)
print(json.dumps({"held": held, "left": llvm_mib(), "dropped": dropped, "same": bool(np.array_equal(before, after)),
                  "again": int(fresh(np.arange(10)))}))
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["dropped"] > 20 * 2**20, out  # LLVM's code and read-only data: tens of MiB mapped
    assert out["held"] - out["left"] > 10, out  # ... and what compiling had paged in left the resident set
    assert out["same"], "the detections changed after the release"
    assert out["again"] == 145  # LLVM pages back in when it runs again


@pytest.mark.skipif(not LINUX, reason="VmHWM is Linux's")
def test_peak_rss_reads_the_high_water_mark():
    peak = memory.peak_rss_mib()
    now = memory.rss_mib()
    assert now is not None and 5 < now <= peak + 0.5
    assert abs(peak - resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024) < 64


@pytest.mark.slow
@pytest.mark.skipif(not LINUX, reason="ru_maxrss in KiB and the floor are measured on Linux")
def test_the_demo_stays_under_the_peak_floor():
    # The first run fills numba's cache if it is cold (as deploy/install.sh does on the Pi);
    # the second is what the service sees at every start after.
    base = [sys.executable, "-m", "app", "--source", "demo", "--preview", "none", "--fps", "0"]
    warm = subprocess.run([*base, "--warmup-only"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert warm.returncode == 0, warm.stderr[-2000:]
    code = (
        "import resource, subprocess, sys\n"
        "r = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
        "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
        "sys.stderr.write(r.stderr[-2000:])\n"
    )
    r = subprocess.run([sys.executable, "-c", code, *base, "--max-frames", "30"], cwd=ROOT, capture_output=True,
                       text=True, timeout=900)
    rc, kib = (int(x) for x in r.stdout.split())
    assert rc == 0, r.stderr
    assert kib / 1024 <= PEAK_FLOOR_MIB, f"peak RSS {kib / 1024:.1f} MiB over the {PEAK_FLOOR_MIB} MiB floor"
