"""The reference is the definition: check it against naive loops and the XOR/popcount identity."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from app import bits, reference


def _naive_bconv_y(v, w, stride):
    """v (H,W,C) ±1, w (O,k,k,C) ±1, padding +1."""
    h, wd, c = v.shape
    o, k = w.shape[0], w.shape[1]
    p = k // 2
    ho, wo = (h + 2 * p - k) // stride + 1, (wd + 2 * p - k) // stride + 1
    y = np.zeros((ho, wo, o), np.int64)
    for oy in range(ho):
        for ox in range(wo):
            for ky in range(k):
                for kx in range(k):
                    iy, ix = oy * stride + ky - p, ox * stride + kx - p
                    a = v[iy, ix] if 0 <= iy < h and 0 <= ix < wd else np.ones(c, np.int64)
                    y[oy, ox] += w[:, ky, kx, :].astype(np.int64) @ a.astype(np.int64)
    return y


@pytest.mark.fuzz
@given(st.integers(1, 7), st.integers(1, 7), st.integers(1, 130), st.integers(1, 5),
       st.sampled_from([1, 3]), st.sampled_from([1, 2]), st.integers(0, 2**32 - 1))
def test_bconv_y_matches_naive_and_xor_form(h, w, c, o, k, s, seed):
    rng = np.random.default_rng(seed)
    v = np.where(rng.random((h, w, c)) < 0.5, 1, -1)
    wt = np.where(rng.random((o, k, k, c)) < 0.5, 1, -1)
    y = reference.bconv_y(bits.pack(v), c, bits.pack(wt), s)
    np.testing.assert_array_equal(y, _naive_bconv_y(v, wt, s))
    # the XOR/popcount identity at one output pixel, padding words = 0 (+1)
    p = k // 2
    padded = np.zeros((h + 2 * p, w + 2 * p, bits.n_words(c)), np.uint64)
    padded[p:p + h, p:p + w] = bits.pack(v)
    patch = padded[0:k, 0:k]
    flat = bits.dot(patch.reshape(1, -1), bits.pack(wt).reshape(o, -1), k * k * c)
    assert flat.tolist() == y[0, 0].tolist()


@pytest.mark.fuzz
@given(st.integers(1, 9), st.integers(1, 9), st.sampled_from([1, 3]), st.integers(1, 4),
       st.sampled_from([1, 2]), st.integers(0, 2**32 - 1))
def test_stem_acc_matches_naive(h, w, c, o, s, seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (h, w, c), dtype=np.uint8)
    wt = rng.integers(-128, 128, (o, 3, 3, c)).astype(np.int8)
    u = np.pad(x.astype(np.int64) - 128, ((1, 1), (1, 1), (0, 0)))
    ho, wo = (h - 1) // s + 1, (w - 1) // s + 1
    want = np.zeros((ho, wo, o), np.int64)
    for oy in range(ho):
        for ox in range(wo):
            patch = u[oy * s:oy * s + 3, ox * s:ox * s + 3]
            want[oy, ox] = np.einsum("yxc,oyxc->o", patch, wt.astype(np.int64))
    np.testing.assert_array_equal(reference.stem_acc(x, wt, s), want)


@pytest.mark.fuzz
@given(st.integers(1, 9), st.integers(1, 9), st.integers(1, 200), st.integers(0, 2**32 - 1))
def test_maxpool_is_and_of_words(h, w, c, seed):
    rng = np.random.default_rng(seed)
    words = bits.pack(rng.random((h, w, c)) < 0.7)
    out = reference.maxpool2(words, c)
    h2, w2 = h // 2, w // 2
    assert out.shape == (h2, w2, bits.n_words(c))
    want = words[0:2 * h2:2, 0:2 * w2:2] & words[1:2 * h2:2, 0:2 * w2:2] & words[0:2 * h2:2, 1:2 * w2:2] & words[1:2 * h2:2, 1:2 * w2:2]
    np.testing.assert_array_equal(out, want)


def test_forward_trace_shapes(rand_model):
    x = np.full((192, 192, 1), 100, np.uint8)
    head, trace = reference.forward(rand_model, x, trace=True)
    assert head.shape == (12, 12, 18) and head.dtype == np.float32
    assert sorted(trace) == list(range(8))
    assert trace[0].shape == (96, 96, 1) and trace[7].dtype == np.float32
    np.testing.assert_array_equal(reference.forward(rand_model, x), head)
