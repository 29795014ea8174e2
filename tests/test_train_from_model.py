"""train.from_model: a model file back into a trainable torch net that computes the same thing."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from app import bits  # noqa: E402
from app.modelfile import Layer, read_model, write_model  # noqa: E402
from app.network import Network  # noqa: E402
from app.randmodel import synthetic_frame  # noqa: E402
from tests.test_train_export_parity import ANCHORS, H, W, make_net, mismatches  # noqa: E402
from train import from_model as fm  # noqa: E402
from train import model as tm  # noqa: E402
from train.export import to_model  # noqa: E402


def frames(n=6, seed=0):
    return torch.stack([torch.from_numpy(synthetic_frame(seed + s, W, H, 1)).float()[None] for s in range(n)])


SOURCES = {"plain": (0, ()), "bireal": (2, ()), "ternary": (2, (0, 2, 4, 8))}


@pytest.fixture(scope="module", params=sorted(SOURCES))
def source(request):
    """A trained-looking binary net (random BN, both slopes) and its model file."""
    blocks, ternary = SOURCES[request.param]
    net = make_net(seed=3, res_blocks=blocks, ternary=ternary)
    return net, to_model(net, ANCHORS, ("a", "b"))


def test_config_of_reads_the_topology_back(source):
    net, model = source
    cfg = fm.config_of(model)
    assert (cfg.widths, cfg.res_blocks, cfg.input_width, cfg.input_height, cfg.ternary) == (
        net.cfg.widths, net.cfg.res_blocks, W, H, net.cfg.ternary)


@pytest.mark.parametrize("with_stats", [False, True])
def test_the_imported_net_computes_the_file_bit_for_bit_and_exports_it_back(source, with_stats):
    _, model = source
    stats = fm.bn_input_stats(fm.from_model(model), [frames()]) if with_stats else None
    net = fm.from_model(model, stats=stats)
    for seed in (21, 22):
        assert mismatches(net, model, synthetic_frame(seed, W, H, 1)) == []
    assert fm.check_round_trip(net, model) < 1e-5


def test_constant_channels_survive_the_round_trip(source):
    _, model = source
    layers = list(model.layers)
    t = dict(layers[2].tensors)
    thr, flip = t["threshold"].copy(), t["flip"].copy()
    lo, hi = bits.INT32_MIN, bits.INT32_MAX
    if thr.ndim == 1:
        thr[:4], flip[:4] = [lo, hi, lo, hi], [0, 0, 1, 1]
        want = [1, -1, -1, 1]
    else:  # (lo plane, hi plane): +1, -1, 0, 0, and channel 4 has a constant lo plane only
        thr[:, :4] = [[lo, hi, lo, hi], [lo, hi, hi, lo]]
        flip[:, :4] = [[0, 0, 0, 1], [0, 0, 0, 1]]
        thr[0, 4], flip[:, 4] = lo, 0
        want = [1, -1, 0, 0]
    layers[2] = Layer(layers[2].op, layers[2].params, {**t, "threshold": thr, "flip": flip})
    const = replace(model, layers=tuple(layers))
    net = fm.from_model(const)
    fm.check_round_trip(net, const)
    out = net(frames(2), trace=True)[1][2]
    for c, v in enumerate(want):
        assert (out[:, c] == v).all(), c
    if thr.ndim == 2:
        assert (out[:, 4] >= 0).all() and (out[:, 4] == 1).any() and (out[:, 4] == 0).any()


def test_the_round_trip_check_catches_a_changed_threshold(source):
    _, model = source
    net = fm.from_model(model)
    with torch.no_grad():
        net.layers[4].bn.bias.add_(0.9)  # moves zero crossings by most of an integer step at gamma ±1
    with pytest.raises(AssertionError, match="layer 4 bconv threshold"):
        fm.check_round_trip(net, model)


def test_measured_statistics_make_training_mode_start_where_the_file_is(source):
    """Training-mode BatchNorm normalises by the batch: with the batch's own statistics it must
    compute what eval mode computes, and without them (mean 0, var 1) it must not."""
    _, model = source
    x = frames()
    plain = fm.from_model(model)
    calibrated = fm.from_model(model, stats=fm.bn_input_stats(plain, [x]))
    with torch.no_grad():
        want = calibrated.eval()(x)
        got = calibrated.train()(x)
        off = plain.train()(x)
    assert torch.allclose(got, want, atol=1e-3)
    assert not torch.allclose(off, want, atol=1e-1)


def test_latent_weights_are_small_signs_that_can_flip(source):
    _, model = source
    net = fm.from_model(model, latent=0.07)
    for m, ly in zip(net.layers, model.layers, strict=True):
        if isinstance(m, tm.BConv):
            w = m.weight.detach()
            assert torch.allclose(w.abs(), torch.full_like(w, 0.07))
            packed = bits.pack(w.permute(0, 2, 3, 1).numpy())
            assert np.array_equal(packed, ly.tensors["weight"])


def test_a_stem_the_exporter_did_not_write_is_refused(source):
    _, model = source
    stem = model.layers[0]
    w = stem.tensors["weight"].copy()
    w[1] = np.clip(w[1], -100, 100)
    bad = replace(model, layers=(Layer("stem", stem.params, {**stem.tensors, "weight": w}),) + model.layers[1:])
    with pytest.raises(ValueError, match="stem channel 1"):
        fm.from_model(bad)


def test_a_band_the_trainer_does_not_use_is_refused():
    net = make_net(seed=3, res_blocks=2, ternary=(8,))
    model = to_model(net, ANCHORS, ("a", "b"))
    layers = tuple(Layer(ly.op, {**ly.params, "band": 0.25} if "band" in ly.params else ly.params, ly.tensors)
                   for ly in model.layers)
    with pytest.raises(ValueError, match="layer 8: ternary band 0.25"):
        fm.config_of(replace(model, layers=layers))


def test_a_topology_the_trainer_does_not_build_is_refused_naming_the_layer(source):
    _, model = source
    no_pool = replace(model, layers=model.layers[:1] + model.layers[2:])
    with pytest.raises(ValueError, match="layer 1: the file has"):
        fm.config_of(no_pool)


def test_the_cli_writes_a_checkpoint_that_init_from_and_the_exporter_accept(tmp_path, source, monkeypatch, capsys):
    from tests.test_train_loop import _config
    from train import cli
    from train.config import load_config
    from train.export import export_checkpoint

    # The tiny training config has 64x64 inputs and one class: a file of that net.
    tiny = load_config(_config(tmp_path))
    cfg = replace(tiny["model"], res_blocks=1)
    net = tm.Detector(cfg, 1)
    net.eval()
    src = tmp_path / "tiny.xnc"
    write_model(src, to_model(net, ANCHORS, ("person",)))
    out = tmp_path / "imported" / "last.pt"
    assert fm.main([str(src), str(out), "--config", str(tmp_path / "tiny.toml"), "--images", "16"]) == 0
    assert "re-export equals the file" in capsys.readouterr().out
    again = tmp_path / "again.xnc"
    export_checkpoint(out, again)
    a, b = read_model(src), read_model(again)
    img = synthetic_frame(5, 64, 64, 1)[:, :, None]
    assert np.array_equal(Network(a).forward(img), Network(b).forward(img)) or np.allclose(
        Network(a).forward(img), Network(b).forward(img), atol=1e-4)
    # and training starts from it
    rc = cli.main(["--config", str(tmp_path / "tiny.toml"), "--set", "model.res_blocks=1",
                   "--set", f"train.init_from={out}", "--no-export", "--out", str(tmp_path / "ft")])
    assert rc == 0
    assert "weights from" in capsys.readouterr().out


def test_the_cli_refuses_a_missing_file_and_foreign_classes(tmp_path, source, capsys):
    from tests.test_train_loop import _config

    assert fm.main([str(tmp_path / "nope.xnc"), str(tmp_path / "x.pt")]) == 2
    assert "nope.xnc" in capsys.readouterr().err
    _, model = source  # classes ("a", "b"), the tiny config has ["person"]
    src = tmp_path / "two.xnc"
    write_model(src, model)
    assert fm.main([str(src), str(tmp_path / "x.pt"), "--config", str(_config(tmp_path)), "--images", "8"]) == 78
    assert "classes" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()
