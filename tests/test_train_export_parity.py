"""Torch training mirror vs the runtime: identical bits in every binary layer after export.

A small randomly initialised network with odd sizes, randomised BatchNorm
statistics and some negative gammas (to exercise flip) is exported and run by
app.network.Network and app.reference; every packed activation must be equal,
the head within 1e-4, the decoded detections equal. Deliberately broken
variants (padding 0 or -1, flip dropped, bit order reversed) must be caught.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from app import bits, reference  # noqa: E402
from app.decode import decode  # noqa: E402
from app.modelfile import Layer, Model, read_model, write_model  # noqa: E402
from app.network import Network  # noqa: E402
from app.randmodel import synthetic_frame  # noqa: E402
from train import model as tm  # noqa: E402
from train.export import to_model  # noqa: E402

W, H = 72, 56  # odd sizes: 36x28 after the stem, pools floor 9x7 -> 4x3
ANCHORS = np.array([[8.0, 16.0], [20.0, 30.0], [40.0, 44.0]], np.float32)


def make_net(seed=0, res_blocks=0, ternary=(), widths=(16, 24, 70, 40, 33)):
    torch.manual_seed(seed)
    cfg = tm.ModelConfig(
        input_width=W, input_height=H, widths=widths, binary=True, res_blocks=res_blocks, ternary=ternary,
    )
    net = tm.Detector(cfg, num_classes=2)
    frames = torch.stack([torch.from_numpy(synthetic_frame(s, W, H, 1)).float()[None] for s in range(4)])
    net.train()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = 1.0  # running stats = this batch's: about half the bits set everywhere
                m.weight.uniform_(0.2, 1.5)
                m.bias.uniform_(-0.3, 0.3)
        net(frames)
        net.layers[-1].conv.bias.normal_(0.0, 1.0)  # not the 1 % objectness prior: the test needs detections
        g = torch.Generator().manual_seed(seed)
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.add_(torch.randn(m.running_mean.shape, generator=g) * 0.1 * m.running_var.sqrt())
                m.running_var.mul_(torch.empty(m.running_var.shape).uniform_(0.7, 1.4, generator=g))
                neg = torch.rand(m.weight.shape, generator=g) < 0.3
                m.weight.mul_(torch.where(neg, -1.0, 1.0))  # negative slope: flip = 1
                m.bias.mul_(torch.where(neg, -1.0, 1.0))
    net.eval()
    return net


def torch_trace(net, img):
    x = torch.from_numpy(img).float()[None, None]
    with torch.no_grad():
        head, outs = net(x, trace=True)
    return head[0].permute(1, 2, 0).numpy(), {i: o[0].permute(1, 2, 0).numpy() for i, o in outs.items()}


def ternary_layers(net) -> set:
    """Indices whose packed output is ternary: ternary stems and bconvs, and the pools after them."""
    out, now = set(), False
    for i, m in enumerate(net.layers):
        if isinstance(m, (tm.Stem, tm.BConv)):
            now = m.ternary and not getattr(m, "real_output", False)
        if now and not isinstance(m, tm.ResBConv):
            out.add(i)
    return out


def packed(net, i, o):
    """torch's layer-i output in the runtime's packed form (app/bits.py)."""
    return bits.ternary_pack(o.astype(np.int8)) if i in ternary_layers(net) else bits.pack(o)


def mismatches(net, model, img):
    """Layer indices whose runtime output differs from torch (plus 'head' / 'dets')."""
    head_t, outs = torch_trace(net, img)
    head_n, tr_n = Network(model).forward(img[:, :, None], trace=True)
    bad = []
    for i, words in tr_n.items():
        o = outs[i]
        if words.dtype == np.uint64:
            if not np.array_equal(packed(net, i, o), words):
                bad.append(i)
        elif np.abs(o - words).max() > 1e-4:
            bad.append(i)
    if np.abs(head_t - head_n).max() > 1e-4:
        bad.append("head")
    d_t = decode(head_t, ANCHORS, (W, H), score_threshold=0.05)
    d_n = decode(head_n, ANCHORS, (W, H), score_threshold=0.05)
    if d_t.shape != d_n.shape or not np.allclose(d_t, d_n, atol=1e-3):
        bad.append("dets")
    return bad


@pytest.fixture(scope="module")
def net_and_model():
    net = make_net()
    return net, to_model(net, ANCHORS, ("a", "b"))


@pytest.mark.parametrize("seed", [11, 12, 13])
def test_torch_equals_runtime_bit_for_bit(net_and_model, seed):
    net, model = net_and_model
    img = synthetic_frame(seed, W, H, 1)
    head_t, outs = torch_trace(net, img)
    head_n, tr_n = Network(model).forward(img[:, :, None], trace=True)
    head_r, tr_r = reference.forward(model, img[:, :, None], trace=True)
    binary = [i for i, w in tr_n.items() if w.dtype == np.uint64]
    assert len(binary) == 7  # stem, 3 pools, 3 bconvs
    for i in binary:
        packed = bits.pack(outs[i])
        frac = (outs[i] < 0).mean()
        assert 0.05 < frac < 0.95, f"layer {i} is nearly constant ({frac:.2f}): the check would be weak"
        assert np.array_equal(packed, tr_n[i]), f"layer {i}: torch and Network bits differ"
        assert np.array_equal(packed, tr_r[i]), f"layer {i}: torch and reference bits differ"
    real = [i for i, w in tr_n.items() if w.dtype != np.uint64]
    assert real and np.abs(outs[real[0]] - tr_n[real[0]]).max() < 1e-4
    assert np.abs(head_t - head_n).max() < 1e-4
    assert np.abs(head_t - head_r).max() < 1e-4
    d_t = decode(head_t, ANCHORS, (W, H), score_threshold=0.05)
    d_n = decode(head_n, ANCHORS, (W, H), score_threshold=0.05)
    assert len(d_t) > 0
    np.testing.assert_allclose(d_t, d_n, atol=1e-3)


def test_export_exercises_flip_and_thresholds(net_and_model):
    _, model = net_and_model
    flips = [layer.tensors["flip"] for layer in model.layers if "flip" in layer.tensors]
    assert all(f.any() and not f.all() for f in flips)


def test_fold_matches_torch_on_every_candidate():
    """The folded threshold reproduces torch's sign for every reachable integer pre-activation."""
    net = make_net(seed=3)
    for m in net.layers:
        if isinstance(m, tm.BConv) and not m.real_output:
            from train.export import fold_bconv

            _, t = fold_bconv(m)
            k = m.kernel * m.kernel * m.in_ch
            ys = torch.arange(-k, k + 1, 2, dtype=torch.float32)[:, None].expand(-1, m.out_ch).contiguous()
            with torch.no_grad():
                z = m.bn_eval(ys, m.alpha()).numpy()
            rule = ~bits.threshold_bits(ys.numpy().astype(np.int64), t["threshold"], t["flip"])
            assert np.array_equal(rule, z >= 0)


@pytest.mark.parametrize("pad", [0.0, -1.0])
def test_wrong_padding_is_caught(net_and_model, monkeypatch, pad):
    net, model = net_and_model
    monkeypatch.setattr(tm, "PAD_VALUE", pad)
    bad = mismatches(net, model, synthetic_frame(11, W, H, 1))
    assert 2 in bad  # the first bconv already differs at the border


def test_dropped_flip_is_caught(net_and_model):
    net, model = net_and_model
    layers = []
    for layer in model.layers:
        t = dict(layer.tensors)
        if "flip" in t:
            t["flip"] = np.zeros_like(t["flip"])
        layers.append(Layer(layer.op, layer.params, t))
    broken = dataclasses.replace(model, layers=tuple(layers))
    bad = mismatches(net, broken, synthetic_frame(11, W, H, 1))
    assert 0 in bad


def test_reversed_bit_order_is_caught(net_and_model):
    net, model = net_and_model
    layers = []
    for layer in model.layers:
        t = dict(layer.tensors)
        if layer.op == "bconv":
            c = layer.params["in_ch"]
            t["weight"] = bits.pack(bits.unpack(t["weight"], c)[..., ::-1])
        layers.append(Layer(layer.op, layer.params, t))
    broken = dataclasses.replace(model, layers=tuple(layers))
    bad = mismatches(net, broken, synthetic_frame(11, W, H, 1))
    assert 2 in bad


# ---------------------------------------------------------------- Bi-Real blocks (rbconv)


@pytest.fixture(scope="module")
def res_net_and_model():
    net = make_net(seed=5, res_blocks=2)
    return net, to_model(net, ANCHORS, ("a", "b"))


@pytest.mark.parametrize("seed", [21, 22])
def test_bireal_blocks_torch_equals_runtime_exactly(res_net_and_model, seed):
    """The real stream through two rbconv blocks: same floats, so the same signs feed each block."""
    net, model = res_net_and_model
    assert [layer.op for layer in model.layers][-4:] == ["bconv", "rbconv", "rbconv", "head"]
    img = synthetic_frame(seed, W, H, 1)
    head_t, outs = torch_trace(net, img)
    head_n, tr_n = Network(model).forward(img[:, :, None], trace=True)
    head_r, tr_r = reference.forward(model, img[:, :, None], trace=True)
    streams = [i for i, w in tr_n.items() if w.dtype != np.uint64]
    assert len(streams) == 3  # the real-output bconv, then each block
    for i in streams:
        frac = (outs[i] < 0).mean()
        assert 0.05 < frac < 0.95, f"layer {i}: the stream's signs are nearly constant ({frac:.2f})"
        assert np.array_equal(outs[i], tr_n[i]), f"layer {i}: torch and Network streams differ"
        assert np.array_equal(outs[i], tr_r[i]), f"layer {i}: torch and reference streams differ"
    for i in (i for i, w in tr_n.items() if w.dtype == np.uint64):
        assert np.array_equal(bits.pack(outs[i]), tr_n[i]), f"layer {i}: bits differ"
    assert np.abs(head_t - head_n).max() < 1e-4 and np.abs(head_t - head_r).max() < 1e-4
    assert len(decode(head_t, ANCHORS, (W, H), score_threshold=0.05)) > 0


def test_bireal_blocks_run_threaded_as_single(res_net_and_model):
    _, model = res_net_and_model
    img = synthetic_frame(23, W, H, 1)[:, :, None]
    one, tr1 = Network(model).forward(img, trace=True)
    two, tr2 = Network(model, threads=2).forward(img, trace=True)
    assert np.array_equal(one, two) and all(np.array_equal(tr1[i], tr2[i]) for i in tr1)


def test_a_dropped_shortcut_is_caught(res_net_and_model, monkeypatch):
    net, model = res_net_and_model
    monkeypatch.setattr(tm.ResBConv, "forward", lambda self, r: tm.BConv.forward(self, tm.binary_act(r)))
    bad = mismatches(net, model, synthetic_frame(21, W, H, 1))
    assert len(model.layers) - 3 in bad  # the first block already differs


def test_a_zero_sign_stream_gives_plus_one(res_net_and_model):
    """sign(0) = +1 on the stream too: an all-zero stream packs to zero words, the +1 bits."""
    from app import kernels as K

    stream = np.zeros((3, 4, 70), np.float32)
    stream[0, 0, 5] = -0.0  # -0.0 >= 0: still +1
    stream[1, 2, 69] = -1e-30
    out = np.zeros(K.padded_shape(3, 4, 2), np.uint64)
    K.sign_pack_rows(stream, out, 0, 3)
    assert np.array_equal(K.interior(out), bits.pack(stream))
    assert K.interior(out)[1, 2, 1] == np.uint64(1) << np.uint64(5) and int(K.interior(out).sum()) == 1 << 5


# ---------------------------------------------------------------- ternary layers

WIDE = (32, 64, 96, 64, 32)  # whole 32-bit planes: the masked kernels read the ternary inputs
TERNARY_CASES = {
    "stem": (0, (0,), None),
    "early": (0, (0, 2, 4), None),
    "all-bits": (0, (0, 2, 4, 6), None),
    "blocks": (2, (8, 9), None),
    "everywhere": (2, (0, 2, 4, 6, 8, 9), None),
    "everywhere-masked": (2, (0, 2, 4, 6, 8, 9), WIDE),
    "early-masked": (1, (0, 2, 4), WIDE),
}


@pytest.fixture(scope="module", params=sorted(TERNARY_CASES))
def ternary_net_and_model(request):
    blocks, layers, widths = TERNARY_CASES[request.param]
    net = make_net(seed=7, res_blocks=blocks, ternary=layers, **({"widths": widths} if widths else {}))
    model = to_model(net, ANCHORS, ("a", "b"))
    assert bool(Network(model).masked) == (widths is not None)
    return net, model


@pytest.mark.parametrize("seed", [31, 32])
def test_ternary_layers_torch_equals_runtime_bit_for_bit(ternary_net_and_model, seed):
    """-1/0/+1 activations as two bit planes: the same values in every layer, the same head and detections."""
    net, model = ternary_net_and_model
    img = synthetic_frame(seed, W, H, 1)
    head_t, outs = torch_trace(net, img)
    for i in ternary_layers(net) | {i for i in net.cfg.ternary if isinstance(net.layers[i], tm.ResBConv)}:
        v = outs[i] if i in ternary_layers(net) else None
        if v is not None:  # all three values occur, or the check would be weak
            assert {-1.0, 0.0, 1.0} <= set(np.unique(v).tolist()), f"layer {i}: values {np.unique(v)}"
    assert mismatches(net, model, img) == []
    head_r, tr_r = reference.forward(model, img[:, :, None], trace=True)
    for t in (1, 2):
        head_n, tr_n = Network(model, threads=t).forward(img[:, :, None], trace=True)
        assert np.abs(head_t - head_n).max() < 1e-4 and np.abs(head_r - head_n).max() < 1e-4
        assert all(np.array_equal(tr_n[i], tr_r[i]) for i in tr_n), "Network and its numpy twin differ"
    assert len(decode(head_t, ANCHORS, (W, H), score_threshold=0.05)) > 0


def test_ternary_blocks_see_zeros_in_their_stream():
    """The blocks' band matters: some of the stream lies within ±d, so their input has zeros."""
    net = make_net(seed=7, res_blocks=2, ternary=(8, 9))
    _, outs = torch_trace(net, synthetic_frame(31, W, H, 1))
    r = outs[7]
    assert ((r > -tm.TERNARY_D) & (r < tm.TERNARY_D)).mean() > 0.05


def test_swapped_ternary_planes_are_caught(monkeypatch):
    from train import export

    net = make_net(seed=7, ternary=(0, 2, 4))
    fold = export._fold_sign

    def swapped(m, *args):
        thr, flip = fold(m, *args)
        return (thr[::-1].copy(), flip[::-1].copy()) if m.ternary else (thr, flip)

    monkeypatch.setattr(export, "_fold_sign", swapped)
    bad = mismatches(net, to_model(net, ANCHORS, ("a", "b")), synthetic_frame(31, W, H, 1))
    assert 0 in bad


def test_a_fold_that_forgets_odd_preactivations_after_a_ternary_input_is_caught(monkeypatch):
    """After a ternary input y = sum w·v takes every integer, not only K - 2·popcount's parity."""
    from train import export

    net = make_net(seed=7, ternary=(0,))
    fold = export.fold_bconv
    monkeypatch.setattr(export, "fold_bconv", lambda m, ternary_input=False: fold(m))
    bad = mismatches(net, to_model(net, ANCHORS, ("a", "b")), synthetic_frame(31, W, H, 1))
    assert 2 in bad


def test_a_wrong_band_in_the_blocks_is_caught(monkeypatch):
    net = make_net(seed=7, res_blocks=2, ternary=(8, 9))
    model = to_model(net, ANCHORS, ("a", "b"))
    layers = [Layer(ly.op, {**ly.params, "band": 0.25} if ly.op == "rbconv" else ly.params, ly.tensors)
              for ly in model.layers]
    broken = Model(model.input_width, model.input_height, model.channels, model.class_names, model.anchors,
                   tuple(layers), model.metadata)
    bad = mismatches(net, broken, synthetic_frame(31, W, H, 1))
    assert 8 in bad


def test_ternary_pack_of_a_stream_follows_torch_at_the_band_edges():
    from app import kernels as K

    d = np.float32(tm.TERNARY_D)
    stream = np.array([[[d, -d, np.nextafter(d, np.float32(0)), np.nextafter(-d, np.float32(-1)), 0.0, -0.0,
                         3.0, -3.0]]], np.float32)
    out = np.zeros(K.padded_shape(1, 1, 1), np.uint64)
    K.ternary_pack_rows(stream, float(d), out, 0, 1)
    want = tm.ternary_act(torch.from_numpy(stream)).numpy()
    assert want.ravel().tolist() == [1, 0, 0, -1, 0, 0, 1, -1]
    assert np.array_equal(K.interior(out), bits.ternary_pack(want.astype(np.int8)))


# ---------------------------------------------------------------- the shipped model

SHIPPED = Path(__file__).resolve().parents[1] / "models" / "person.xnc"


@pytest.mark.skipif(not SHIPPED.exists(), reason="models/person.xnc not present")
def test_shipped_model_network_equals_reference_and_round_trips(tmp_path):
    model = read_model(SHIPPED)
    img = synthetic_frame(5, 320, 240, 1)
    from app.preprocess import letterbox

    x, _ = letterbox(img, model.input_width, model.input_height, model.channels)
    head_n, tr_n = Network(model).forward(x, trace=True)
    head_r, tr_r = reference.forward(model, x, trace=True)
    for i in tr_r:
        if tr_r[i].dtype == np.uint64:
            assert np.array_equal(tr_n[i], tr_r[i]), f"layer {i}"
    assert np.abs(head_n - head_r).max() < 1e-3
    out = tmp_path / "copy.xnc"
    write_model(out, model)
    assert out.read_bytes() == SHIPPED.read_bytes()
    assert model.metadata.get("training_command")
