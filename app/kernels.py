"""numba kernels of the binary network. Their numpy twins live in app/reference.py.

Activation buffers of binary layers are packed uint64 (H+2, W+2, words) with a
one-pixel border of zero words: a zero word is +1 on every channel, which is
exactly the +1 padding of app/bits.py, so 3x3 convolutions read their padding
for free and never branch on borders. ``interior(buf)`` is the real tensor.

Convolutions gather each output pixel's k*k patch into one contiguous run of
K words (the weights are stored the same way, (out, k, k, words) flattened), so
the XOR+popcount reduction is a single straight loop that LLVM vectorises
(AVX-512 VPOPCNTQ on x86, CNT on NEON).

Every ``*_rows`` kernel computes output rows [r0, r1) so that the same code
runs single-threaded or split over threads (``*_par`` wrappers, prange).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.extending import intrinsic

BORDER = 1  # border of every binary activation buffer; enough for kernels up to 3x3


@intrinsic
def popc(typingctx, x):
    """llvm.ctpop on an unsigned 64-bit word."""
    if not isinstance(x, types.Integer):
        return None
    sig = x(x)

    def codegen(context, builder, signature, args):
        return builder.ctpop(args[0])

    return sig, codegen


def padded_shape(h: int, w: int, words: int) -> tuple[int, int, int]:
    return (h + 2 * BORDER, w + 2 * BORDER, words)


def interior(buf: np.ndarray) -> np.ndarray:
    return buf[BORDER:-BORDER, BORDER:-BORDER]


@njit(cache=True, inline="always")
def _bit1(y, t, f):
    # bit 1 (-1) iff y < t (flip 0) or y > t (flip 1): the rule of app/bits.py
    if f:
        return np.uint64(1) if y > t else np.uint64(0)
    return np.uint64(1) if y < t else np.uint64(0)


# ------------------------------------------------------------------ stem
@njit(cache=True)
def stem_pad(x, k, u):
    """u (H+2p, W+2p, C) int32 <- x - 128, zero border (zero padding in u)."""
    p = k // 2
    h, w, c = x.shape
    u[:] = 0
    for yy in range(h):
        for xx in range(w):
            for ch in range(c):
                u[yy + p, xx + p, ch] = np.int32(x[yy, xx, ch]) - 128


@njit(cache=True)
def stem_rows(u, wt, thr, flip, k, stride, out, r0, r1):
    """Integer stem conv + threshold -> packed bits into the interior of out.

    u: padded int32 input (stem_pad); wt: int32 (k*k*C, out_ch) (tap-major, so the
    per-tap update is a straight vector loop over output channels).
    """
    c = u.shape[2]
    n_out = wt.shape[1]
    wo = out.shape[1] - 2 * BORDER
    words = out.shape[2]
    kc = k * c
    acc = np.empty(n_out, np.int32)
    for oy in range(r0, r1):
        for ox in range(wo):
            acc[:] = 0
            for ky in range(k):
                for j in range(kc):
                    v = u[oy * stride + ky, ox * stride + j // c, j % c]
                    row = ky * kc + j
                    for o in range(n_out):
                        acc[o] += v * wt[row, o]
            for wi in range(words):
                word = np.uint64(0)
                top = min(n_out, (wi + 1) * 64)
                for o in range(wi * 64, top):
                    word |= _bit1(acc[o], thr[o], flip[o]) << np.uint64(o - wi * 64)
                out[oy + BORDER, ox + BORDER, wi] = word


# ------------------------------------------------------------------ pool
@njit(cache=True)
def pool_rows(inp, out, r0, r1):
    """2x2 stride-2 AND of the interior of inp into the interior of out (odd last row/col dropped)."""
    wo = out.shape[1] - 2 * BORDER
    words = out.shape[2]
    for oy in range(r0, r1):
        iy = 2 * oy + BORDER
        for ox in range(wo):
            ix = 2 * ox + BORDER
            for wi in range(words):
                out[oy + BORDER, ox + BORDER, wi] = (
                    inp[iy, ix, wi] & inp[iy, ix + 1, wi] & inp[iy + 1, ix, wi] & inp[iy + 1, ix + 1, wi]
                )


# ------------------------------------------------------------------ binary conv
@njit(cache=True, inline="always")
def _gather(inp, k, sy, sx, patch):
    """Copy the k x k x words patch whose top-left padded position is (sy, sx) into patch."""
    words = inp.shape[2]
    run = k * words
    n = 0
    for ky in range(k):
        for j in range(run):
            patch[n + j] = inp[sy + ky, sx + j // words, j % words]
        n += run


@njit(cache=True, inline="always")
def _xor_popcount(patch, w, o, kw):
    s = 0
    for j in range(kw):
        s += popc(patch[j] ^ w[o, j])
    return s


@njit(cache=True)
def bconv_bits_rows(inp, w, kk, k, stride, thr, flip, out, r0, r1):
    """Binary conv (+1 padding from the border) with fused thresholds -> packed bits.

    inp: padded (Hi+2, Wi+2, wi) uint64; w: (out_ch, k*k*wi) uint64; kk = K = k*k*in_ch.
    """
    n_out, kw = w.shape
    off = BORDER - k // 2
    wo = out.shape[1] - 2 * BORDER
    words = out.shape[2]
    patch = np.empty(kw, np.uint64)
    for oy in range(r0, r1):
        for ox in range(wo):
            _gather(inp, k, oy * stride + off, ox * stride + off, patch)
            for wi in range(words):
                word = np.uint64(0)
                top = min(n_out, (wi + 1) * 64)
                for o in range(wi * 64, top):
                    y = kk - 2 * _xor_popcount(patch, w, o, kw)
                    word |= _bit1(y, thr[o], flip[o]) << np.uint64(o - wi * 64)
                out[oy + BORDER, ox + BORDER, wi] = word


@njit(cache=True)
def bconv_real_rows(inp, w, kk, k, stride, scale, bias, out, r0, r1):
    """Binary conv with a real output r = scale * y + bias (float32, (Ho, Wo, out_ch), no border)."""
    n_out, kw = w.shape
    off = BORDER - k // 2
    wo = out.shape[1]
    patch = np.empty(kw, np.uint64)
    for oy in range(r0, r1):
        for ox in range(wo):
            _gather(inp, k, oy * stride + off, ox * stride + off, patch)
            for o in range(n_out):
                y = kk - 2 * _xor_popcount(patch, w, o, kw)
                out[oy, ox, o] = scale[o] * np.float32(y) + bias[o]


# ------------------------------------------------------------------ head
@njit(cache=True)
def head_rows(r, w, b, out, r0, r1):
    """1x1 float conv (H, W, in) -> (H, W, out); float64 accumulation, float32 result."""
    n_out, n_in = w.shape
    for oy in range(r0, r1):
        for ox in range(r.shape[1]):
            for o in range(n_out):
                s = np.float64(b[o])
                for i in range(n_in):
                    s += np.float64(r[oy, ox, i]) * np.float64(w[o, i])
                out[oy, ox, o] = np.float32(s)


@njit(cache=True)
def unpack_pm1(inp, channels, out):
    """Packed interior of inp -> ±1 float32 (H, W, channels) for a head fed by bits."""
    for yy in range(out.shape[0]):
        for xx in range(out.shape[1]):
            for c in range(channels):
                bit = (inp[yy + BORDER, xx + BORDER, c // 64] >> np.uint64(c % 64)) & np.uint64(1)
                out[yy, xx, c] = np.float32(1.0) - np.float32(2.0) * np.float32(bit)


# ------------------------------------------------------------------ threads
@njit(cache=True, parallel=True)
def stem_par(u, wt, thr, flip, k, stride, out, chunks):
    n = out.shape[0] - 2 * BORDER
    for i in prange(chunks):
        stem_rows(u, wt, thr, flip, k, stride, out, i * n // chunks, (i + 1) * n // chunks)


@njit(cache=True, parallel=True)
def pool_par(inp, out, chunks):
    n = out.shape[0] - 2 * BORDER
    for i in prange(chunks):
        pool_rows(inp, out, i * n // chunks, (i + 1) * n // chunks)


@njit(cache=True, parallel=True)
def bconv_bits_par(inp, w, kk, k, stride, thr, flip, out, chunks):
    n = out.shape[0] - 2 * BORDER
    for i in prange(chunks):
        bconv_bits_rows(inp, w, kk, k, stride, thr, flip, out, i * n // chunks, (i + 1) * n // chunks)


@njit(cache=True, parallel=True)
def bconv_real_par(inp, w, kk, k, stride, scale, bias, out, chunks):
    n = out.shape[0]
    for i in prange(chunks):
        bconv_real_rows(inp, w, kk, k, stride, scale, bias, out, i * n // chunks, (i + 1) * n // chunks)
