"""Guest side of benchmarks/bench_arm.py (runs under armcost, aarch64): meters detect() and the float twin.

Regions: 1 whole detect(); 2..6 its stages (app.detector.STAGES); 7 the float cv2.dnn detector;
11 and 12..16: detect() and its stages on the Pi's frame (the lores stream at the network's size).
Prints one JSON line describing the model used, with the peak RSS after the binary detector's warm-up
and frames (before the float twin), as the emulator's process counts it.
"""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import cv2  # noqa: E402
from armcost import start, stop  # noqa: E402

from app.bench import FloatDetector, bench_frame, load_bench_model, pi_frame  # noqa: E402
from app.detector import STAGES, Detector  # noqa: E402
from app.memory import peak_rss_mib  # noqa: E402

cv2.setNumThreads(1)
model, model_note = load_bench_model(sys.argv[1] if len(sys.argv) > 1 else None)
frame, frame_note = bench_frame()
det = Detector(model=model)
det.warmup()
det.detect(frame)
det.detect(frame)
# The binary detector's peak, before the float twin loads: the emulator's process, guest and emulator together.
binary_peak_rss = peak_rss_mib()

start(1)
det.detect(frame)
stop(1)


def staged(frame, first):
    region = {name: first + i for i, name in enumerate(STAGES)}
    current = [None]

    def on_stage(name):
        if current[0] is not None:
            stop(current[0])
        current[0] = region[name] if name is not None else None
        if current[0] is not None:
            start(current[0])

    det.detect_staged(frame, on_stage)


staged(frame, 2)
pi = pi_frame(frame, model)
det.detect(pi)
det.detect(pi)
start(11)
det.detect(pi)
stop(11)
staged(pi, 12)

fd = FloatDetector(model)
fd.detect(frame)
fd.detect(frame)
start(7)
fd.detect(frame)
stop(7)
print(json.dumps({"model": model_note, "frame": frame_note, "pi_frame": f"{pi.shape[1]}x{pi.shape[0]}",
                  "detections": int(len(det.detect(frame))), "peak_rss_mib": round(binary_peak_rss, 1)}))
