"""The numpy twin of every kernel: slow, obvious, the definition.

Binary layers are computed as real convolutions of unpacked ±1 tensors
(padded with +1) followed by the threshold rule of app/bits.py, never with
XOR/popcount, so the fast kernels are checked against an independent statement.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from app import bits
from app.modelfile import Model


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


def stem(x, weight, threshold, flip, stride) -> np.ndarray:
    y = stem_acc(x, weight, stride)
    return bits.pack(bits.threshold_bits(y, threshold, flip))


def maxpool2(words: np.ndarray, channels: int) -> np.ndarray:
    """2x2 stride-2 max-pool of the ±1 values (odd last row/column dropped), repacked."""
    v = bits.unpack(words, channels)
    h, w = v.shape[0] // 2 * 2, v.shape[1] // 2 * 2
    v = v[:h, :w]
    pooled = np.maximum(np.maximum(v[0::2, 0::2], v[0::2, 1::2]), np.maximum(v[1::2, 0::2], v[1::2, 1::2]))
    return bits.pack(pooled)


def bconv_y(words: np.ndarray, in_ch: int, weight: np.ndarray, stride: int) -> np.ndarray:
    """Integer pre-activation of a binary conv: real conv of ±1 tensors padded with +1. (Ho,Wo,out) int64."""
    k = weight.shape[1]
    x = bits.unpack(words, in_ch).astype(np.float64)
    cols = _patches(x, k, stride, 1.0)
    w = bits.unpack(weight, in_ch).reshape(weight.shape[0], -1).astype(np.float64)
    return np.rint(cols @ w.T).astype(np.int64)


def bconv_bits(words, in_ch, weight, stride, threshold, flip) -> np.ndarray:
    y = bconv_y(words, in_ch, weight, stride)
    return bits.pack(bits.threshold_bits(y, threshold, flip))


def bconv_real(words, in_ch, weight, stride, scale, bias) -> np.ndarray:
    y = bconv_y(words, in_ch, weight, stride)
    return (np.asarray(scale, np.float32) * y.astype(np.float32) + np.asarray(bias, np.float32)).astype(np.float32)


def rbconv(r, weight, scale, bias) -> np.ndarray:
    """Bi-Real block: the real stream plus the real output of a binary conv of its signs (stride 1)."""
    r = np.asarray(r, np.float32)
    return (r + bconv_real(bits.pack(r), r.shape[-1], weight, 1, scale, bias)).astype(np.float32)


def head(r: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """1x1 float conv: (H,W,in) float32 -> (H,W,out) float32."""
    r = np.asarray(r, dtype=np.float32)
    out = r.reshape(-1, r.shape[-1]).astype(np.float64) @ weight.T.astype(np.float64) + bias.astype(np.float64)
    return out.astype(np.float32).reshape(r.shape[0], r.shape[1], -1)


def check_input(model: Model, x) -> np.ndarray:
    want = (model.input_height, model.input_width, model.channels)
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.shape != want:
        got = (getattr(x, "dtype", type(x).__name__), getattr(x, "shape", None))
        raise ValueError(f"expected a letterboxed uint8 input of shape {want}, got {got[0]} {got[1]}")
    return x


def forward(model: Model, x: np.ndarray, trace: bool = False):
    """Run the whole network on a letterboxed uint8 (H,W,C) input; returns the head grid (and the trace)."""
    x = check_input(model, x)
    out, traced, channels = x, {}, model.channels
    for i, layer in enumerate(model.layers):
        p, t = layer.params, layer.tensors
        if layer.op == "stem":
            out = stem(out, t["weight"], t["threshold"], t["flip"], p["stride"])
            channels = p["out_ch"]
        elif layer.op == "maxpool2":
            out = maxpool2(out, channels)
        elif layer.op == "bconv":
            if p["output"] == "bits":
                out = bconv_bits(out, p["in_ch"], t["weight"], p["stride"], t["threshold"], t["flip"])
            else:
                out = bconv_real(out, p["in_ch"], t["weight"], p["stride"], t["scale"], t["bias"])
            channels = p["out_ch"]
        elif layer.op == "rbconv":
            out = rbconv(out, t["weight"], t["scale"], t["bias"])
        elif layer.op == "head":
            if out.dtype == np.uint64:
                out = bits.unpack(out, channels).astype(np.float32)
            out = head(out, t["weight"], t["bias"])
            continue
        traced[i] = out
    return (out, traced) if trace else out
