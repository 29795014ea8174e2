"""Torch training mirror vs the runtime: identical bits in every binary layer after export.

A small randomly initialised network with odd sizes, randomised BatchNorm
statistics and some negative gammas (to exercise flip) is exported and run by
app.network.Network and app.reference; every packed activation must be equal,
the head within 1e-4, the decoded detections equal. Deliberately broken
variants (padding 0 or -1, flip dropped, bit order reversed) must be caught.
"""

from __future__ import annotations

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


def make_net(seed=0, res_blocks=0):
    torch.manual_seed(seed)
    cfg = tm.ModelConfig(
        input_width=W, input_height=H, widths=(16, 24, 70, 40, 33), binary=True, res_blocks=res_blocks
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


def mismatches(net, model, img):
    """Layer indices whose runtime output differs from torch (plus 'head' / 'dets')."""
    head_t, outs = torch_trace(net, img)
    head_n, tr_n = Network(model).forward(img[:, :, None], trace=True)
    bad = []
    for i, words in tr_n.items():
        o = outs[i]
        if words.dtype == np.uint64:
            if not np.array_equal(bits.pack(o), words):
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
    broken = Model(
        model.input_width,
        model.input_height,
        model.channels,
        model.class_names,
        model.anchors,
        tuple(layers),
        model.metadata,
    )
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
    broken = Model(
        model.input_width,
        model.input_height,
        model.channels,
        model.class_names,
        model.anchors,
        tuple(layers),
        model.metadata,
    )
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
