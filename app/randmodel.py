"""A random-weight model of the default architecture (for benchmarks and tests).

Thresholds are calibrated on a synthetic frame (each set to the median of its
channel's pre-activation), so about half the bits of every layer are set, as
in a trained network; a random threshold would leave most channels constant
and make the benchmark and the parity tests meaningless.

    python -m app.randmodel --out FILE [--seed N] [--width W --height H --channels C] [--blocks N --ternary I,J]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np

from app import bits, reference
from app.modelfile import Layer, Model, param, write_model

DEFAULT_WIDTHS = (32, 64, 128, 256, 256)
# Anchors (w, h) for a 192x192 input, scaled with the input size: upright people.
BASE_ANCHORS = ((20.0, 44.0), (48.0, 104.0), (110.0, 170.0))


def synthetic_frame(seed: int = 0, width: int = 320, height: int = 240, channels: int = 3) -> np.ndarray:
    """A camera-like uint8 frame: smooth shapes, edges and sensor noise (BGR or grey)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(max(2, height // 24), max(2, width // 24), 3), dtype=np.uint8)
    img = cv2.resize(base, (width, height), interpolation=cv2.INTER_CUBIC).astype(np.int16)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        x1, y1 = x0 + int(rng.integers(8, max(9, width // 3))), y0 + int(rng.integers(16, max(17, height // 2)))
        img[y0:y1, x0:x1] += rng.integers(-90, 90, size=3, dtype=np.int16)
    img += rng.integers(-6, 7, size=img.shape, dtype=np.int16)
    img = np.clip(img, 0, 255).astype(np.uint8)
    return img if channels == 3 else cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)


def _thresholds(y: np.ndarray, rng, flip_fraction: float = 0.1):
    """Per-channel median threshold (half the bits set) and some flipped channels."""
    yy = y.reshape(-1, y.shape[-1])
    thr = np.median(yy, axis=0).round().astype(np.int64)
    flip = (rng.random(y.shape[-1]) < flip_fraction).astype(np.uint8)
    thr = np.clip(thr, bits.INT32_MIN, bits.INT32_MAX).astype(np.int32)
    return thr, flip


def _ternary_thresholds(y: np.ndarray, rng, flip_fraction: float = 0.1):
    """Threshold rules of shape (2, C) for a ternary output: about a third of each value -1, 0, +1.

    Row 0 (lo, "v >= 0") and row 1 (hi, "v == +1") share a channel's flip. For flip 0 (+1 iff y >= t)
    the lo threshold is the lower one, for flip 1 (+1 iff y <= t) the higher one, so v == +1 implies
    v >= 0 and the bit pair (1, 0) never occurs (app/bits.py).
    """
    yy = y.reshape(-1, y.shape[-1])
    q1, q2 = (np.quantile(yy, q, axis=0).round().astype(np.int64) for q in (1 / 3, 2 / 3))
    q2 = np.maximum(q2, q1 + 1)  # a narrow channel still gets a zero band of at least one integer
    flip = (rng.random(y.shape[-1]) < flip_fraction).astype(np.uint8)
    lo = np.where(flip == 1, q2, q1)
    hi = np.where(flip == 1, q1, q2)
    thr = np.clip(np.stack([lo, hi]), bits.INT32_MIN, bits.INT32_MAX).astype(np.int32)
    return thr, np.stack([flip, flip])


def _random_words(rng, shape_prefix: tuple, channels: int) -> np.ndarray:
    return bits.pack(rng.random(shape_prefix + (channels,)) < 0.5)


def random_model(
    seed: int = 0,
    width: int = 192,
    height: int = 192,
    channels: int = 1,
    classes=("person",),
    widths=DEFAULT_WIDTHS,
    blocks: int = 0,
    ternary=(),
    band: float = 0.5,
) -> Model:
    """The default architecture (ARCHITECTURE.md) with random weights and calibrated thresholds.

    ``blocks`` Bi-Real blocks (rbconv) follow the real-output bconv. ``ternary`` names layer indices
    (as in the returned model, like train's ``ternary``) whose activation is ternary: a stem or bits
    bconv then has ``output: "ternary"``, an rbconv ``input: "ternary"`` with the given ``band``.
    The defaults give the binary model, with the same weights as ever for a seed.
    """
    if len(widths) != 5:
        raise ValueError(f"widths must have 5 entries (stem, 3 binary convs, real conv), got {widths}")
    n_layers = 9 + blocks  # stem, 3 x (pool, bconv), real bconv, blocks, head
    signed = {0, 2, 4, 6, *range(8, 8 + blocks)}
    bad = sorted(set(ternary) - signed)
    if bad:
        raise ValueError(f"ternary: layers {bad} take no sign (of {n_layers}; signed: {sorted(signed)})")
    rng = np.random.default_rng(seed)
    classes = tuple(classes)
    anchors = np.array(BASE_ANCHORS, dtype=np.float32) * np.float32(min(width, height) / 192.0)
    n_out = anchors.shape[0] * (5 + len(classes))
    frame = synthetic_frame(seed, width, height, channels)
    x = frame.reshape(height, width, channels)
    layers = []

    def rule(y):
        """Thresholds of the next layer (its index is len(layers)), its params' output, its packed activation."""
        output = "ternary" if len(layers) in ternary else "bits"
        thr, flip = _ternary_thresholds(y, rng) if output == "ternary" else _thresholds(y, rng)
        return thr, flip, output, reference.activate(y, thr, flip, output)

    w_stem = rng.integers(-64, 65, size=(widths[0], 3, 3, channels)).astype(np.int8)
    y = reference.stem_acc(x, w_stem, 2)
    thr, flip, kind, act = rule(y)
    params = {"kernel": 3, "stride": 2, "in_ch": channels, "out_ch": widths[0]}
    if kind == "ternary":
        params["output"] = kind  # absent means "bits": the binary stem's params stay as they always were
    layers.append(Layer("stem", params, {"weight": w_stem, "threshold": thr, "flip": flip}))
    c = widths[0]
    for i, out_ch in enumerate(widths[1:]):
        last = i == len(widths) - 2
        if i < 3:
            layers.append(Layer("maxpool2", {}, {}))
            act = reference.maxpool2(act, c, kind)
        w = _random_words(rng, (out_ch, 3, 3), c)
        y = reference.bconv_y(act, c, w, 1, kind)
        params = {"kernel": 3, "stride": 1, "in_ch": c, "out_ch": out_ch, "output": "real"}
        if last:
            k = 9 * c
            scale = (rng.uniform(0.5, 1.5, out_ch) / np.sqrt(k)).astype(np.float32)
            med = np.median(y.reshape(-1, out_ch), axis=0)
            bias = (-scale * med + rng.normal(0, 0.1, out_ch)).astype(np.float32)
            layers.append(Layer("bconv", params, {"weight": w, "scale": scale, "bias": bias}))
            r = reference.bconv_real(act, c, w, 1, scale, bias, kind)
        else:
            thr, flip, kind, act = rule(y)
            params["output"] = kind
            layers.append(Layer("bconv", params, {"weight": w, "threshold": thr, "flip": flip}))
        c = out_ch
    for _ in range(blocks):
        params = {"kernel": 3, "stride": 1, "in_ch": c, "out_ch": c}
        if len(layers) in ternary:
            params.update(input="ternary", band=float(band))
        t = {"weight": _random_words(rng, (c, 3, 3), c),
             "scale": (rng.uniform(0.1, 0.5, c) / np.sqrt(9 * c)).astype(np.float32),
             "bias": rng.normal(0, 0.05, c).astype(np.float32)}
        layers.append(Layer("rbconv", params, t))
        r = reference.rbconv(r, t["weight"], t["scale"], t["bias"], param(layers[-1], "band"))
    hw = rng.normal(0, 1.0 / np.sqrt(c), size=(n_out, c)).astype(np.float32)
    hb = rng.normal(0, 0.1, size=n_out).astype(np.float32)
    hb[4 :: 5 + len(classes)] -= 2.5  # objectness: a few boxes per frame, not hundreds
    layers.append(Layer("head", {"in_ch": c, "out_ch": n_out}, {"weight": hw, "bias": hb}))
    description = "random weights, thresholds calibrated on a synthetic frame"
    if blocks or ternary:
        description += f"; {blocks} Bi-Real blocks, ternary layers {sorted(ternary)}"
    return Model(
        input_width=width,
        input_height=height,
        channels=channels,
        class_names=classes,
        anchors=anchors,
        layers=tuple(layers),
        metadata={"name": "random", "description": description, "seed": seed},
    )


def model_file_or_random(path, tmp_dir) -> Path:
    """``path`` if given, else the shipped default, else a seed-0 random model written into ``tmp_dir``.

    Benchmarks use it so they run (on the right architecture) before a trained model exists.
    """
    from app.detector import DEFAULT_MODEL

    if path:
        return Path(path)
    if DEFAULT_MODEL.exists():
        return DEFAULT_MODEL
    out = Path(tmp_dir) / "random.xnc"
    write_model(out, random_model(seed=0))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m app.randmodel", description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="model file to write")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--width", type=int, default=192)
    ap.add_argument("--height", type=int, default=192)
    ap.add_argument("--channels", type=int, choices=(1, 3), default=1)
    ap.add_argument("--classes", default="person", help="comma-separated class names")
    ap.add_argument("--blocks", type=int, default=0, help="Bi-Real blocks (rbconv) after the real-output bconv")
    ap.add_argument("--ternary", default="", help="layer indices with ternary activations, e.g. 0,2,8")
    args = ap.parse_args(argv)
    ternary = tuple(int(v) for v in args.ternary.split(",") if v.strip())
    model = random_model(args.seed, args.width, args.height, args.channels, tuple(args.classes.split(",")),
                         blocks=args.blocks, ternary=ternary)
    write_model(args.out, model)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
