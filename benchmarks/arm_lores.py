"""Guest script: what the camera's detection frame size costs on the Pi, under the ARM meter.

    ../shared/tools/armcost/armcost run --json OUT.json benchmarks/arm_lores.py

The Pi camera's lores stream used to be the configured 320x240; it is now the network input's fit
at the preview's aspect, 192x144 for the shipped 192x192 model and a 640x480 preview, so the
letterbox only pads (app/sources.py lores_size). Regions (one metered call each, after warm-up):

    1 letterbox of a 320x240 Y plane into 192x192 (the INTER_AREA shrink, then the pad)
    2 letterbox of a 192x144 Y plane into 192x192 (the pad only)
    3 detect() of the shipped model on the 320x240 Y plane
    4 detect() of the shipped model on the 192x144 Y plane
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import cv2  # noqa: E402
from armcost import start, stop  # noqa: E402

from app.bench import bench_frame  # noqa: E402
from app.detector import Detector  # noqa: E402
from app.modelfile import read_model  # noqa: E402
from app.preprocess import letterbox  # noqa: E402

cv2.setNumThreads(1)
bgr, note = bench_frame()
y320 = cv2.cvtColor(cv2.resize(bgr, (320, 240), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2GRAY)
# What the ISP's lores scaler delivers at 192x144 (here: the same scene scaled by area).
y192 = cv2.cvtColor(cv2.resize(bgr, (192, 144), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2GRAY)


def metered(region, fn, *args):
    fn(*args)
    fn(*args)
    start(region)
    out = fn(*args)
    stop(region)
    return out


metered(1, letterbox, y320, 192, 192, 1)
metered(2, letterbox, y192, 192, 192, 1)
shipped = Detector(model=read_model(ROOT / "models" / "person.xnc"))
shipped.warmup()
metered(3, shipped.detect, y320)
metered(4, shipped.detect, y192)
