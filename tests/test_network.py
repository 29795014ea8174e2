"""The numba network equals the numpy reference network exactly (traces) and closely (head)."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from app import bits, reference
from app.modelfile import Layer, Model, validate
from app.network import Network
from app.randmodel import random_model, synthetic_frame


def _compare(model, x, threads=1):
    head, trace = Network(model, threads=threads).forward(x, trace=True)
    want_head, want_trace = reference.forward(model, x, trace=True)
    assert sorted(trace) == sorted(want_trace)
    for i in want_trace:
        assert trace[i].dtype == want_trace[i].dtype and trace[i].shape == want_trace[i].shape, i
        np.testing.assert_array_equal(trace[i], want_trace[i], err_msg=f"layer {i} ({model.layers[i].op})")
    np.testing.assert_allclose(head, want_head, rtol=1e-5, atol=1e-5)
    return trace


def _frame(model, seed):
    img = synthetic_frame(seed, model.input_width, model.input_height, model.channels)
    return img.reshape(model.input_height, model.input_width, model.channels)


def test_default_architecture_matches_reference(rand_model):
    trace = _compare(rand_model, _frame(rand_model, 1))
    # a meaningful test: the calibrated thresholds leave roughly half the bits set
    frac = bits.unpack(trace[6], 256).mean()
    assert -0.6 < frac < 0.6


@pytest.mark.fuzz
@given(st.integers(0, 2**16), st.integers(17, 70), st.integers(17, 70), st.sampled_from([1, 3]),
       st.lists(st.integers(1, 140), min_size=5, max_size=5), st.integers(1, 3))
def test_random_architectures_match_reference(seed, w, h, c, widths, n_classes):
    model = random_model(seed, w, h, c, tuple(f"c{i}" for i in range(n_classes)), tuple(widths))
    _compare(model, _frame(model, seed + 1))


@pytest.mark.parametrize("ternary,blocks", [((0,), 0), ((0, 2, 4), 0), ((2, 4, 6), 1), ((0, 2, 4, 6, 8, 9), 2), ((8,), 1)])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("widths", [(16, 40, 70, 65, 33), (32, 64, 96, 128, 64)], ids=["doubled", "masked"])
def test_ternary_layers_match_reference(ternary, blocks, threads, widths):
    """Two planes per ternary activation, read by one masked pass (whole 32-bit planes) or by the binary
    conv of both planes with the weights twice (other widths): the same packed words as the twin."""
    model = random_model(11, 58, 46, 1, ("a",), widths, blocks=blocks, ternary=ternary)
    masked = Network(model).masked
    assert bool(masked) == (widths[0] % 32 == 0)
    trace = _compare(model, _frame(model, 12), threads)
    for i in ternary:
        if model.layers[i].op != "rbconv":  # all three values occur: the check is not vacuous
            v = bits.ternary_unpack(trace[i], model.layers[i].params["out_ch"])
            assert {-1, 0, 1} <= set(np.unique(v).tolist()), f"layer {i}"


def _custom_model(rng, c_in=3):
    """Stem 5x5 s1, 1x1 stride-2 bconv, 3x3 stride-2 bconv, pool, head fed by bits (not by a real conv)."""
    def bconv(cin, cout, k, s):
        w = bits.pack(rng.random((cout, k, k, cin)) < 0.5)
        t = rng.integers(-k * k * cin // 4, k * k * cin // 4 + 1, cout).astype(np.int32)
        return Layer("bconv", {"kernel": k, "stride": s, "in_ch": cin, "out_ch": cout, "output": "bits"},
                     {"weight": w, "threshold": t, "flip": (rng.random(cout) < 0.5).astype(np.uint8)})
    layers = (
        Layer("stem", {"kernel": 5, "stride": 1, "in_ch": c_in, "out_ch": 70},
              {"weight": rng.integers(-9, 10, (70, 5, 5, c_in)).astype(np.int8),
               "threshold": rng.integers(-300, 300, 70).astype(np.int32), "flip": (rng.random(70) < 0.3).astype(np.uint8)}),
        bconv(70, 129, 1, 2),
        bconv(129, 65, 3, 2),
        Layer("maxpool2", {}, {}),
        Layer("head", {"in_ch": 65, "out_ch": 7}, {"weight": rng.normal(0, 1, (7, 65)).astype(np.float32),
                                                   "bias": np.zeros(7, np.float32)}),
    )
    m = Model(input_width=45, input_height=31, channels=c_in, class_names=("a", "b"),
              anchors=np.array([[4.0, 5.0]], np.float32), layers=layers)
    validate(m)
    return m


def test_custom_layers_strides_and_head_from_bits():
    rng = np.random.default_rng(7)
    model = _custom_model(rng)
    x = rng.integers(0, 256, (31, 45, 3), dtype=np.uint8)
    _compare(model, x)


def test_threads_match_reference(rand_model):
    _compare(rand_model, _frame(rand_model, 2), threads=2)


@pytest.mark.parametrize("threads", [2, 3, 4])
@pytest.mark.parametrize("size,widths,ternary,blocks", [
    ((58, 46), (32, 64, 96, 128, 64), (2, 4, 9), 2),  # rows 23, 11, 5, 2 after the pools: uneven splits
    ((45, 37), (16, 40, 70, 65, 33), (0, 2), 1),      # odd widths, the doubled ternary path
    ((192, 192), (32, 64, 128, 256, 256), (2, 4), 3),  # the shipped topology
], ids=["odd-masked", "odd-doubled", "shipped"])
def test_threads_give_the_same_bits_as_one_thread(threads, size, widths, ternary, blocks):
    """Splitting rows over threads changes no bit: every layer's output and the head, compared exactly."""
    model = random_model(5, *size, 1, ("a",), widths, blocks=blocks, ternary=ternary)
    x = _frame(model, 9)
    head1, trace1 = Network(model).forward(x, trace=True)
    headn, tracen = Network(model, threads=threads).forward(x, trace=True)
    assert sorted(trace1) == sorted(tracen)
    for i in trace1:
        assert np.array_equal(trace1[i], tracen[i]), f"layer {i} ({model.layers[i].op}), {threads} threads"
    assert np.array_equal(head1, headn)
    assert any(bits.unpack(t, 1).any() for t in trace1.values() if t.dtype == np.uint64)  # not all +1


@pytest.mark.parametrize("n", [1, 2, 3, 5, 11, 12, 23, 96])
@pytest.mark.parametrize("threads", [1, 2, 3, 4])
def test_thread_rows_are_the_prange_split(n, threads):
    """Each thread's rows (what the benchmarks meter per thread) tile 0..n in order, as the 4 * threads
    chunks the prange twins split, four consecutive chunks per thread."""
    rows = Network.thread_rows(n, threads)
    chunks = 4 * threads
    bounds = [i * n // chunks for i in range(chunks + 1)]
    assert rows == [(bounds[4 * t], bounds[4 * t + 4]) for t in range(threads)]
    assert rows[0][0] == 0 and rows[-1][1] == n and all(a[1] == b[0] for a, b in zip(rows[:-1], rows[1:], strict=True))


def test_rejects_wrong_input(rand_model):
    net = Network(rand_model)
    for bad in (np.zeros((192, 192), np.uint8), np.zeros((192, 191, 1), np.uint8), np.zeros((192, 192, 1), np.int16)):
        with pytest.raises(ValueError, match="expected a letterboxed uint8"):
            net.forward(bad)
    with pytest.raises(ValueError, match="threads"):
        Network(rand_model, threads=0)


def test_non_contiguous_input(rand_model):
    x = np.asfortranarray(_frame(rand_model, 4))
    np.testing.assert_allclose(Network(rand_model).forward(x), reference.forward(rand_model, x), rtol=1e-5, atol=1e-5)


def test_calls_follow_the_layers():
    """One kernel call per pool and conv, three per Bi-Real block, each the kernel its input and output need."""
    model = random_model(11, 58, 46, 1, ("a",), (32, 64, 96, 128, 64), blocks=2, ternary=(2, 4, 9))
    net = Network(model)
    assert [fn.py_func.__name__ for fn, _ in net._calls] == [
        "pool_rows", "bconv_bits_rows",  # 1, 2: a binary input
        "pool_rows", "tconv_bits_rows",  # 3, 4: a ternary input of 64 channels, one masked pass
        "pool_rows", "tconv_bits_rows",  # 5, 6: ternary again, 96 channels
        "bconv_real_rows",  # 7
        "sign_pack_rows", "bconv_real_rows", "add_rows",  # 8: a block over the stream's signs
        "ternary_pack_rows", "tconv_real_rows", "add_rows",  # 9: a block over the stream's ternary
    ]
    assert net.masked == {4, 6, 9}
    _compare(model, _frame(model, 3))


def test_the_network_does_without_its_numpy_twin():
    """app.network runs the kernels alone: importing it loads no app.reference."""
    code = "import sys, app.network; print('app.reference' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "False"


def test_every_kernel_a_frame_calls_releases_the_gil():
    """nogil: the capture thread, the web preview's encoder and MQTT run while a frame is detected."""
    from app import kernels

    model = random_model(11, 58, 46, 1, ("a",), (32, 64, 96, 128, 64), blocks=2, ternary=(2, 4, 9))
    for threads in (1, 2):
        net = Network(model, threads=threads)
        called = {fn for fn, _ in net._calls} | {kernels.run_stem, kernels.stem_pad, kernels.stem_par, kernels.run_head}
        assert all(fn.targetoptions.get("nogil") for fn in called), [fn for fn in called if not fn.targetoptions.get("nogil")]
