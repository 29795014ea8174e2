"""`python -m app bench`: the binary Detector against a float twin of the same architecture.

The float twin is run by OpenCV's cv2.dnn: the speed baseline.

OpenCV 5 reads ONNX (its Darknet/Caffe importers are gone), and the onnx
package is not on the Pi, so the few protobuf messages needed are written here
by hand. Weights are the binary model's ±1 weights as floats (values do not
change the cost of a float convolution); BatchNorm is folded into the bias and
every conv but the last is followed by ReLU.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from app import bits
from app.decode import decode
from app.modelfile import Model, read_model
from app.preprocess import letterbox


# ----------------------------------------------------------------- protobuf
def _varint(v: int) -> bytes:
    v &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        if v:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _key(field: int, wire: int) -> bytes:
    return _varint(field << 3 | wire)


def _int(field: int, v: int) -> bytes:
    return _key(field, 0) + _varint(v)


def _bytes(field: int, v) -> bytes:
    if isinstance(v, str):
        v = v.encode()
    return _key(field, 2) + _varint(len(v)) + v


def _float(field: int, v: float) -> bytes:
    return _key(field, 5) + struct.pack("<f", v)


def _attr_ints(name: str, values) -> bytes:
    # AttributeProto: name=1, ints=8, type=20 (INTS = 7)
    return _bytes(1, name) + b"".join(_int(8, v) for v in values) + _int(20, 7)


def _node(op: str, inputs, outputs, name: str, attrs=()) -> bytes:
    # NodeProto: input=1, output=2, name=3, op_type=4, attribute=5
    msg = b"".join(_bytes(1, i) for i in inputs) + b"".join(_bytes(2, o) for o in outputs)
    msg += _bytes(3, name) + _bytes(4, op) + b"".join(_bytes(5, a) for a in attrs)
    return msg


def _tensor(name: str, arr: np.ndarray) -> bytes:
    # TensorProto: dims=1, data_type=2 (FLOAT=1), name=8, raw_data=9
    arr = np.ascontiguousarray(arr, dtype="<f4")
    return b"".join(_int(1, d) for d in arr.shape) + _int(2, 1) + _bytes(8, name) + _bytes(9, arr.tobytes())


def _value_info(name: str, shape) -> bytes:
    # ValueInfoProto{name=1, type=2{tensor_type=1{elem_type=1, shape=2{dim=1{dim_value=1}}}}}
    dims = b"".join(_bytes(1, _int(1, d)) for d in shape)
    return _bytes(1, name) + _bytes(2, _bytes(1, _int(1, 1) + _bytes(2, dims)))


def onnx_bytes(model: Model) -> bytes:
    """ONNX (opset 13) float network with the layer structure of ``model``, input (1, C, H, W)."""
    nodes, inits = [], []
    cur, c = "input", model.channels
    for i, layer in enumerate(model.layers):
        p, t = layer.params, layer.tensors
        out = f"t{i}"
        if layer.op == "maxpool2":
            nodes.append(_node("MaxPool", [cur], [out], f"pool{i}",
                               [_attr_ints("kernel_shape", [2, 2]), _attr_ints("strides", [2, 2])]))
        else:
            if layer.op == "stem":
                w = t["weight"].astype(np.float32) / 64.0
            elif layer.op in ("bconv", "rbconv"):
                w = bits.unpack(t["weight"], p["in_ch"]).astype(np.float32)
            else:
                w = t["weight"].astype(np.float32)[:, None, None, :]
            k = w.shape[1]
            s = p.get("stride", 1)
            pad = k // 2
            inits.append(_tensor(f"w{i}", np.transpose(w, (0, 3, 1, 2))))
            inits.append(_tensor(f"b{i}", np.zeros(w.shape[0], np.float32)))
            attrs = [_attr_ints("kernel_shape", [k, k]), _attr_ints("strides", [s, s]),
                     _attr_ints("pads", [pad, pad, pad, pad])]
            conv_out = out if layer.op == "head" else f"c{i}"
            if layer.op == "rbconv":  # the float twin's block: r + conv(relu(r))
                nodes.append(_node("Relu", [cur], [f"a{i}"], f"relu{i}"))
                nodes.append(_node("Conv", [f"a{i}", f"w{i}", f"b{i}"], [conv_out], f"conv{i}", attrs))
                nodes.append(_node("Add", [cur, conv_out], [out], f"add{i}"))
            else:
                nodes.append(_node("Conv", [cur, f"w{i}", f"b{i}"], [conv_out], f"conv{i}", attrs))
            if layer.op not in ("head", "rbconv"):
                nodes.append(_node("Relu", [conv_out], [out], f"relu{i}"))
            c = w.shape[0]
        cur = out
    graph = b"".join(_bytes(1, n) for n in nodes) + _bytes(2, "xnorcam_float")
    graph += b"".join(_bytes(5, t) for t in inits)
    graph += _bytes(11, _value_info("input", [1, model.channels, model.input_height, model.input_width]))
    graph += _bytes(12, _value_info(cur, [1, c, 0, 0]))
    opset = _bytes(1, "") + _int(2, 13)
    return _int(1, 8) + _bytes(2, "xnorcam") + _bytes(7, graph) + _bytes(8, opset)


class FloatDetector:
    """Same pipeline as app.detector.Detector (letterbox, network, decode) with a float cv2.dnn network."""

    def __init__(self, model: Model, score_threshold=None, nms_iou=None, max_detections=100):
        self.model = model
        self.net = cv2.dnn.readNetFromONNX(np.frombuffer(onnx_bytes(model), np.uint8))
        self.score_threshold = model.score_threshold if score_threshold is None else score_threshold
        self.nms_iou = model.nms_iou if nms_iou is None else nms_iou
        self.max_detections = max_detections

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Letterboxed uint8 (H, W, C) -> head (gh, gw, out) float32."""
        blob = ((x.astype(np.float32) - 128.0) / 128.0).transpose(2, 0, 1)[None]
        self.net.setInput(np.ascontiguousarray(blob))
        out = self.net.forward()
        return np.ascontiguousarray(out[0].transpose(1, 2, 0))

    def detect(self, image: np.ndarray) -> np.ndarray:
        m = self.model
        x, lb = letterbox(image, m.input_width, m.input_height, m.channels)
        head = self.forward(x)
        return decode(head, m.anchors, (m.input_width, m.input_height), lb, image.shape, self.score_threshold,
                      self.nms_iou, self.max_detections)


# ----------------------------------------------------------------- inputs
ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = ROOT / "models" / "person.xnc"
FRAME_SIZE = (320, 240)


def shared_dir() -> Path:
    """../shared next to the repository (or $XNORCAM_SHARED)."""
    env = os.environ.get("XNORCAM_SHARED")
    return Path(env) if env else (ROOT / ".." / "shared").resolve()


def load_bench_model(path=None) -> tuple[Model, str]:
    """The model to time: ``path``, else the shipped default, else a random model of the default architecture."""
    if path is not None:
        return read_model(path), str(path)
    if DEFAULT_MODEL.exists():
        return read_model(DEFAULT_MODEL), str(DEFAULT_MODEL)
    from app.randmodel import random_model

    return random_model(seed=0), "random weights, default architecture (models/person.xnc does not exist yet)"


def bench_frame() -> tuple[np.ndarray, str]:
    """A 320x240 BGR frame: a real photo from the shared datasets when present, else a synthetic one."""
    photos = shared_dir() / "datasets" / "person" / "pennfudan" / "images"
    if photos.is_dir():
        for p in sorted(photos.glob("*.jpg"))[:5]:
            img = cv2.imread(str(p), cv2.IMREAD_COLOR)
            if img is not None:
                return cv2.resize(img, FRAME_SIZE, interpolation=cv2.INTER_AREA), f"{p.name} resized to 320x240"
    from app.randmodel import synthetic_frame

    return synthetic_frame(0, *FRAME_SIZE), "synthetic 320x240 frame"


def binops(model: Model) -> int:
    """Bit-pair multiply-accumulates of one frame's binary convolutions."""
    from app.modelfile import conv_out

    h, w, total = model.input_height, model.input_width, 0
    for layer in model.layers:
        p = layer.params
        if layer.op in ("stem", "bconv"):
            h, w = conv_out(h, p["kernel"], p["stride"]), conv_out(w, p["kernel"], p["stride"])
            if layer.op == "bconv":
                total += h * w * p["out_ch"] * p["kernel"] ** 2 * p["in_ch"]
        elif layer.op == "maxpool2":
            h, w = h // 2, w // 2
    return total


# ----------------------------------------------------------------- threads
THREAD_COUNTS = (1, 2, 4)


def pi_frame(frame: np.ndarray, model: Model) -> np.ndarray:
    """``frame`` as the Pi's lores stream delivers it: at the network's size, grey when the model is."""
    x, _ = letterbox(frame, model.input_width, model.input_height, model.channels)
    return x[:, :, 0] if model.channels == 1 else x


def thread_split(det, frame: np.ndarray, measure, counts=THREAD_COUNTS) -> dict:
    """What each thread of one detect() of ``frame`` does when the network runs on T threads.

    ``measure(key, fn)`` calls fn and returns its cost: seconds natively; under the meter, the id of
    the region that counted its aarch64 instructions (the counts come after the run). Each kernel
    with a prange twin is called over the rows each of T threads gets (Network.thread_rows), so
    every thread's share is measured on its own; the rest of detect() runs on one thread. ``det``
    runs on one thread; its buffers are refilled by each call with the same values, so calls repeat.
    :func:`thread_figures` turns the measurements into per-thread totals and critical paths.
    """
    from app import kernels as K
    from app.network import Network

    net = det.network
    det.detect(frame)
    whole = measure("detect", lambda: det.detect(frame))
    stem = (K.stem_rows, (net.u, net.stem_wt, net.stem_thr, net.stem_flip, net.stem_k, net.stem_s, net.stem_planes,
                          net.stem_out), net.stem_height)
    split = [stem] + [(fn, args, n) for fn, args, n, par in net.plan if par is not None]
    work = {}
    for T in counts:
        work[str(T)] = [[measure((T, ci, t), lambda fn=fn, args=args, r=r: fn(*args, *r))
                         for t, r in enumerate(Network.thread_rows(n, T))] for ci, (fn, args, n) in enumerate(split)]
    return {"detect": whole, "work": work, "split_calls": [getattr(fn, "__name__", str(fn)) for fn, _, _ in split]}


def thread_figures(raw: dict, value=lambda m: m) -> dict:
    """thread_split's measurements (``value`` maps each to a cost) -> per T: each thread's total, with
    the one-thread parts (preprocess, the stem's padding, the stream's signs and sums, the head,
    decode) on thread 0, and the critical path: the one-thread parts plus, per split call, its
    slowest thread."""
    work = {T: [[value(m) for m in call] for call in calls] for T, calls in raw["work"].items()}
    one_thread = value(raw["detect"]) - sum(call[0] for call in work["1"])
    out = {"detect": value(raw["detect"]), "one_thread_parts": one_thread}
    for T, calls in work.items():
        per_thread = [sum(call[t] for call in calls) + (one_thread if t == 0 else 0) for t in range(int(T))]
        out[T] = {"per_thread": per_thread, "critical_path": one_thread + sum(max(call) for call in calls)}
    return out


# ----------------------------------------------------------------- timing
def _median_ms(fn, frames: int) -> float:
    times = []
    for _ in range(frames):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


APP_RSS_FRAMES = 60


def app_peak_rss_mib(frames: int = APP_RSS_FRAMES) -> float | None:
    """Peak RSS (MiB) of ``python -m app --source demo --preview none`` over ``frames`` frames, run as a child.

    The app's own start (imports, model, warm-up from numba's cache as it stands, the
    pipeline), not this benchmark's, which also holds the float twin. None if it failed.
    """
    cmd = [sys.executable, "-m", "app", "--source", "demo", "--preview", "none", "--fps", "0",
           "--max-frames", str(frames)]
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-2000:])
        return None
    # The largest resident set of any waited-for child: this one (the benchmark starts no other before it).
    return round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)


def _timed(repeats: int):
    """A thread_split measure: the fastest of ``repeats`` calls in seconds (the parts are sub-millisecond
    calls, and the least disturbed run of each is what their sum compares with)."""

    def measure(key, fn):
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    return measure


def thread_bench(model: Model, frame: np.ndarray, frames: int) -> dict:
    """Per-thread and critical-path milliseconds of one detect() of the Pi's frame (thread_split timed
    here), and the median ms of detect() on real numba threads with each of THREAD_COUNTS."""
    import numba

    from app.detector import Detector

    pi = pi_frame(frame, model)
    det = Detector(model=model, threads=1)
    det.warmup()
    figs = thread_figures(thread_split(det, pi, _timed(max(10, frames // 2))), lambda sec: sec * 1e3)
    out = {"frame": f"{pi.shape[1]}x{pi.shape[0]}", "cpus": os.cpu_count(), "numba_threads": numba.config.NUMBA_NUM_THREADS}
    for T in THREAD_COUNTS:
        dt = det if T == 1 else Detector(model=model, threads=T)
        dt.warmup()
        for _ in range(3):
            dt.detect(pi)
        out[str(T)] = {"per_thread_ms": [round(v, 4) for v in figs[str(T)]["per_thread"]],
                       "critical_path_ms": round(figs[str(T)]["critical_path"], 4),
                       "ms_per_frame": round(_median_ms(lambda dt=dt: dt.detect(pi), frames), 4)}
    return out


def run_bench(model_path=None, frames: int = 50) -> dict:
    from app.detector import STAGES, Detector
    from app.memory import peak_rss_mib

    app_rss = app_peak_rss_mib()
    cv2.setNumThreads(1)
    model, model_note = load_bench_model(model_path)
    frame, frame_note = bench_frame()
    det = Detector(model=model, threads=1)
    det.warmup()
    for _ in range(5):
        det.detect(frame)
    stage_runs = {s: [] for s in STAGES}
    times = []
    for _ in range(frames):
        t0 = time.perf_counter()
        det.detect(frame)
        times.append((time.perf_counter() - t0) * 1e3)
        for s in STAGES:
            stage_runs[s].append(det.last_stage_ms[s])
    ms = statistics.median(times)
    stages = {s: round(statistics.median(v), 4) for s, v in stage_runs.items()}
    fd = FloatDetector(model)
    for _ in range(5):
        fd.detect(frame)
    float_ms = _median_ms(lambda: fd.detect(frame), frames)
    ops = binops(model)
    return {
        "model": model_note,
        "frame": frame_note,
        "frames": frames,
        "threads": 1,
        "ms_per_frame": round(ms, 4),
        "float_ms_per_frame": round(float_ms, 4),
        "speedup_vs_float": round(float_ms / ms, 3),
        "binary_binops_per_frame": ops,
        "binary_gbinops": round(ops / (stages["body"] * 1e-3) / 1e9, 1),
        "stages_ms": stages,
        "detections": int(len(det.detect(frame))),
        "app_peak_rss_mib": app_rss,
        "bench_peak_rss_mib": round(peak_rss_mib(), 1),
        "threads_on_pi_frame": thread_bench(model, frame, frames),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m app bench", description="time the binary detector against its float twin")
    ap.add_argument("--model", help="model file (default: models/person.xnc, else a random model)")
    ap.add_argument("--frames", type=int, default=50, help="timed frames (median reported; at least 20)")
    ap.add_argument("--json", action="store_true", help="print only the JSON result line")
    args = ap.parse_args(argv)
    if args.frames < 20:
        ap.error("--frames must be at least 20")
    r = run_bench(args.model, args.frames)
    if not args.json:
        print(f"model: {r['model']}")
        print(f"frame: {r['frame']}, {r['frames']} timed frames after warm-up, 1 thread, median")
        print(f"binary detect(): {r['ms_per_frame']:.3f} ms/frame   ({r['detections']} detections)")
        print(f"float cv2.dnn twin: {r['float_ms_per_frame']:.3f} ms/frame   speedup x{r['speedup_vs_float']:.2f}")
        print("stages (ms): " + ", ".join(f"{k} {v:.3f}" for k, v in r["stages_ms"].items()))
        print(f"binary body: {r['binary_binops_per_frame'] / 1e6:.1f} M binops/frame, {r['binary_gbinops']:.0f} Gbinop/s")
        print(f"peak RSS: python -m app --source demo --preview none ({APP_RSS_FRAMES} frames) "
              f"{r['app_peak_rss_mib']} MiB; this benchmark (with the float twin) {r['bench_peak_rss_mib']} MiB")
        t = r["threads_on_pi_frame"]
        print(f"threads, on the Pi's frame ({t['frame']}; {t['cpus']} CPUs here, numba may use {t['numba_threads']}):")
        for T in THREAD_COUNTS:
            f = t[str(T)]
            print(f"  {T}: per thread " + " ".join(f"{v:.2f}" for v in f["per_thread_ms"])
                  + f" ms, critical path {f['critical_path_ms']:.2f} ms; on {T} real threads {f['ms_per_frame']:.2f} ms/frame")
    print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
