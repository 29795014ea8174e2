"""The reference's ternary layers, checked by hand against the convention of app/bits.py.

Each check states the expected values directly (einsum over an explicitly padded v, the two
thresholds compared by hand, the float32 band boundaries), not through the reference's helpers.
"""

import numpy as np
import pytest

from app import bits, reference
from app.modelfile import validate
from app.randmodel import random_model, synthetic_frame


def _pm1(rng, shape):
    return np.where(rng.random(shape) < 0.5, 1, -1).astype(np.int64)


def _ternary(rng, shape):
    return rng.integers(-1, 2, shape).astype(np.int64)


def _by_hand_y(v, w, stride):
    """y = sum w * v over k x k patches of v padded with +1: v (H,W,C) ints, w (O,k,k,C) ±1."""
    k = w.shape[1]
    p = k // 2
    vp = np.pad(v, ((p, p), (p, p), (0, 0)), constant_values=1)
    ho, wo = (v.shape[0] + 2 * p - k) // stride + 1, (v.shape[1] + 2 * p - k) // stride + 1
    y = np.zeros((ho, wo, w.shape[0]), np.int64)
    for oy in range(ho):
        for ox in range(wo):
            patch = vp[oy * stride:oy * stride + k, ox * stride:ox * stride + k]
            y[oy, ox] = np.einsum("yxc,oyxc->o", patch, w)
    return y


def _plane_values(y, thr, flip):
    """-1/0/+1 from two threshold rules compared by hand: +1 passes both, 0 only lo, -1 neither."""
    def passes(t, f):
        return np.where(f == 1, y <= t, y >= t)

    lo, hi = passes(thr[0], flip[0]), passes(thr[1], flip[1])
    assert not np.any(hi & ~lo), "a hi-plane +1 with a lo-plane -1 is the bit pair (1, 0), which never occurs"
    return np.where(hi, 1, np.where(lo, 0, -1))


@pytest.mark.parametrize("h, w, c, o, k, s", [(5, 4, 3, 2, 3, 1), (6, 7, 40, 5, 3, 2), (3, 3, 64, 3, 1, 1),
                                             (4, 5, 33, 70, 3, 1)])
def test_ternary_bconv_y_is_the_sum_of_w_times_v(h, w, c, o, k, s):
    rng = np.random.default_rng(h * 1000 + c)
    v, wt = _ternary(rng, (h, w, c)), _pm1(rng, (o, k, k, c))
    words = bits.ternary_pack(v)
    assert words.shape == (h, w, bits.n_words(2 * c))
    y = reference.bconv_y(words, c, bits.pack(wt), s, "ternary")
    want = _by_hand_y(v, wt, s)
    np.testing.assert_array_equal(y, want)
    assert np.all(np.abs(y) <= k * k * c)
    # and the plane identity of app/bits.py: y = (dot(lo, w) + dot(hi, w)) / 2, each plane a ±1 tensor
    lo, hi = np.where(v >= 0, 1, -1), np.where(v > 0, 1, -1)
    np.testing.assert_array_equal(2 * y, _by_hand_y(lo, wt, s) + _by_hand_y(hi, wt, s))


def test_ternary_y_pads_with_plus_one_not_zero():
    v = np.zeros((1, 1, 1), np.int64)  # one zero pixel; every other tap of the 3x3 is padding
    w = np.ones((1, 3, 3, 1), np.int64)
    assert reference.bconv_y(bits.ternary_pack(v), 1, bits.pack(w), 1, "ternary").item() == 8


def _rules(rng, c):
    """Random (2, C) threshold rules with lo below hi in the +1 direction (mirrored for flip 1)."""
    flip = (rng.random(c) < 0.5).astype(np.uint8)
    a, b = np.sort(rng.integers(-3000, 3000, (2, c)), axis=0)
    thr = np.where(flip == 1, np.stack([b, a]), np.stack([a, b])).astype(np.int32)
    return thr, np.stack([flip, flip])


def test_ternary_stem_packs_the_values_of_its_two_thresholds():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (9, 11, 3), dtype=np.uint8)
    wt = rng.integers(-100, 101, (37, 3, 3, 3)).astype(np.int8)
    thr, flip = _rules(rng, 37)
    out = reference.stem(x, wt, thr, flip, 2, "ternary")
    assert out.dtype == np.uint64 and out.shape == (5, 6, bits.n_words(74))
    want = _plane_values(reference.stem_acc(x, wt, 2), thr, flip)
    assert {-1, 0, 1} <= set(np.unique(want).tolist())
    np.testing.assert_array_equal(bits.ternary_unpack(out, 37), want)
    # the binary output is untouched by the new argument
    np.testing.assert_array_equal(reference.stem(x, wt, thr[0], flip[0], 2), reference.stem(x, wt, thr[0], flip[0], 2, "bits"))


def test_ternary_bconv_output_and_real_output_over_ternary_input():
    rng = np.random.default_rng(2)
    v, wt = _ternary(rng, (6, 5, 50)), _pm1(rng, (30, 3, 3, 50))
    y = _by_hand_y(v, wt, 1)
    thr, flip = _rules(rng, 30)
    thr = (thr // 30).astype(np.int32)  # y is within +-450 here
    out = reference.bconv_bits(bits.ternary_pack(v), 50, bits.pack(wt), 1, thr, flip, "ternary", "ternary")
    np.testing.assert_array_equal(bits.ternary_unpack(out, 30), _plane_values(y, thr, flip))
    scale, bias = rng.normal(size=30).astype(np.float32), rng.normal(size=30).astype(np.float32)
    r = reference.bconv_real(bits.ternary_pack(v), 50, bits.pack(wt), 1, scale, bias, "ternary")
    np.testing.assert_array_equal(r, scale * y.astype(np.float32) + bias)


@pytest.mark.parametrize("h, w, c", [(4, 4, 3), (5, 7, 40), (2, 3, 64), (1, 5, 2)])
def test_ternary_maxpool_is_the_max_of_the_values_and_the_and_of_the_words(h, w, c):
    rng = np.random.default_rng(c)
    v = _ternary(rng, (h, w, c))
    words = bits.ternary_pack(v)
    out = reference.maxpool2(words, c, "ternary")
    h2, w2 = h // 2, w // 2
    want = np.zeros((h2, w2, c), np.int64)
    for y in range(h2):
        for x in range(w2):
            want[y, x] = v[2 * y:2 * y + 2, 2 * x:2 * x + 2].max(axis=(0, 1))
    np.testing.assert_array_equal(bits.ternary_unpack(out, c), want)
    anded = words[0:2 * h2:2, 0:2 * w2:2] & words[1:2 * h2:2, 0:2 * w2:2] & words[0:2 * h2:2, 1:2 * w2:2] & words[1:2 * h2:2, 1:2 * w2:2]
    np.testing.assert_array_equal(out, anded)


def test_ternary_of_the_stream_has_exact_float32_band_boundaries():
    band = 0.5
    r = np.array([0.5, -0.5, np.nextafter(np.float32(0.5), 0), np.nextafter(np.float32(-0.5), -1), 0.0, -0.0, 3, -3],
                 np.float32)
    assert reference.ternary_of(r, band).tolist() == [1, 0, 0, -1, 0, 0, 1, -1]
    # the band is used as a float32: with 0.1 (not exact in float32) r = -float32(0.1) is on the boundary, so 0
    r = np.array([np.float32(0.1), -np.float32(0.1)], np.float32)
    assert reference.ternary_of(r, 0.1).tolist() == [1, 0]


def test_ternary_rbconv_adds_the_conv_of_the_streams_ternary():
    # 1x1 kernel, weight +1, scale 1, bias 0: r' - r is exactly v
    band = 0.1
    b32 = np.float32(band)
    r = np.array([b32, -b32, np.nextafter(b32, 0), np.nextafter(-b32, np.float32(-1)), 0, 2, -2], np.float32)
    r = r.reshape(1, -1, 1)
    w = bits.pack(np.ones((1, 1, 1, 1)))
    out = reference.rbconv(r, w, np.ones(1, np.float32), np.zeros(1, np.float32), band)
    assert (out - r).ravel().tolist() == [1, 0, 0, -1, 0, 1, -1]
    # the binary block (no band) reads sign(r) instead
    out = reference.rbconv(r, w, np.ones(1, np.float32), np.zeros(1, np.float32))
    assert (out - r).ravel().tolist() == [1, -1, 1, -1, 1, 1, -1]


def test_ternary_rbconv_matches_the_hand_conv():
    rng = np.random.default_rng(3)
    r = rng.normal(0, 1, (5, 6, 20)).astype(np.float32)
    wt = _pm1(rng, (20, 3, 3, 20))
    scale, bias = rng.normal(size=20).astype(np.float32), rng.normal(size=20).astype(np.float32)
    band = 0.3
    v = np.where(r + np.float32(band) >= 0, 1, -1) + np.where(r - np.float32(band) >= 0, 1, -1)
    y = _by_hand_y(v // 2, wt, 1)
    want = r + (scale * y.astype(np.float32) + bias)
    np.testing.assert_array_equal(reference.rbconv(r, bits.pack(wt), scale, bias, band), want)


def test_forward_of_a_ternary_model_traces_2c_channel_words():
    m = random_model(seed=2, width=48, height=40, widths=(8, 16, 70, 24, 24), blocks=2, ternary=(0, 4, 9))
    validate(m)
    x = synthetic_frame(2, 48, 40, 1).reshape(40, 48, 1)
    head, trace = reference.forward(m, x, trace=True)
    assert head.shape == (2, 3, 18)
    assert [trace[i].shape[-1] for i in range(7)] == [1, 1, 1, 1, 3, 3, 1]  # 2 x 8 bits, 16, 2 x 70 = 140 bits, 24
    for i, c in ((0, 8), (1, 8), (4, 70), (5, 70)):
        assert trace[i].dtype == np.uint64
        pm = bits.unpack(trace[i], 2 * c)
        assert not np.any((pm[..., :c] == -1) & (pm[..., c:] == 1)), f"layer {i}: bit pair (1, 0)"
        assert set(np.unique(bits.ternary_unpack(trace[i], c)).tolist()) == {-1, 0, 1}
    # the chain by hand: layer 2 (bits bconv) reads the pooled ternary stem
    v = bits.ternary_unpack(trace[1], 8).astype(np.int64)
    wt = bits.unpack(m.layers[2].tensors["weight"], 8).astype(np.int64)
    y = _by_hand_y(v, wt, 1)
    np.testing.assert_array_equal(trace[2], bits.pack(bits.threshold_bits(y, m.layers[2].tensors["threshold"],
                                                                           m.layers[2].tensors["flip"])))
    # layer 9 (ternary rbconv) on layer 8's stream
    r, t = trace[8], m.layers[9].tensors
    v = np.where(r + np.float32(0.5) >= 0, 1, -1) + np.where(r - np.float32(0.5) >= 0, 1, -1)
    y = _by_hand_y(v // 2, bits.unpack(t["weight"], 24).astype(np.int64), 1)
    np.testing.assert_array_equal(trace[9], r + (t["scale"] * y.astype(np.float32) + t["bias"]))
