"""Guest script: what the input costs on the Pi, under the ARM meter: grey against colour, and larger inputs.

    ../shared/tools/armcost/armcost run --json OUT.json benchmarks/arm_input.py

The camera's lores stream is YUV420, so grey input is its Y plane as it comes, while colour input
first converts the frame to BGR. Every network here is the shipped topology (three Bi-Real blocks,
ternary layers 2 and 4) with random weights and calibrated thresholds (app.randmodel), which cost
what trained ones do. Regions (one metered call each, after warm-up):

    1 detect(), grey 192x192 input, on the 320x240 Y plane
    2 cv2.cvtColor of the 320x240 YUV420 frame to BGR (what colour adds before detect)
    3 detect(), colour 192x192 input, on the BGR frame
    4 detect(), grey 224x224 input
    5 detect(), grey 256x256 input
    6 detect(), the shipped models/person.xnc, on the Y plane (the reference for region 1)
"""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import cv2  # noqa: E402
from armcost import start, stop  # noqa: E402

from app.bench import bench_frame  # noqa: E402
from app.detector import Detector  # noqa: E402
from app.modelfile import read_model  # noqa: E402
from app.randmodel import random_model  # noqa: E402

cv2.setNumThreads(1)
bgr, note = bench_frame()
yuv = cv2.cvtColor(bgr, cv2.COLOR_BGR2YUV_I420)  # (360, 320): the Y plane, then U and V
y_plane = yuv[: bgr.shape[0]]


def metered(region, fn, *args):
    fn(*args)
    fn(*args)
    start(region)
    out = fn(*args)
    stop(region)
    return out


def detector(**kw):
    det = Detector(model=random_model(seed=0, blocks=3, ternary=(2, 4), **kw))
    det.warmup()
    return det


metered(1, detector().detect, y_plane)
metered(2, cv2.cvtColor, yuv, cv2.COLOR_YUV2BGR_I420)
metered(3, detector(channels=3).detect, bgr)
metered(4, detector(width=224, height=224).detect, y_plane)
metered(5, detector(width=256, height=256).detect, y_plane)
shipped = Detector(model=read_model(ROOT / "models" / "person.xnc"))
shipped.warmup()
metered(6, shipped.detect, y_plane)
print(json.dumps({"frame": note, "y_plane": list(y_plane.shape), "yuv": list(yuv.shape)}))
