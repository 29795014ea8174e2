"""Every numba kernel equals its numpy twin (app/reference.py) bit for bit."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from app import bits, kernels, reference
from tests.arm.kernel_checks import _two_plane_rules

# The ARM meter runs the same cases without pytest; one copy of the case makers serves both.
from tests.arm.kernel_checks import edge_thresholds as _edge_thresholds
from tests.arm.kernel_checks import padded as _padded
from tests.arm.kernel_checks import ternary_want as _ternary_want


def _row_splits(rng, n):
    cuts = sorted(set([0, n] + list(rng.integers(0, n + 1, 2))))
    return list(zip(cuts[:-1], cuts[1:], strict=True))


@pytest.mark.fuzz
@given(st.integers(1, 13), st.integers(1, 13), st.sampled_from([1, 3]), st.integers(1, 130),
       st.sampled_from([1, 3, 5]), st.sampled_from([1, 2]), st.integers(0, 2**32 - 1))
def test_stem(h, w, c, n_out, k, s, seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (h, w, c), dtype=np.uint8)
    wt = rng.integers(-128, 128, (n_out, k, k, c)).astype(np.int8)
    y = reference.stem_acc(x, wt, s)
    thr, flip = _edge_thresholds(rng, y)
    want = reference.stem(x, wt, thr, flip, s)
    u = np.zeros(kernels.stem_planes_shape(h, w, c, k, s), np.int32)
    kernels.stem_pad(x, k, s, u)
    out = np.zeros(kernels.padded_shape(want.shape[0], want.shape[1], want.shape[2]), np.uint64)
    wtt = np.ascontiguousarray(wt.astype(np.int32).reshape(n_out, -1).T)
    for r0, r1 in _row_splits(rng, want.shape[0]):
        kernels.stem_rows(u, wtt, thr, flip, k, s, 1, out, r0, r1)
    np.testing.assert_array_equal(kernels.interior(out), want)
    assert not out[0].any() and not out[-1].any() and not out[:, 0].any() and not out[:, -1].any()


def _bconv_case(h, w, c, n_out, k, s, seed):
    rng = np.random.default_rng(seed)
    x = bits.pack(rng.random((h, w, c)) < rng.uniform(0.1, 0.9))
    wt = bits.pack(rng.random((n_out, k, k, c)) < 0.5)
    return rng, x, wt


@pytest.mark.fuzz
@given(st.integers(1, 9), st.integers(1, 9), st.integers(1, 300), st.integers(1, 130),
       st.sampled_from([1, 3]), st.sampled_from([1, 2]), st.integers(0, 2**32 - 1))
def test_bconv_bits(h, w, c, n_out, k, s, seed):
    rng, x, wt = _bconv_case(h, w, c, n_out, k, s, seed)
    y = reference.bconv_y(x, c, wt, s)
    thr, flip = _edge_thresholds(rng, y)
    want = reference.bconv_bits(x, c, wt, s, thr, flip)
    out = np.zeros(kernels.padded_shape(*want.shape), np.uint64)
    for r0, r1 in _row_splits(rng, want.shape[0]):
        kernels.bconv_bits_rows(_padded(x), kernels.compact_weights(wt, c), kernels.patch_layout(k, c)[0],
                                k * k * c, k, s, thr, flip, 1, out, r0, r1)
    np.testing.assert_array_equal(kernels.interior(out), want)
    if n_out % 64:
        assert not np.any(out[..., -1] >> np.uint64(n_out % 64)), "bits past the last channel must stay 0"


@pytest.mark.fuzz
@given(st.integers(1, 9), st.integers(1, 9), st.integers(1, 300), st.integers(1, 70),
       st.sampled_from([1, 3]), st.sampled_from([1, 2]), st.integers(0, 2**32 - 1))
def test_bconv_real(h, w, c, n_out, k, s, seed):
    rng, x, wt = _bconv_case(h, w, c, n_out, k, s, seed)
    scale = rng.normal(0, 1, n_out).astype(np.float32)
    bias = rng.normal(0, 3, n_out).astype(np.float32)
    want = reference.bconv_real(x, c, wt, s, scale, bias)
    out = np.full(want.shape, np.nan, np.float32)
    for r0, r1 in _row_splits(rng, want.shape[0]):
        kernels.bconv_real_rows(_padded(x), kernels.compact_weights(wt, c), kernels.patch_layout(k, c)[0],
                                k * k * c, k, s, scale, bias, out, r0, r1)
    np.testing.assert_array_equal(out, want)


@pytest.mark.fuzz
@given(st.integers(1, 11), st.integers(1, 11), st.integers(1, 300), st.integers(0, 2**32 - 1))
def test_pool(h, w, c, seed):
    rng = np.random.default_rng(seed)
    x = bits.pack(rng.random((h, w, c)) < 0.8)
    want = reference.maxpool2(x, c)
    out = np.zeros(kernels.padded_shape(*want.shape), np.uint64)
    kernels.pool_rows(_padded(x), out, 0, want.shape[0])
    np.testing.assert_array_equal(kernels.interior(out), want)


@pytest.mark.fuzz
@given(st.integers(1, 6), st.integers(1, 6), st.integers(1, 300), st.integers(1, 40), st.integers(0, 2**32 - 1))
def test_head_and_unpack(h, w, c, n_out, seed):
    rng = np.random.default_rng(seed)
    r = rng.normal(0, 4, (h, w, c)).astype(np.float32)
    wt = rng.normal(0, 1, (n_out, c)).astype(np.float32)
    b = rng.normal(0, 1, n_out).astype(np.float32)
    out = np.zeros((h, w, n_out), np.float32)
    kernels.head_rows(r, wt, b, out, 0, h)
    # float32 sums in any order: allow float32 rounding relative to the sum of |terms|
    scale = np.abs(r).reshape(-1, c) @ np.abs(wt).T + np.abs(b)
    err = np.abs(out - reference.head(r, wt, b)).reshape(-1, n_out)
    assert np.all(err <= 1e-6 * scale + 1e-6), float((err / scale).max())
    v = np.where(rng.random((h, w, c)) < 0.5, -1, 1)
    pm = np.zeros((h, w, c), np.float32)
    kernels.unpack_pm1(_padded(bits.pack(v)), c, pm)
    np.testing.assert_array_equal(pm, v.astype(np.float32))


def test_popcount_intrinsic_edges():
    from numba import njit

    @njit
    def pc(v):
        return kernels.popc(v)

    for v in (0, 1, 2**63, 2**64 - 1, 0x5555555555555555):
        assert pc(np.uint64(v)) == bin(v).count("1")


@pytest.mark.parametrize("check", ["check_stem_ternary", "check_bconv_ternary", "check_ternary_pack",
                                   "check_tconv_bits", "check_tconv_real"])
def test_ternary_kernels_equal_the_rules_stated_plainly(check):
    """Two planes from one accumulator: the stem, the bits bconv and the stream's pack (40 seeded cases each)."""
    from tests.arm import kernel_checks

    rng = np.random.default_rng(99)
    bad = [desc for ok, desc in (getattr(kernel_checks, check)(rng) for _ in range(40)) if not ok]
    assert not bad, bad


def test_parallel_wrappers_match_serial():
    rng, x, wt = _bconv_case(11, 7, 70, 65, 3, 1, 5)
    thr = rng.integers(-20, 20, 65).astype(np.int32)
    flip = (rng.random(65) < 0.5).astype(np.uint8)
    want = reference.bconv_bits(x, 70, wt, 1, thr, flip)
    out = np.zeros(kernels.padded_shape(*want.shape), np.uint64)
    kernels.bconv_bits_par(_padded(x), kernels.compact_weights(wt, 70), kernels.patch_layout(3, 70)[0],
                           9 * 70, 3, 1, thr, flip, 1, out, 4)
    np.testing.assert_array_equal(kernels.interior(out), want)


@pytest.mark.slow
def test_pi_vector_width_layout(tmp_path):
    """The Pi uses 16-byte vectors (one NEON register): run the kernel checks with that layout here."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, XNORCAM_VEC_BYTES="16", NUMBA_CACHE_DIR=str(tmp_path / "numba"))
    proc = subprocess.run([sys.executable, str(root / "tests" / "arm" / "kernel_checks.py"), "--cases", "6"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "vector bytes 16" in proc.stdout and "passed" in proc.stdout


@pytest.mark.parametrize("c", [3616, 7424])
@pytest.mark.parametrize("fill", ["ones", "random"])
def test_patches_longer_than_the_16_bit_sums_hold(fill, c):
    """The XOR counts gather in 16-bit lanes and go to int32 every few thousand patch bytes: patches of
    8,352 bytes (3x3 over 7,424 channels) whose counts reach 66,816, past 16 bits, still count exactly.
    3x3 over 3,616 channels (counts up to 32,544) is the longest patch whose bits are thresholded in
    16-bit lanes (xorbits*, andbits*); 7,424 takes the int32 sums and bitmask64 instead."""
    n_out, k = 64, 3
    rng = np.random.default_rng(3)
    if fill == "ones":  # every input bit -1, every weight +1: each count is the whole patch
        x = bits.pack(np.ones((3, 3, c), bool))
        wt = bits.pack(np.zeros((n_out, k, k, c), bool))
    else:
        x = bits.pack(rng.random((3, 3, c)) < 0.5)
        wt = bits.pack(rng.random((n_out, k, k, c)) < 0.5)
    nup = kernels.patch_layout(k, c)[0]
    y = reference.bconv_y(x, c, wt, 1)
    scale, bias = np.ones(n_out, np.float32), np.zeros(n_out, np.float32)
    real = np.zeros(y.shape, np.float32)
    kernels.bconv_real_rows(_padded(x), kernels.compact_weights(wt, c), nup, k * k * c, k, 1, scale, bias, real, 0, 3)
    np.testing.assert_array_equal(real, y.astype(np.float32))
    thr, flip = _edge_thresholds(rng, y)
    out = np.zeros(kernels.padded_shape(*y.shape[:2], 1), np.uint64)
    kernels.bconv_bits_rows(_padded(x), kernels.compact_weights(wt, c), nup, k * k * c, k, 1, thr, flip, 1, out, 0, 3)
    np.testing.assert_array_equal(kernels.interior(out), reference.bconv_bits(x, c, wt, 1, thr, flip))
    # over a ternary input, one masked pass (sign and nonzero bytes) of the same length
    v = np.ones((3, 3, c), np.int8) * -1 if fill == "ones" else rng.integers(-1, 2, (3, 3, c))
    xt = bits.ternary_pack(v)
    yt = reference.bconv_y(xt, c, wt, 1, "ternary")
    realt = np.zeros(yt.shape, np.float32)
    kernels.tconv_real_rows(_padded(xt), kernels.compact_weights(wt, c), c // 32, k, 1, scale, bias, realt, 0, 3)
    np.testing.assert_array_equal(realt, yt.astype(np.float32))
    for planes in (1, 2):
        thr, flip = _edge_thresholds(rng, yt) if planes == 1 else _two_plane_rules(rng, yt)
        want = bits.pack(bits.threshold_bits(yt, thr, flip)) if planes == 1 else _ternary_want(yt, thr, flip)
        outt = np.zeros(kernels.padded_shape(*want.shape), np.uint64)
        kernels.tconv_bits_rows(_padded(xt), kernels.compact_weights(wt, c), c // 32, k, 1, thr, flip, planes, outt, 0, 3)
        np.testing.assert_array_equal(kernels.interior(outt), want)
