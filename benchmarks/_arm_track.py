"""Guest side of benchmarks/bench_arm.py's tracker figures (runs under armcost, aarch64).

Meters ``Tracker.update`` per frame with 0, 5 and 20 people walking in a 320x240
frame at 10 fps (regions 20, 21, 22): every person boxed on most frames, some
only by a low-score box now and then, a few single-frame false boxes. The
tracker is warmed up (numba kernels compiled, tracks confirmed) before the
metered frames. Prints one JSON line per scene.
"""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from armcost import start, stop  # noqa: E402

from app.tracker import Tracker  # noqa: E402

SCENES = {20: 0, 21: 5, 22: 20}  # region -> people
FPS = 10.0
WARM, METERED = 30, 40


def scene(people: int, frames: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per frame (high boxes, low boxes): people bouncing around the frame, 1 in 8 boxes weak, 1 in 10 frames a blip."""
    rng = np.random.default_rng(seed)
    pos = rng.uniform([20, 40], [300, 200], size=(people, 2))
    vel = rng.uniform(-30, 30, size=(people, 2))  # pixels per second
    size = rng.uniform([16, 40], [40, 100], size=(people, 2))
    out = []
    for _ in range(frames):
        pos += vel / FPS
        for axis, hi in ((0, 320), (1, 240)):
            bounce = (pos[:, axis] < 0) | (pos[:, axis] > hi)
            vel[bounce, axis] *= -1
        jitter = rng.normal(0, 1.5, size=(people, 4))
        boxes = np.concatenate([pos - size / 2, pos + size / 2], axis=1) + jitter
        score = rng.uniform(0.3, 0.9, size=people)
        weak = rng.random(people) < 0.125
        score[weak] = 0.18
        rows = np.column_stack([boxes, score, np.zeros(people)]).astype(np.float32)
        high, low = rows[~weak], rows[weak]
        if rng.random() < 0.1:
            blip = rng.uniform([0, 0], [280, 200])
            high = np.vstack([high, [[*blip, *(blip + 30), 0.3, 0]]]).astype(np.float32)
        out.append((high[np.argsort(-high[:, 4])], low))
    return out


Tracker().warmup()  # compile the numba kernels outside the regions
for region, people in SCENES.items():
    frames = scene(people, WARM + METERED, seed=people)
    tracker = Tracker()
    for i, (high, low) in enumerate(frames[:WARM]):
        tracker.update(high, low, i / FPS)
    for i, (high, low) in enumerate(frames[WARM:], start=WARM):
        start(region)
        tracker.update(high, low, i / FPS)
        stop(region)
    print(json.dumps({"people": people, "frames": METERED, "live_tracks": len(tracker.live),
                      "table": len(tracker.tracks), "ids": tracker.next_id - 1}))
