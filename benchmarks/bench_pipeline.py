"""What the camera app adds to the detector, per frame, and its peak memory.

    .venv/bin/python benchmarks/bench_pipeline.py [--frames 300] [--model FILE] [--no-rss] [--arm]

Times each stage of the pipeline on frames of the demo source, one frame
after the other on one thread (so the split is exact, not blurred by the
capture thread), shaped as the Pi's camera delivers them:

    demo_source  DemoSource.read() (its pan/zoom warp; a camera does this in hardware)
    capture      the capture conversion: the Y plane cropped out of a padded YUV420 lores buffer
    detect       Detector.detect() on that grey frame
    overlay      overlay.render_rgba() for the DRM preview (the Pi's default)
    overlay_bgr  overlay.render() for the window / recorder
    log          frame_record() + JsonlLog.write() to a temporary file

overhead_pct = (capture + overlay + log) / detect.

Then runs ``python -m app --source demo --preview none --max-frames 300`` as a
child and reads its peak RSS from getrusage(RUSAGE_CHILDREN). The last line
printed is one JSON object. Uses models/person.xnc when present, else a
random-weight model of the default architecture (same cost).

``--arm`` also meters the split in aarch64 instructions on the emulated
Cortex-A53 of a Pi Zero 2 W (../shared/tools/armcost): the ratio that matters
on the Pi, where detect() is far slower relative to Python than on a laptop.
There the capture stage is what the Pi does per frame: crop the Y plane out of
a padded YUV420 lores buffer; the overlay is the DRM RGBA overlay.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app import overlay  # noqa: E402
from app.detector import DEFAULT_MODEL, Detector  # noqa: E402
from app.randmodel import model_file_or_random  # noqa: E402
from app.sinks import JsonlLog, frame_record  # noqa: E402
from app.sources import DemoSource, Frame  # noqa: E402


def lores_buffer(bgr: np.ndarray, stride: int = 384) -> np.ndarray:
    """A padded YUV420 buffer (h*3/2, stride) as picamera2 hands over the lores stream."""
    h, w = bgr.shape[:2]
    yuv = np.full((h * 3 // 2, stride), 128, np.uint8)
    yuv[:h, :w] = bgr[:, :, 1]
    return yuv


def split(model: Path, frames: int, tmp: Path) -> dict:
    det = Detector(model)
    det.warmup()
    src = DemoSource(fps=0)
    src.open()
    log = JsonlLog(str(tmp / "bench.jsonl"))
    perf = time.perf_counter
    keys = ("demo_source", "capture", "detect", "overlay", "overlay_bgr", "log")
    t = {k: [] for k in keys}
    warm = 10
    n_dets = 0
    for i in range(frames + warm):
        t0 = perf()
        bgr = src.read()
        t1 = perf()
        yuv = lores_buffer(bgr)
        t2 = perf()
        # What the Pi's capture thread does per frame: the Y plane, cropped out of the stride padding.
        h, w = bgr.shape[:2]
        grey = np.ascontiguousarray(yuv[:h, :w])
        t3 = perf()
        dets = det.detect(grey)
        t4 = perf()
        hud = overlay.Hud(8.0, (t4 - t3) * 1e3, 0)
        overlay.render_rgba((w, h), dets, det.class_names, hud)  # DRM, the Pi's default preview
        t5 = perf()
        overlay.render(grey, dets, det.class_names, hud)  # window / recorder
        t6 = perf()
        log.write(frame_record(Frame(grey, i, t0), dets, det.class_names, 8.0, (t4 - t2) * 1e3, 0))
        t7 = perf()
        if i >= warm:
            n_dets += len(dets)
            for k, a, b in zip(keys, (t0, t2, t3, t4, t5, t6), (t1, t3, t4, t5, t6, t7), strict=True):
                t[k].append((b - a) * 1e3)
    log.close()
    src.close()
    mean = {k: statistics.fmean(v) for k, v in t.items()}
    median = {k: statistics.median(v) for k, v in t.items()}
    overhead = mean["capture"] + mean["overlay"] + mean["log"]
    total = mean["capture"] + mean["detect"] + mean["overlay"] + mean["log"]
    return {
        "frames": frames,
        "frame_shape": list(grey.shape),
        "detections_per_frame": round(n_dets / frames, 2),
        "per_frame_ms": {k: round(v, 4) for k, v in mean.items()},
        "per_frame_ms_median": {k: round(v, 4) for k, v in median.items()},
        "overhead_pct": round(100.0 * overhead / mean["detect"], 2),
        "overhead_pct_median": round(
            100.0 * (median["capture"] + median["overlay"] + median["log"]) / median["detect"], 2),
        "overhead_pct_incl_demo_source": round(100.0 * (overhead + mean["demo_source"]) / mean["detect"], 2),
        "fps": round(1000.0 / total, 1),
    }


def peak_rss(model: Path, frames: int) -> dict:
    cmd = [sys.executable, "-m", "app", "--source", "demo", "--preview", "none", "--max-frames", str(frames)]
    if model != DEFAULT_MODEL:
        cmd += ["--model", str(model)]
    env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
    t0 = time.monotonic()
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.monotonic() - t0
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr}")
    kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # kilobytes on Linux
    summary = [line for line in r.stderr.splitlines() if "stopped:" in line]
    return {"peak_rss_mb": round(kb / 1024.0, 1), "rss_run_s": round(wall, 1),
            "rss_command": " ".join(["python"] + cmd[1:]), "rss_run_summary": summary[-1] if summary else ""}


ARM_REGIONS = {"capture": 1, "detect": 2, "overlay": 3, "overlay_bgr": 4, "log": 5}


def arm_guest(model: Path, frames: int) -> None:
    """Runs inside armcost: meter each stage over ``frames`` frames (counts are deterministic)."""
    import cv2
    from armcost import region

    cv2.setNumThreads(1)
    det = Detector(model)
    det.warmup()
    src = DemoSource(fps=0)
    src.open()
    w, h = 320, 240
    with tempfile.TemporaryDirectory() as d:
        log = JsonlLog(str(Path(d) / "arm.jsonl"))
        for i in range(frames + 2):
            bgr = src.read()
            yuv = lores_buffer(bgr)
            metered = i >= 2
            with region(ARM_REGIONS["capture"]) if metered else _null():
                grey = np.ascontiguousarray(yuv[:h, :w])
            with region(ARM_REGIONS["detect"]) if metered else _null():
                dets = det.detect(grey)
            hud = overlay.Hud(8.0, 100.0, 3)
            with region(ARM_REGIONS["overlay"]) if metered else _null():
                overlay.render_rgba((w, h), dets, det.class_names, hud)
            with region(ARM_REGIONS["overlay_bgr"]) if metered else _null():
                overlay.render(grey, dets, det.class_names, hud)
            with region(ARM_REGIONS["log"]) if metered else _null():
                log.write(frame_record(Frame(grey, i, time.monotonic()), dets, det.class_names, 8.0, 100.0, 3))
        log.close()


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def arm_split(model: Path, frames: int) -> dict:
    shared = Path(os.environ["XNORCAM_SHARED"]) if os.environ.get("XNORCAM_SHARED") else ROOT / ".." / "shared"
    tool = (shared / "tools" / "armcost" / "armcost").resolve()
    if not tool.exists():
        print(f"SKIP --arm: the ARM meter is absent ({tool})")
        return {}
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "armcost.json"
        cmd = [str(tool), "run", "--json", str(out), "--quiet", str(Path(__file__).resolve()),
               "--guest", "--model", str(model.resolve()), "--frames", str(frames)]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0 or not out.exists():
            raise SystemExit(f"armcost failed ({proc.returncode}):\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
        regions = json.loads(out.read_text())["regions"]
    per = {}
    for name, k in ARM_REGIONS.items():
        r = regions[str(k)]
        per[name] = int(r.get("net_instructions", r["instructions"])) / max(1, int(r["entries"]))
    overhead = per["capture"] + per["overlay"] + per["log"]
    return {
        "arm_frames": frames,
        "arm_minstr_per_frame": {k: round(v / 1e6, 3) for k, v in per.items()},
        # IPC 0.42-0.64 at 1 GHz for numba/NEON code (armcost README); Python code is in the same range.
        "arm_est_ms_per_frame_ipc_0_53": {k: round(v / 0.53e6, 2) for k, v in per.items()},
        "arm_overhead_pct": round(100.0 * overhead / per["detect"], 2),
        "arm_overhead_pct_with_bgr_overlay": round(
            100.0 * (per["capture"] + per["overlay_bgr"] + per["log"]) / per["detect"], 2),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=300, help="timed frames (>= 200)")
    ap.add_argument("--rss-frames", type=int, default=300, help="frames for the peak-RSS child run")
    ap.add_argument("--model", help="model file (default models/person.xnc, else a random model)")
    ap.add_argument("--no-rss", action="store_true", help="skip the peak-RSS child run")
    ap.add_argument("--arm", action="store_true", help="also meter the split on the emulated Pi CPU (armcost)")
    ap.add_argument("--arm-frames", type=int, default=5, help="metered frames under armcost")
    ap.add_argument("--guest", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.guest:
        arm_guest(Path(args.model), args.frames)
        return 0
    if args.frames < 200:
        ap.error("--frames must be at least 200")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        model = model_file_or_random(args.model, tmp)
        result = {"model": str(model.relative_to(ROOT) if model.is_relative_to(ROOT) else "random (default architecture)")}
        result.update(split(model, args.frames, tmp))
        ms = result["per_frame_ms"]
        print(f"model: {result['model']}, frame {result['frame_shape']}, {args.frames} frames, 1 thread")
        for k, v in ms.items():
            print(f"  {k:13s} {v:8.3f} ms/frame (median {result['per_frame_ms_median'][k]:.3f})")
        print(f"  app overhead  {result['overhead_pct']:.1f} % of detect() (capture + DRM overlay + log; "
              f"median {result['overhead_pct_median']:.1f} %)  ->  {result['fps']} fps")
        if not args.no_rss:
            result.update(peak_rss(model, args.rss_frames))
            print(f"  peak RSS      {result['peak_rss_mb']} MB  ({result['rss_command']})")
        if args.arm:
            arm = arm_split(model, args.arm_frames)
            result.update(arm)
            if arm:
                print("  Cortex-A53 (armcost) M instructions/frame: "
                      + ", ".join(f"{k} {v}" for k, v in arm["arm_minstr_per_frame"].items()))
                print(f"  Cortex-A53 overhead {arm['arm_overhead_pct']} % of detect() (DRM overlay), "
                      f"{arm['arm_overhead_pct_with_bgr_overlay']} % with the BGR overlay")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
