"""Guest side of benchmarks/bench_arm.py's thread figures (runs under the ARM meter, aarch64).

    python benchmarks/_arm_threads.py [MODEL]      (inside armcost, NUMBA_NUM_THREADS=4)

One detect() of the Pi's frame (the lores stream at the network's size): region 100 the whole call
on one thread, then each split kernel call over each thread's rows for 1, 2 and 4 threads
(app.bench.thread_split; regions 101 on, their ids printed), then detect() on 2 and 4 real numba
threads (regions 3002, 3004: every thread's instructions together, the counter being global),
whose outputs must equal the one-thread ones bit for bit. Prints one JSON line.
"""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import cv2  # noqa: E402
import numba  # noqa: E402
import numpy as np  # noqa: E402
from armcost import start, stop  # noqa: E402

from app.bench import THREAD_COUNTS, bench_frame, load_bench_model, pi_frame, thread_split  # noqa: E402
from app.detector import Detector  # noqa: E402

cv2.setNumThreads(1)
model, model_note = load_bench_model(sys.argv[1] if len(sys.argv) > 1 else None)
frame = pi_frame(bench_frame()[0], model)
det = Detector(model=model)
det.warmup()
ids = {}


def measure(key, fn):
    fn()
    rid = 100 + len(ids)
    ids[str(key)] = rid
    start(rid)
    fn()
    stop(rid)
    return rid


raw = thread_split(det, frame, measure)
want = det.detect(frame)
want_head = det.network.head_out.copy()
real = {}
for T in THREAD_COUNTS[1:]:
    if numba.config.NUMBA_NUM_THREADS < T:
        continue
    dt = Detector(model=model, threads=T)
    dt.warmup()
    dt.detect(frame)
    start(3000 + T)
    got = dt.detect(frame)
    stop(3000 + T)
    real[str(T)] = {"region": 3000 + T, "identical": bool(np.array_equal(got, want))
                    and bool(np.array_equal(dt.network.head_out, want_head))}
print(json.dumps({"model": model_note, "frame": f"{frame.shape[1]}x{frame.shape[0]}", "raw": raw, "real": real,
                  "numba_threads": numba.config.NUMBA_NUM_THREADS, "layer": numba.threading_layer()
                  if real else None}))
