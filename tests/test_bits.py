import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from app import bits


@pytest.mark.fuzz
@given(st.integers(1, 300), st.integers(0, 2**32 - 1))
def test_pack_unpack_roundtrip_and_layout(channels, seed):
    rng = np.random.default_rng(seed)
    v = np.where(rng.random((3, channels)) < 0.5, 1, -1).astype(np.int8)
    words = bits.pack(v)
    assert words.shape == (3, bits.n_words(channels)) and words.dtype == np.uint64
    np.testing.assert_array_equal(bits.unpack(words, channels), v)
    # channel c is bit c % 64 of word c // 64; bits past the last channel stay 0
    for c in range(channels):
        bit = (int(words[0, c // 64]) >> (c % 64)) & 1
        assert bit == (v[0, c] < 0)
    tail = channels % 64
    if tail:
        assert np.all(words[:, -1] >> np.uint64(tail) == 0)


def test_sign_of_zero_is_plus_one():
    assert bits.pack(np.array([0.0, -0.0, -1e-9, 5.0]))[0] == 0b0100


@pytest.mark.fuzz
@given(st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=20))
def test_popcount_matches_python(values):
    words = np.array(values, dtype=np.uint64)
    assert bits.popcount(words).tolist() == [bin(v).count("1") for v in values]


def test_popcount_table_fallback(monkeypatch):
    words = np.array([0, 1, 2**64 - 1, 0xF0F0, 2**63], dtype=np.uint64)
    monkeypatch.delattr(np, "bitwise_count", raising=False)
    assert bits.popcount(words).tolist() == [0, 1, 64, 8, 1]


@pytest.mark.fuzz
@given(st.integers(1, 300), st.integers(0, 2**32 - 1))
def test_xor_popcount_dot_equals_real_dot(channels, seed):
    rng = np.random.default_rng(seed)
    a = np.where(rng.random(channels) < 0.5, 1, -1)
    w = np.where(rng.random(channels) < 0.5, 1, -1)
    assert bits.dot(bits.pack(a), bits.pack(w), channels) == int(a @ w)


def test_threshold_rule_edges():
    y = np.array([[5, 5, 5, 5, 0, 0]])
    t = np.array([5, 5, 6, 4, bits.INT32_MIN, bits.INT32_MAX])
    f = np.array([0, 1, 1, 1, 0, 0])
    # True means bit 1 (-1)
    assert bits.threshold_bits(y, t, f).tolist() == [[False, False, False, True, False, True]]


def test_n_words_rejects_zero():
    with pytest.raises(ValueError):
        bits.n_words(0)
    assert [bits.n_words(c) for c in (1, 64, 65, 128, 300)] == [1, 1, 2, 2, 5]
