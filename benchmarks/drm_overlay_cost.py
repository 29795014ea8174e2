"""What the HDMI overlay costs a frame, against the FAKE picamera2 that models its blocking.

    .venv/bin/python benchmarks/drm_overlay_cost.py [--frames 40] [--fps 10]

picamera2's DRM set_overlay allocates a new dumb buffer, copies the RGBA image in and commits
synchronously: it returns after the display's next refresh (60 Hz here), holding the lock the camera
loop renders each frame under (previews/drm_preview.py). tests/fakes/fake_picamera2.py models that
wait. Three scenes, each shown at the pipeline's pace (--fps), with the HUD on:

    empty    nobody in view
    still    one person standing
    walking  one person moving 2 pixels a frame

For each: the DrmPreview now (the overlay set when the drawing changes, the HUD twice a second)
against the reference measured in the same run, the overlay set on every frame (how it was): the
mean and the worst time show() takes on the pipeline thread, the overlays set, and the time the
camera loop waited for the lock. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.overlay import Hud  # noqa: E402
from app.sinks import DrmPreview  # noqa: E402
from app.sources import Frame, Picamera2Source  # noqa: E402
from tests.fakes import fake_picamera2  # noqa: E402


class EveryFrame(DrmPreview):
    """The reference: set_overlay on every frame."""

    def show(self, *args, **kwargs):
        self._drawn = None
        super().show(*args, **kwargs)


def scene(name: str, i: int) -> np.ndarray:
    if name == "empty":
        return np.zeros((0, 6), np.float32)
    x = 40 + (2 * i if name == "walking" else 0)
    return np.array([[x, 30, x + 50, 140, 0.87, 0]], np.float32)


def run(preview_cls, name: str, frames: int, fps: float) -> dict:
    module = fake_picamera2.make_module()
    module.state.frame_period_s = 1 / 30
    sys.modules["picamera2"] = module
    drm = preview_cls(["person"])
    times = []
    with Picamera2Source(drm=drm, network_size=(192, 192)) as src:
        for i in range(frames):
            t_frame = time.monotonic()
            pixels = src.read()
            t0 = time.perf_counter()
            drm.show(Frame(pixels, i, t_frame), None, scene(name, i), Hud(9.5 + i % 3 / 10, 101.0 + i % 7, i // 5))
            times.append(time.perf_counter() - t0)
            time.sleep(max(0.0, 1 / fps - (time.monotonic() - t_frame)))
    st = module.state
    return {"show_ms_mean": round(1e3 * statistics.mean(times), 2), "show_ms_max": round(1e3 * max(times), 2),
            "overlays_set": st.overlay_buffers, "frames": frames,
            "camera_loop_lock_wait_ms": round(1e3 * st.render_lock_wait_s, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=40)
    ap.add_argument("--fps", type=float, default=10.0)
    args = ap.parse_args()
    out = {"frames": args.frames, "fps": args.fps, "vblank_ms": round(1e3 / 60, 2), "scenes": {}}
    for name in ("empty", "still", "walking"):
        out["scenes"][name] = {"now": run(DrmPreview, name, args.frames, args.fps),
                               "every_frame": run(EveryFrame, name, args.frames, args.fps)}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
