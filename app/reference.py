"""The numpy twin of every kernel: slow, obvious, the definition.

Binary layers are computed as real convolutions of unpacked ±1 tensors
(padded with +1) followed by the threshold rule of app/bits.py, never with
XOR/popcount, so the fast kernels are checked against an independent statement.
Ternary activations (app/bits.py) are unpacked to their -1/0/+1 values and convolved
the same way, never through the two bit planes, for the same reason.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from app import bits
from app.modelfile import Model, check_input, output_kind, param


def _patches(x: np.ndarray, kernel: int, stride: int, pad_value) -> np.ndarray:
    """(H,W,C) -> (Ho, Wo, k*k*C) patches in (ky, kx, c) order, padded by kernel // 2."""
    p = kernel // 2
    xp = np.pad(x, ((p, p), (p, p), (0, 0)), constant_values=pad_value)
    win = sliding_window_view(xp, (kernel, kernel), axis=(0, 1))  # (Hp-k+1, Wp-k+1, C, k, k)
    win = win[::stride, ::stride]
    win = np.moveaxis(win, 2, -1)  # (Ho, Wo, k, k, C)
    return win.reshape(win.shape[0], win.shape[1], -1)


def stem_acc(x: np.ndarray, weight: np.ndarray, stride: int) -> np.ndarray:
    """Integer accumulator of the stem: sum weight * (pixel - 128), zero padding in u. (Ho,Wo,out) int64."""
    k = weight.shape[1]
    u = x.astype(np.int64) - 128
    cols = _patches(u, k, stride, 0)
    w = weight.reshape(weight.shape[0], -1).astype(np.int64)
    return cols @ w.T


def values(words: np.ndarray, channels: int, kind: str = "bits") -> np.ndarray:
    """A packed activation of ``channels`` logical channels to its int8 values: ±1 (bits) or -1/0/+1 (ternary)."""
    if kind == "ternary":
        return bits.ternary_unpack(words, channels)  # 2 * channels bits: the lo plane, then the hi plane
    if kind == "bits":
        return bits.unpack(words, channels)
    raise ValueError(f"unknown activation kind {kind!r}")


def activate(y: np.ndarray, threshold: np.ndarray, flip: np.ndarray, output: str = "bits") -> np.ndarray:
    """Integer pre-activations (channels last) through the threshold rule, packed.

    bits: one rule per channel (threshold, flip of shape (C,)), C packed bits. ternary: one rule per
    bit plane (shape (2, C): row 0 lo, row 1 hi), packed as the 2C channels lo then hi (app/bits.py).
    """
    if output == "bits":
        return bits.pack(bits.threshold_bits(y, threshold, flip))
    if output == "ternary":
        lo = bits.threshold_bits(y, threshold[0], flip[0])  # True = bit 1 = -1
        hi = bits.threshold_bits(y, threshold[1], flip[1])
        return bits.pack(np.concatenate([lo, hi], axis=-1))
    raise ValueError(f"unknown output {output!r}")


def stem(x, weight, threshold, flip, stride, output="bits") -> np.ndarray:
    y = stem_acc(x, weight, stride)
    return activate(y, threshold, flip, output)


def maxpool2(words: np.ndarray, channels: int, kind: str = "bits") -> np.ndarray:
    """2x2 stride-2 max-pool of the ±1 (or -1/0/+1) values (odd last row/column dropped), repacked."""
    v = values(words, channels, kind)
    h, w = v.shape[0] // 2 * 2, v.shape[1] // 2 * 2
    v = v[:h, :w]
    pooled = np.maximum(np.maximum(v[0::2, 0::2], v[0::2, 1::2]), np.maximum(v[1::2, 0::2], v[1::2, 1::2]))
    return bits.ternary_pack(pooled) if kind == "ternary" else bits.pack(pooled)


def conv_y(v: np.ndarray, weight: np.ndarray, stride: int) -> np.ndarray:
    """y = sum w * v: real conv of int values v (H,W,C) with packed ±1 weights, padded with +1. (Ho,Wo,out) int64."""
    k, in_ch = weight.shape[1], v.shape[-1]
    cols = _patches(np.asarray(v).astype(np.float64), k, stride, 1.0)
    w = bits.unpack(weight, in_ch).reshape(weight.shape[0], -1).astype(np.float64)
    return np.rint(cols @ w.T).astype(np.int64)


def bconv_y(words: np.ndarray, in_ch: int, weight: np.ndarray, stride: int, in_kind: str = "bits") -> np.ndarray:
    """Integer pre-activation of a binary conv over a binary (or ternary) packed input of in_ch channels."""
    return conv_y(values(words, in_ch, in_kind), weight, stride)


def bconv_bits(words, in_ch, weight, stride, threshold, flip, in_kind="bits", output="bits") -> np.ndarray:
    """A bconv whose output is packed: binary bits, or (output="ternary") the 2 planes of a ternary activation."""
    y = bconv_y(words, in_ch, weight, stride, in_kind)
    return activate(y, threshold, flip, output)


def bconv_real(words, in_ch, weight, stride, scale, bias, in_kind="bits") -> np.ndarray:
    y = bconv_y(words, in_ch, weight, stride, in_kind)
    return _affine(y, scale, bias)


def _affine(y, scale, bias) -> np.ndarray:
    return (np.asarray(scale, np.float32) * y.astype(np.float32) + np.asarray(bias, np.float32)).astype(np.float32)


def ternary_of(r, band) -> np.ndarray:
    """-1/0/+1 of a real stream with zero band |r| < band: (sign(r + band) + sign(r - band)) / 2, in float32.

    sign(0) = +1, so r == band gives +1 and r == -band gives 0.
    """
    r, b = np.asarray(r, np.float32), np.float32(band)
    lo = np.where(r + b >= 0, 1, -1)
    hi = np.where(r - b >= 0, 1, -1)
    return ((lo + hi) // 2).astype(np.int8)


def rbconv(r, weight, scale, bias, band=None) -> np.ndarray:
    """Bi-Real block: the real stream plus the real output of a binary conv of its signs (stride 1).

    With a band (the block's input="ternary") the conv reads the stream's ternary (:func:`ternary_of`).
    """
    r = np.asarray(r, np.float32)
    v = bits.unpack(bits.pack(r), r.shape[-1]) if band is None else ternary_of(r, band)
    return (r + _affine(conv_y(v, weight, 1), scale, bias)).astype(np.float32)


def head(r: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """1x1 float conv: (H,W,in) float32 -> (H,W,out) float32."""
    r = np.asarray(r, dtype=np.float32)
    out = r.reshape(-1, r.shape[-1]).astype(np.float64) @ weight.T.astype(np.float64) + bias.astype(np.float64)
    return out.astype(np.float32).reshape(r.shape[0], r.shape[1], -1)


def forward(model: Model, x: np.ndarray, trace: bool = False):
    """Run the whole network on a letterboxed uint8 (H,W,C) input; returns the head grid (and the trace).

    The trace holds every layer's output but the head's: packed uint64 words for binary and ternary
    activations (2C channels for a ternary one of C), float32 for a real stream.
    """
    x = check_input(model, x)
    out, traced, channels, kind = x, {}, model.channels, "image"
    for i, layer in enumerate(model.layers):
        t = layer.tensors
        if layer.op == "stem":
            output = output_kind(layer)
            out = stem(out, t["weight"], t["threshold"], t["flip"], param(layer, "stride"), output)
            channels, kind = param(layer, "out_ch"), output
        elif layer.op == "maxpool2":
            out = maxpool2(out, channels, kind)
        elif layer.op == "bconv":
            output, in_ch, stride = output_kind(layer), param(layer, "in_ch"), param(layer, "stride")
            if output in ("bits", "ternary"):
                out = bconv_bits(out, in_ch, t["weight"], stride, t["threshold"], t["flip"], kind, output)
            else:
                out = bconv_real(out, in_ch, t["weight"], stride, t["scale"], t["bias"], kind)
            channels, kind = param(layer, "out_ch"), output
        elif layer.op == "rbconv":
            band = param(layer, "band") if param(layer, "input") == "ternary" else None
            out = rbconv(out, t["weight"], t["scale"], t["bias"], band)
        elif layer.op == "head":
            if kind == "ternary":
                raise ValueError(f"layer {i} (head): the head reads a real stream or bits, not a ternary activation")
            if kind == "bits":
                out = bits.unpack(out, channels).astype(np.float32)
            out = head(out, t["weight"], t["bias"])
            continue
        traced[i] = out
    return (out, traced) if trace else out
