"""Every numba kernel against its numpy reference on seeded random shapes, then whole networks.

A plain script (no pytest/hypothesis) so that it runs in the aarch64 guest of the ARM meter:

    ../shared/tools/armcost/armcost run tests/arm/kernel_checks.py      (make test-arm)

It also runs natively: ``python tests/arm/kernel_checks.py [--cases N]``. Prints one line per
kernel and a summary; exits 1 on any mismatch.
"""

import argparse
import dataclasses
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from app import bits, kernels, reference  # noqa: E402
from app.bits import INT32_MAX, INT32_MIN  # noqa: E402
from app.decode import decode  # noqa: E402
from app.detector import Detector  # noqa: E402
from app.modelfile import Layer, output_kind  # noqa: E402
from app.network import Network  # noqa: E402
from app.preprocess import letterbox  # noqa: E402
from app.randmodel import random_model, synthetic_frame  # noqa: E402

CHANNELS = (1, 7, 31, 32, 33, 63, 64, 65, 100, 128, 129, 200, 256, 300)


def out_channels(rng):
    """A conv's output channels: often whole 64-bit words (the kernels' vector threshold path), else any."""
    return int(rng.choice([64, 128, 192])) if rng.random() < 0.4 else int(rng.integers(1, 140))


def edge_thresholds(rng, y):
    n = y.shape[-1]
    flat = y.reshape(-1, n)
    thr = rng.integers(flat.min() - 2, flat.max() + 3, n).astype(np.int64)
    pick = rng.random(n)
    exact = flat[rng.integers(0, flat.shape[0], n), np.arange(n)]
    thr = np.where(pick < 0.4, exact, thr)
    thr = np.where(pick > 0.9, INT32_MIN, thr)
    thr = np.where((pick > 0.8) & (pick <= 0.9), INT32_MAX, thr)
    return np.clip(thr, INT32_MIN, INT32_MAX).astype(np.int32), (rng.random(n) < 0.5).astype(np.uint8)


def padded(words):
    buf = np.zeros(kernels.padded_shape(*words.shape), np.uint64)
    kernels.interior(buf)[:] = words
    return buf


def check_stem(rng):
    h, w = (int(v) for v in rng.integers(1, 14, 2))
    c, n_out = int(rng.choice([1, 3])), int(rng.integers(1, 100))
    k, s = int(rng.choice([1, 3, 5])), int(rng.choice([1, 2]))
    x = rng.integers(0, 256, (h, w, c), dtype=np.uint8)
    wt = rng.integers(-128, 128, (n_out, k, k, c)).astype(np.int8)
    thr, flip = edge_thresholds(rng, reference.stem_acc(x, wt, s))
    want = reference.stem(x, wt, thr, flip, s)
    pl = np.zeros(kernels.stem_planes_shape(h, w, c, k, s), np.int32)
    kernels.stem_pad(x, k, s, pl)
    out = np.zeros(kernels.padded_shape(*want.shape), np.uint64)
    wtt = np.ascontiguousarray(wt.astype(np.int32).reshape(n_out, -1).T)
    kernels.stem_rows(pl, wtt, thr, flip, k, s, 1, out, 0, want.shape[0])
    return np.array_equal(kernels.interior(out), want), f"h={h} w={w} c={c} out={n_out} k={k} s={s}"


def _two_plane_rules(rng, y):
    """Rules of a ternary output (app/bits.py): lo and hi thresholds per channel, flattened to 2C."""
    t1, f = edge_thresholds(rng, y)
    t2, _ = edge_thresholds(rng, y)
    lo = np.where(f == 0, np.minimum(t1, t2), np.maximum(t1, t2))  # lo (v >= 0) holds more often than hi
    hi = np.where(f == 0, np.maximum(t1, t2), np.minimum(t1, t2))
    return np.concatenate([lo, hi]).astype(np.int32), np.concatenate([f, f])


def ternary_want(y, thr, flip):
    """The two-plane output the threshold rules imply, stated plainly: bits of lo then hi, packed."""
    n = y.shape[-1]
    lo = bits.threshold_bits(y, thr[:n], flip[:n])
    hi = bits.threshold_bits(y, thr[n:], flip[n:])
    return bits.pack(np.concatenate([lo, hi], axis=-1))


def check_stem_ternary(rng):
    h, w = (int(v) for v in rng.integers(1, 14, 2))
    c, n_out = int(rng.choice([1, 3])), int(rng.integers(1, 100))
    k, s = int(rng.choice([1, 3, 5])), int(rng.choice([1, 2]))
    x = rng.integers(0, 256, (h, w, c), dtype=np.uint8)
    wt = rng.integers(-128, 128, (n_out, k, k, c)).astype(np.int8)
    y = reference.stem_acc(x, wt, s)
    thr, flip = _two_plane_rules(rng, y)
    want = ternary_want(y, thr, flip)
    pl = np.zeros(kernels.stem_planes_shape(h, w, c, k, s), np.int32)
    kernels.stem_pad(x, k, s, pl)
    out = np.zeros(kernels.padded_shape(*want.shape), np.uint64)
    wtt = np.ascontiguousarray(wt.astype(np.int32).reshape(n_out, -1).T)
    kernels.stem_rows(pl, wtt, thr, flip, k, s, 2, out, 0, want.shape[0])
    return np.array_equal(kernels.interior(out), want), f"h={h} w={w} c={c} out={n_out} k={k} s={s}"


def check_bconv_ternary(rng):
    h, w, c, n_out, k, s, x, wt = _bconv_case(rng)
    y = reference.bconv_y(x, c, wt, s)
    thr, flip = _two_plane_rules(rng, y)
    want = ternary_want(y, thr, flip)
    out = np.zeros(kernels.padded_shape(*want.shape), np.uint64)
    nup = kernels.patch_layout(k, c)[0]
    kernels.bconv_bits_rows(padded(x), kernels.compact_weights(wt, c), nup, k * k * c, k, s, thr, flip,
                            2, out, 0, want.shape[0])
    return np.array_equal(kernels.interior(out), want), f"h={h} w={w} c={c} out={n_out} k={k} s={s}"


def check_ternary_pack(rng):
    h, w, c = int(rng.integers(1, 6)), int(rng.integers(1, 6)), int(rng.choice(CHANNELS))
    d = float(rng.choice([0.5, 0.25, 1.0]))
    r = rng.normal(0, 1, (h, w, c)).astype(np.float32)
    edge = rng.random(r.shape)
    r = np.where(edge < 0.1, np.float32(d), np.where(edge > 0.9, np.float32(-d), r)).astype(np.float32)
    lo = (r + np.float32(d)) < 0
    hi = (r - np.float32(d)) < 0
    want = bits.pack(np.concatenate([lo, hi], axis=-1))
    out = np.zeros(kernels.padded_shape(h, w, want.shape[-1]), np.uint64)
    kernels.ternary_pack_rows(r, d, out, 0, h)
    return np.array_equal(kernels.interior(out), want), f"h={h} w={w} c={c} band={d}"


def _tconv_case(rng):
    h, w = (int(v) for v in rng.integers(1, 10, 2))
    c, n_out = int(rng.choice([32, 64, 96, 128, 256])), out_channels(rng)
    k, s = int(rng.choice([1, 3])), int(rng.choice([1, 2]))
    x = bits.ternary_pack(rng.integers(-1, 2, (h, w, c)))
    wt = bits.pack(rng.random((n_out, k, k, c)) < 0.5)
    return h, w, c, n_out, k, s, x, wt


def check_tconv_bits(rng):
    h, w, c, n_out, k, s, x, wt = _tconv_case(rng)
    y = reference.bconv_y(x, c, wt, s, "ternary")
    planes = int(rng.choice([1, 2]))
    thr, flip = _two_plane_rules(rng, y) if planes == 2 else edge_thresholds(rng, y)
    want = ternary_want(y, thr, flip) if planes == 2 else bits.pack(bits.threshold_bits(y, thr, flip))
    out = np.zeros(kernels.padded_shape(*want.shape), np.uint64)
    kernels.tconv_bits_rows(padded(x), kernels.compact_weights(wt, c), c // 32, k, s, thr, flip, planes,
                            out, 0, want.shape[0])
    return np.array_equal(kernels.interior(out), want), f"h={h} w={w} c={c} out={n_out} k={k} s={s} planes={planes}"


def check_tconv_real(rng):
    h, w, c, n_out, k, s, x, wt = _tconv_case(rng)
    scale = rng.normal(0, 0.1, n_out).astype(np.float32)
    bias = rng.normal(0, 1, n_out).astype(np.float32)
    want = reference.bconv_real(x, c, wt, s, scale, bias, "ternary")
    out = np.zeros(want.shape, np.float32)
    kernels.tconv_real_rows(padded(x), kernels.compact_weights(wt, c), c // 32, k, s, scale, bias, out,
                            0, want.shape[0])
    return np.array_equal(out, want), f"h={h} w={w} c={c} out={n_out} k={k} s={s}"


def _bconv_case(rng):
    h, w = (int(v) for v in rng.integers(1, 10, 2))
    c, n_out = int(rng.choice(CHANNELS)), out_channels(rng)
    k, s = int(rng.choice([1, 3])), int(rng.choice([1, 2]))
    x = bits.pack(rng.random((h, w, c)) < rng.uniform(0.1, 0.9))
    wt = bits.pack(rng.random((n_out, k, k, c)) < 0.5)
    return h, w, c, n_out, k, s, x, wt


def check_bconv_bits(rng):
    h, w, c, n_out, k, s, x, wt = _bconv_case(rng)
    thr, flip = edge_thresholds(rng, reference.bconv_y(x, c, wt, s))
    want = reference.bconv_bits(x, c, wt, s, thr, flip)
    out = np.zeros(kernels.padded_shape(*want.shape), np.uint64)
    nup = kernels.patch_layout(k, c)[0]
    kernels.bconv_bits_rows(padded(x), kernels.compact_weights(wt, c), nup, k * k * c, k, s, thr, flip,
                            1, out, 0, want.shape[0])
    return np.array_equal(kernels.interior(out), want), f"h={h} w={w} c={c} out={n_out} k={k} s={s}"


def check_bconv_real(rng):
    h, w, c, n_out, k, s, x, wt = _bconv_case(rng)
    scale = rng.normal(0, 1, n_out).astype(np.float32)
    bias = rng.normal(0, 3, n_out).astype(np.float32)
    want = reference.bconv_real(x, c, wt, s, scale, bias)
    out = np.zeros(want.shape, np.float32)
    nup = kernels.patch_layout(k, c)[0]
    kernels.bconv_real_rows(padded(x), kernels.compact_weights(wt, c), nup, k * k * c, k, s, scale, bias,
                            out, 0, want.shape[0])
    return np.array_equal(out, want), f"h={h} w={w} c={c} out={n_out} k={k} s={s}"


def check_rbconv(rng):
    """A Bi-Real block as the Network runs it: sign_pack -> bconv_real -> add, equal to the reference."""
    h, w = (int(v) for v in rng.integers(1, 10, 2))
    c, k = int(rng.choice(CHANNELS)), int(rng.choice([1, 3]))
    r = rng.normal(0, 2, (h, w, c)).astype(np.float32)
    r[rng.random((h, w, c)) < 0.1] = 0.0  # sign(0) = +1
    r[rng.random((h, w, c)) < 0.05] = -0.0
    wt = bits.pack(rng.random((c, k, k, c)) < 0.5)
    scale = rng.normal(0, 1, c).astype(np.float32)
    bias = rng.normal(0, 3, c).astype(np.float32)
    want = reference.rbconv(r, wt, scale, bias)
    signs = np.zeros(kernels.padded_shape(h, w, bits.n_words(c)), np.uint64)
    kernels.sign_pack_rows(r, signs, 0, h)
    scratch, out = np.zeros_like(r), np.zeros_like(r)
    kernels.bconv_real_rows(signs, kernels.compact_weights(wt, c), kernels.patch_layout(k, c)[0], k * k * c, k, 1,
                            scale, bias, scratch, 0, h)
    kernels.add_rows(r, scratch, out, 0, h)
    ok = np.array_equal(kernels.interior(signs), bits.pack(r)) and np.array_equal(out, want)
    return ok, f"h={h} w={w} c={c} k={k}"


def with_rbconv(model, blocks=2, seed=0):
    """``model`` with Bi-Real blocks on the stream of its real-output bconv."""
    rng = np.random.default_rng(seed)
    at = next(i for i, la in enumerate(model.layers) if output_kind(la) == "real")
    c = model.layers[at].params["out_ch"]
    new = []
    for _ in range(blocks):
        wt = bits.pack(rng.random((c, 3, 3, c)) < 0.5)
        t = {"weight": wt, "scale": rng.normal(0, 0.05, c).astype(np.float32), "bias": rng.normal(0, 1, c).astype(np.float32)}
        new.append(Layer("rbconv", {"kernel": 3, "stride": 1, "in_ch": c, "out_ch": c}, t))
    layers = model.layers[: at + 1] + tuple(new) + model.layers[at + 1 :]
    return dataclasses.replace(model, layers=layers)


def check_pool(rng):
    h, w = (int(v) for v in rng.integers(1, 12, 2))
    c = int(rng.choice(CHANNELS))
    x = bits.pack(rng.random((h, w, c)) < 0.8)
    want = reference.maxpool2(x, c)
    out = np.zeros(kernels.padded_shape(*want.shape), np.uint64)
    kernels.pool_rows(padded(x), out, 0, want.shape[0])
    return np.array_equal(kernels.interior(out), want), f"h={h} w={w} c={c}"


def check_head(rng):
    h, w = (int(v) for v in rng.integers(1, 7, 2))
    c, n_out = int(rng.choice(CHANNELS)), int(rng.integers(1, 40))
    r = rng.normal(0, 4, (h, w, c)).astype(np.float32)
    wt = rng.normal(0, 1, (n_out, c)).astype(np.float32)
    b = rng.normal(0, 1, n_out).astype(np.float32)
    out = np.zeros((h, w, n_out), np.float32)
    kernels.head_rows(r, wt, b, out, 0, h)
    scale = np.abs(r).reshape(-1, c) @ np.abs(wt).T + np.abs(b)
    err = np.abs(out - reference.head(r, wt, b)).reshape(-1, n_out)
    v = np.where(rng.random((h, w, c)) < 0.5, -1, 1)
    pm = np.zeros((h, w, c), np.float32)
    kernels.unpack_pm1(padded(bits.pack(v)), c, pm)
    ok = bool(np.all(err <= 1e-6 * scale + 1e-6)) and np.array_equal(pm, v.astype(np.float32))
    return ok, f"h={h} w={w} c={c} out={n_out}"


def check_network(rng, model, frame_seed):
    x = synthetic_frame(frame_seed, model.input_width, model.input_height, model.channels)
    x = x.reshape(model.input_height, model.input_width, model.channels)
    head, trace = Network(model).forward(x, trace=True)
    want_head, want_trace = reference.forward(model, x, trace=True)
    same = sorted(trace) == sorted(want_trace) and all(np.array_equal(trace[i], want_trace[i]) for i in want_trace)
    close = np.allclose(head, want_head, rtol=1e-5, atol=1e-5)
    return same and close, f"{model.input_width}x{model.input_height}x{model.channels} traces={same} head={close}"


def check_detector(rng, model, frame_seed):
    det = Detector(model=model)
    img = synthetic_frame(frame_seed, 320, 240, 3)
    got = det.detect(img)
    x, lb = letterbox(img, model.input_width, model.input_height, model.channels)
    want = decode(reference.forward(model, x), model.anchors, det.input_size, lb, img.shape, det.score_threshold,
                  det.nms_iou, det.max_detections)
    ok = got.shape == want.shape and np.allclose(got, want, rtol=1e-4, atol=1e-3)
    return ok, f"{len(got)} detections"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=12, help="random cases per kernel")
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    print(f"kernel_checks on {platform.machine()}, numpy {np.__version__}, vector bytes {kernels.VEC_BYTES}")
    failures, total = [], 0
    checks = [("stem", check_stem), ("bconv_bits", check_bconv_bits), ("bconv_real", check_bconv_real),
              ("rbconv", check_rbconv), ("maxpool2", check_pool), ("head+unpack", check_head),
              ("stem_tern", check_stem_ternary), ("bconv_tern", check_bconv_ternary),
              ("ternary_pack", check_ternary_pack), ("tconv_bits", check_tconv_bits), ("tconv_real", check_tconv_real)]
    for name, fn in checks:
        t0, bad = time.time(), 0
        for _ in range(args.cases):
            ok, desc = fn(rng)
            total += 1
            if not ok:
                bad += 1
                failures.append(f"{name}: {desc}")
        print(f"  {name:12s} {args.cases - bad}/{args.cases} equal  ({time.time() - t0:.1f} s)")
    models = [("default 192x192x1", random_model(seed=3), 5),
              ("odd 45x37x3", random_model(seed=4, width=45, height=37, channels=3, classes=("a", "b"),
                                          widths=(5, 70, 33, 129, 64)), 6),
              ("default + 2 rbconv", with_rbconv(random_model(seed=5)), 7),
              ("ternary 0,2,4 + 2 ternary rbconv", random_model(seed=8, blocks=2, ternary=(0, 2, 4, 8, 9)), 8),
              ("ternary, odd widths", random_model(seed=9, width=45, height=37, widths=(16, 40, 70, 65, 33), blocks=1,
                                                   ternary=(0, 2, 4, 6, 8)), 9)]
    for name, model, seed in models:
        for label, fn in (("network", check_network), ("detector", check_detector)):
            ok, desc = fn(rng, model, seed)
            total += 1
            print(f"  {label:12s} {name}: {'equal' if ok else 'MISMATCH'} ({desc})")
            if not ok:
                failures.append(f"{label} {name}: {desc}")
    for f in failures:
        print("MISMATCH", f)
    print(f"kernel_checks: {total - len(failures)}/{total} passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
