"""The torch mirror: sign convention, +1 padding, exact integer pre-activations, loss targets, anchors."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

from train import model as tm  # noqa: E402
from train.loss import YoloLoss, bbox_ciou, kmeans_anchors, split_head  # noqa: E402


def test_sign_of_zero_is_plus_one_and_ste_is_clipped():
    x = torch.tensor([-2.0, -0.5, 0.0, -0.0, 0.5, 2.0], requires_grad=True)
    y = tm.binary_weight(x)
    assert y.tolist() == [-1, -1, 1, 1, 1, 1]
    y.sum().backward()
    assert x.grad.tolist() == [0, 1, 1, 1, 1, 0]
    assert tm.binary_act(torch.zeros(3)).tolist() == [1, 1, 1]


def test_bconv_pads_with_plus_one_and_y_is_exact():
    conv = tm.BConv(3, 2, binary=True, act=None)
    with torch.no_grad():
        conv.weight.fill_(0.3)  # all +1
    a = -torch.ones(1, 3, 4, 5)  # all -1
    y, alpha = conv.preact(a)
    k = 27
    # interior: 27 products of -1; a corner has 5 padded taps of +1 on every channel: 12*(-1)... per channel
    assert y[0, 0, 1, 1].item() == -k
    assert y[0, 0, 0, 0].item() == -(4 * 3) + (5 * 3)
    assert y[0, 0, 0, 1].item() == -(6 * 3) + (3 * 3)
    assert torch.all((y + k) % 2 == 0)  # same parity as K
    assert torch.allclose(alpha, torch.full((2,), 0.3))


def test_stem_integer_accumulator_is_exact():
    stem = tm.Stem(1, 4, binary=True, act=None)
    q, s = stem.quantised()
    assert torch.all(q == q.round()) and q.abs().max() == 127
    torch.testing.assert_close(q * s.view(-1, 1, 1, 1), stem.weight.detach(), atol=float(s.max()) / 2 + 1e-7, rtol=0)
    x = torch.randint(0, 256, (1, 1, 9, 11)).float()
    y, _ = stem.preact(x)
    want = F.conv2d(x.double() - 128, q.double(), stride=2, padding=1)
    assert torch.equal(y.double(), want)  # the float32 sum is exact


def test_eval_bn_expression_equals_torch_batchnorm():
    conv = tm.BConv(8, 6, binary=True, act=None)
    with torch.no_grad():
        conv.bn.running_mean.uniform_(-5, 5)
        conv.bn.running_var.uniform_(0.5, 4)
        conv.bn.weight.uniform_(-2, 2)
    conv.eval()
    y = torch.arange(-72, 73, 2, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 6, 1, 1)
    ref = F.batch_norm(
        y * conv.alpha().view(1, -1, 1, 1),
        conv.bn.running_mean,
        conv.bn.running_var,
        conv.bn.weight,
        conv.bn.bias,
        False,
        0.0,
        conv.bn.eps,
    )
    torch.testing.assert_close(conv.bn_eval(y, conv.alpha()), ref, atol=1e-5, rtol=1e-5)


def test_default_architecture_matches_the_runtime_table():
    net = tm.Detector(tm.ModelConfig(), num_classes=1)
    ops = [type(m).__name__ for m in net.layers]
    assert ops == ["Stem", "Pool", "BConv", "Pool", "BConv", "Pool", "BConv", "BConv", "Head"]
    assert net.stride == 16
    head, outs = net.eval()(torch.full((1, 1, 192, 192), 128.0), trace=True)
    assert head.shape == (1, 18, 12, 12)
    assert outs[0].shape == (1, 32, 96, 96) and outs[6].shape == (1, 256, 12, 12)
    for i in (0, 1, 2, 3, 4, 5, 6):
        assert set(outs[i].unique().tolist()) <= {-1.0, 1.0}
    assert [m.real_output for m in net.layers if isinstance(m, tm.BConv)] == [False, False, False, True]


def test_float_twin_same_topology_real_values():
    net = tm.Detector(tm.ModelConfig(binary=False), num_classes=1).eval()
    head, outs = net(torch.rand(1, 1, 192, 192) * 255, trace=True)
    assert head.shape == (1, 18, 12, 12)
    assert len(outs[2].unique()) > 10


def test_split_head_matches_runtime_channel_order():
    head = torch.arange(2 * 3 * 7 * 4 * 5, dtype=torch.float32).view(2, 21, 4, 5)
    p = split_head(head, 3)
    # runtime channel a*(5+C)+k at (gy, gx) is anchor a, value k
    assert p[1, 2, 3, 4, 5].item() == head[1, 2 * 7 + 5, 3, 4].item()


def test_loss_targets_cells_and_a_perfect_box():
    anchors = np.array([[16, 32], [48, 96], [100, 150]], np.float32)
    crit = YoloLoss(anchors, stride=16, num_classes=1)
    t = torch.tensor([[0, 0, 40.0, 20.0, 56.0, 52.0]])  # centre (48, 36) -> cell (3, 2), 16x32 box
    bi, ai, gj, gi, tbox, tcls = crit.build_targets(t, 12, 12)
    cells = {(int(a), int(j), int(i)) for a, j, i in zip(ai, gj, gi, strict=True)}
    assert (0, 2, 3) in cells and (0, 1, 3) in cells  # own cell + upper neighbour (frac y = 0.25)
    assert all(a in (0, 1) for a, _, _ in cells)  # 100x150 is > 4x the box
    ciou = bbox_ciou(torch.tensor([[1.0, 1.0, 2.0, 3.0]]), torch.tensor([[1.0, 1.0, 2.0, 3.0]]))
    assert abs(ciou.item() - 1.0) < 1e-5


def test_loss_goes_down_on_a_tiny_batch():
    torch.manual_seed(0)
    cfg = tm.ModelConfig(input_width=64, input_height=64, widths=(8, 16, 16, 16, 16))
    net = tm.Detector(cfg, 1)
    anchors = np.array([[10, 20], [20, 30], [30, 40]], np.float32)
    crit = YoloLoss(anchors, net.stride, 1)
    x = torch.full((2, 1, 64, 64), 40.0)
    x[0, 0, 10:40, 20:36] = 220
    x[1, 0, 20:50, 30:46] = 220
    t = torch.tensor([[0, 0, 20, 10, 36, 40], [1, 0, 30, 20, 46, 50]], dtype=torch.float32)
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    losses = []
    for _ in range(80):
        loss, _ = crit(net(x), t)
        opt.zero_grad()
        loss.backward()
        opt.step()
        net.clip_latent()
        losses.append(loss.item())
    assert min(losses[-5:]) < 0.6 * losses[0], losses[::5]
    assert all(m.weight.abs().max() <= 1 for m in net.layers if isinstance(m, tm.BConv))


def test_kmeans_anchors_find_the_clusters():
    rng = np.random.default_rng(0)
    wh = np.concatenate([rng.normal(c, 1.0, (200, 2)) for c in ([10, 20], [40, 80], [90, 120])])
    a = kmeans_anchors(wh, 3)
    np.testing.assert_allclose(a, [[10, 20], [40, 80], [90, 120]], atol=2.0)
    with pytest.raises(ValueError):
        kmeans_anchors(wh[:2], 3)


def test_checkpoint_round_trip_without_pickle(tmp_path):
    from pathlib import Path

    from train.checkpoints import load_checkpoint, save_checkpoint
    from train.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "train/configs/person.toml")
    net = tm.Detector(cfg["model"], 1)
    save_checkpoint(tmp_path / "c.pt", net, cfg, np.ones((3, 2)), ("person",), {"step": 3})
    back, ck = load_checkpoint(tmp_path / "c.pt")  # weights_only=True inside
    assert ck["step"] == 3 and ck["config"]["model"]["widths"] == [32, 64, 128, 256, 256]
    for (k, v), (k2, v2) in zip(net.state_dict().items(), back.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2)


def test_binary_net_starts_from_its_float_twin():
    from train.warmstart import init_from

    torch.manual_seed(0)
    cfg = tm.ModelConfig(input_width=32, input_height=32, widths=(8, 16, 16))
    float_net = tm.Detector(tm.ModelConfig(**{**cfg.__dict__, "binary": False}))
    binary = tm.Detector(cfg)
    init_from(binary, float_net.state_dict(), log=lambda *_: None)
    for fm, bm in zip(float_net.layers, binary.layers, strict=True):
        if isinstance(bm, tm.BConv):
            assert torch.equal(torch.sign(bm.weight), torch.sign(fm.weight))  # same signs
            assert bm.weight.abs().amax(dim=(1, 2, 3)).allclose(torch.ones(bm.out_ch))  # scaled into [-1, 1]
        elif isinstance(bm, (tm.Stem, tm.Head)):
            for (_, a), (_, b) in zip(fm.state_dict().items(), bm.state_dict().items(), strict=True):
                assert torch.equal(a, b)


def test_bireal_blocks_added_to_a_trained_binary_net_start_as_the_identity():
    """Warm start: the trained net's weights as they are (no rescale), the new blocks change nothing yet."""
    from dataclasses import replace

    from train.warmstart import init_from

    torch.manual_seed(1)
    cfg = tm.ModelConfig(input_width=32, input_height=32, widths=(8, 16, 16))
    old = tm.Detector(cfg)
    with torch.no_grad():
        old.train()
        old(torch.rand(4, 1, 32, 32) * 255)  # BatchNorm statistics that are not the defaults
        for m in old.layers:
            if isinstance(m, tm.BConv):
                m.weight.mul_(0.3)  # latent weights well inside [-1, 1]: a rescale would show
    old.eval()
    new = tm.Detector(replace(cfg, res_blocks=2))
    init_from(new, old.state_dict(), log=lambda *_: None, from_binary=True)
    new.eval()
    assert [type(m).__name__ for m in new.layers][-3:] == ["ResBConv", "ResBConv", "Head"]
    assert torch.equal(new.layers[2].weight, old.layers[2].weight)
    x = torch.rand(3, 1, 32, 32) * 255
    with torch.no_grad():
        assert torch.equal(new(x), old(x))


def test_distillation_is_zero_only_where_the_student_matches():
    from train.train import distill_loss

    torch.manual_seed(0)
    t = torch.randn(2, 3 * 6, 4, 4)
    same = distill_loss(t.clone(), t, 3)
    # At equality only the teacher's own objectness entropy remains (soft BCE targets).
    p = torch.sigmoid(split_head(t, 3)[..., 4])
    entropy = -(p * p.log() + (1 - p) * (1 - p).log()).mean()
    assert float(same) == pytest.approx(float(entropy), rel=1e-5)
    s = t.clone().requires_grad_(True)
    moved = t.clone()
    moved[:, 0] += 3.0  # anchor 0's tx differs
    loss = distill_loss(s, moved, 3)
    assert float(loss.detach()) > float(same)
    loss.backward()
    g = split_head(s.grad, 3)
    assert g[:, 0, ..., 0].abs().sum() > 0 and g[:, 1:, ..., 0].abs().sum() == 0


def test_ternary_act_is_the_mean_of_two_signs_with_its_band_and_clipped_ste():
    d = tm.TERNARY_D
    below = torch.nextafter(torch.tensor(-d), torch.tensor(-2.0)).item()  # just outside the band
    under = torch.nextafter(torch.tensor(d), torch.tensor(0.0)).item()  # just inside it
    z = torch.tensor([-2.0, -1.0, below, -d, -0.25, 0.0, -0.0, 0.25, under, d, 1.0, 2.0], requires_grad=True)
    v = tm.ternary_act(z)
    assert v.tolist() == [-1, -1, -1, 0, 0, 0, 0, 0, 0, 1, 1, 1]  # z == -d -> 0, z == d -> +1
    assert torch.equal(v, (tm.sign_pm1(z + d) + tm.sign_pm1(z - d)) / 2)
    v.sum().backward()
    assert z.grad.tolist() == [0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0]


def _ternary_net(**kw):
    cfg = tm.ModelConfig(input_width=32, input_height=32, widths=(8, 16, 16), res_blocks=1, **kw)
    return tm.Detector(cfg).eval()


def test_ternary_layers_output_minus_one_zero_plus_one_and_others_stay_signs():
    torch.manual_seed(0)
    net = _ternary_net(ternary=(0, 5))
    assert [i for i, m in enumerate(net.layers) if getattr(m, "ternary", False)] == [0, 5]
    x = torch.rand(2, 1, 32, 32) * 255
    stem, blk = net.layers[0], net.layers[5]
    with torch.no_grad():
        # BN statistics of the stem's own output, so z ~ N(0, 1) and a good share falls in the band
        y, s = stem.preact(x)
        ys = y * s.view(1, -1, 1, 1)
        stem.bn.running_mean.copy_(ys.mean(dim=(0, 2, 3)))
        stem.bn.running_var.copy_(ys.var(dim=(0, 2, 3)))
        net.layers[4].bn.weight.fill_(0.1)  # a real stream of small values, some inside the band
        blk.bn.weight.fill_(1.0)  # a live block, so its input's activation reaches its output
        _, outs = net(x, trace=True)
        z = stem.normalise(*stem.preact(x))
    assert set(outs[0].unique().tolist()) == {-1.0, 0.0, 1.0}
    assert torch.equal(outs[0], tm.ternary_act(z))
    assert set(outs[2].unique().tolist()) <= {-1.0, 1.0}  # not named: still signs
    # the block reads the ternary of its stream, not its sign
    r = outs[4]
    assert (r.abs() < tm.TERNARY_D).any() and (r.abs() >= tm.TERNARY_D).any()
    with torch.no_grad():
        ternary = r + blk.real_eval(blk.preact(tm.ternary_act(r))[0])
        signed = r + blk.real_eval(blk.preact(tm.sign_pm1(r))[0])
    assert torch.allclose(outs[5], ternary, atol=1e-5)
    assert not torch.allclose(outs[5], signed, atol=1e-3)


@pytest.mark.parametrize("idx", [1, 4, 6, 7, -1])
def test_ternary_refuses_a_layer_without_a_sign(idx):
    # 1 pool, 4 the real-output bconv, 6 the head, 7 and -1 out of range (widths 8,16,16 with one block)
    with pytest.raises(ValueError, match=f"ternary: layer {idx} takes no sign"):
        _ternary_net(ternary=(idx,))


def test_ternary_is_not_for_the_twin():
    with pytest.raises(ValueError, match="float twin"):
        tm.ModelConfig(binary=False, ternary=(0,))
    net = _ternary_net(ternary=[2])  # a list becomes a tuple
    assert net.cfg.ternary == (2,)
    assert [getattr(m, "ternary", None) for m in net.layers[:3]] == [False, None, True]
