"""The bit convention of xnorcam, written once. Everything else obeys it.

Values and bits
    A binary value is +1 or -1. It is stored as one bit: **bit 0 means +1,
    bit 1 means -1** (the sign bit, as in IEEE floats).

sign(0)
    sign(x) = +1 when x >= 0, else -1. So a pre-activation of exactly zero
    (or exactly at its threshold, see below) gives +1, bit 0.

Packing
    Channels are the last axis and are packed 64 to a ``uint64`` word,
    little-endian within the word: channel ``c`` lives in word ``c // 64``,
    bit ``c % 64`` (value ``1 << (c % 64)``). An array of C channels packs to
    ``ceil(C / 64)`` words. Bits past the last channel are always 0, in
    activations and in weights alike, so they never count in a popcount.

Padding of binary layers
    Binary convolutions pad with **+1** (bit 0, an all-zero word), on every
    channel. Training must pad the same way (``F.pad(x, ..., value=+1.0)``
    on the ±1 tensor, then convolve with no padding), never with zeros,
    which have no binary encoding. The padded positions are part of the dot
    product: K always counts every tap of the kernel.

Dot product
    For a ±1 input patch a and ±1 weights w of K = kh * kw * C_in values,
    ``a · w = K - 2 * popcount(a XOR w)``, summed over the patch's words.

Thresholds (BatchNorm + sign, folded at export)
    A layer's integer pre-activation y (the dot product of a binary layer,
    the integer accumulator of the stem) becomes a bit through two per-channel
    integers: ``threshold[c]`` (int32) and ``flip[c]`` (0 or 1)::

        flip == 0:  output +1 (bit 0)  iff  y >= threshold   (BN slope > 0)
        flip == 1:  output +1 (bit 0)  iff  y <= threshold   (BN slope < 0)

    A constant channel (slope 0) is flip 0 with threshold INT32_MIN
    (always +1) or INT32_MAX (always -1).

Max-pool on bits
    2x2 max-pool of ±1 values is a bitwise **AND** of the four words: the
    max is -1 (bit 1) only when all four are -1. Because sign is monotone
    non-decreasing, max(sign(x_i)) == sign(max(x_i)): pooling the bits after
    the sign equals pooling the real pre-activations before it. The runtime
    and the trainer both pool after the sign, so they agree exactly whatever
    the BatchNorm's slope.

Ternary activations (a layer's ``output: "ternary"``, an rbconv's ``input: "ternary"``)
    A ternary value v is -1, 0 or +1: the mean of two signs, v = (lo + hi) / 2 with
    lo = sign(z + d) and hi = sign(z - d) for the layer's value z and band d. A
    ternary tensor of C channels is stored as 2C binary channels packed as above:
    channels 0..C-1 hold lo ("v >= 0"), channels C..2C-1 hold hi ("v == +1"). So
    -1 is bits (1, 1), 0 is (0, 1), +1 is (0, 0); (1, 0) never occurs. Each of the
    2C channels has its own threshold rule (threshold and flip of shape (2, C): row
    0 for lo, row 1 for hi). Padding is +1 on every one of the 2C bits (v = +1),
    and 2x2 max-pool is still the AND of the words: both planes are monotone in v.
    A binary conv over a ternary input of C channels computes
    ``y = sum w * v = (dot(lo, w) + dot(hi, w)) / 2``, an integer in [-K, K] of
    either parity (K = kh * kw * C); its thresholds (or its scale) apply to that y.

The helpers below are the plain numpy statement of this convention; kernels
and the trainer use them to pack, unpack and count.
"""

from __future__ import annotations

import numpy as np

WORD_BITS = 64
INT32_MIN = np.iinfo(np.int32).min
INT32_MAX = np.iinfo(np.int32).max
_BYTE_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.int64)


def n_words(channels: int) -> int:
    """Words needed to hold ``channels`` bits."""
    if channels < 1:
        raise ValueError(f"channel count must be >= 1, got {channels}")
    return (channels + WORD_BITS - 1) // WORD_BITS


def to_bits(values: np.ndarray) -> np.ndarray:
    """±1 (or any real) values to booleans: True (bit 1) where the value is < 0."""
    return np.asarray(values) < 0


def pack(values: np.ndarray) -> np.ndarray:
    """Pack the last axis of a ±1 array (or a bool array of bits) into uint64 words.

    Real inputs are signed first (x >= 0 -> +1 -> bit 0). Returns shape
    ``values.shape[:-1] + (n_words(C),)``.
    """
    values = np.asarray(values)
    bits = values if values.dtype == np.bool_ else to_bits(values)
    c = bits.shape[-1]
    words = n_words(c)
    padded = np.zeros(bits.shape[:-1] + (words * WORD_BITS,), dtype=np.uint64)
    padded[..., :c] = bits
    padded = padded.reshape(bits.shape[:-1] + (words, WORD_BITS))
    shifts = np.arange(WORD_BITS, dtype=np.uint64)
    return np.bitwise_or.reduce(padded << shifts, axis=-1).astype(np.uint64)


def unpack(words: np.ndarray, channels: int) -> np.ndarray:
    """Inverse of :func:`pack`: uint64 words to a ±1 int8 array with ``channels`` on the last axis."""
    words = np.asarray(words, dtype=np.uint64)
    if words.shape[-1] != n_words(channels):
        raise ValueError(
            f"{words.shape[-1]} words cannot hold exactly {channels} channels "
            f"(expected {n_words(channels)})"
        )
    shifts = np.arange(WORD_BITS, dtype=np.uint64)
    bits = (words[..., None] >> shifts) & np.uint64(1)
    bits = bits.reshape(words.shape[:-1] + (words.shape[-1] * WORD_BITS,))[..., :channels]
    return (1 - 2 * bits.astype(np.int8)).astype(np.int8)


def popcount(words: np.ndarray) -> np.ndarray:
    """Per-element popcount of unsigned integer words (numpy reference)."""
    words = np.asarray(words, dtype=np.uint64)
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(words).astype(np.int64)
    # numpy 1.x (Bookworm's apt numpy 1.24): count the bytes through a table.
    as_bytes = words[..., None].view(np.uint8)
    return _BYTE_POPCOUNT[as_bytes].sum(axis=-1, dtype=np.int64)


def dot(a_words: np.ndarray, w_words: np.ndarray, k: int) -> np.ndarray:
    """``K - 2 * popcount(a XOR w)`` summed over the last axis."""
    return k - 2 * popcount(np.bitwise_xor(a_words, w_words)).sum(axis=-1)


def threshold_bits(y: np.ndarray, threshold: np.ndarray, flip: np.ndarray) -> np.ndarray:
    """Apply the per-channel threshold rule to integer pre-activations y (channels last).

    Returns booleans: True is bit 1 (-1).
    """
    y = np.asarray(y, dtype=np.int64)
    t = np.asarray(threshold, dtype=np.int64)
    f = np.asarray(flip).astype(bool)
    plus = np.where(f, y <= t, y >= t)
    return ~plus


def ternary_pack(values: np.ndarray) -> np.ndarray:
    """Pack the last axis of a -1/0/+1 array (C channels) as 2C binary channels: lo = v >= 0, hi = v > 0."""
    v = np.asarray(values)
    if not np.all((v == -1) | (v == 0) | (v == 1)):
        raise ValueError("ternary values must be -1, 0 or +1")
    return pack(np.concatenate([v < 0, v <= 0], axis=-1))


def ternary_unpack(words: np.ndarray, channels: int) -> np.ndarray:
    """Inverse of :func:`ternary_pack`: 2C packed binary channels to a -1/0/+1 int8 array of C channels."""
    pm = unpack(words, 2 * channels).astype(np.int16)
    return ((pm[..., :channels] + pm[..., channels:]) // 2).astype(np.int8)
