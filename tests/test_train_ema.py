"""The moving average of the weights (train/ema.py) and the trainer's use of it."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from train import cli  # noqa: E402
from train import ema as ema_mod  # noqa: E402
from train import train as tt  # noqa: E402
from train.config import load_config  # noqa: E402
from train.ema import WeightAverage  # noqa: E402
from train.model import Detector  # noqa: E402


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2))


def test_update_is_the_ramped_exponential_average_of_the_live_weights():
    live = _net()
    avg = WeightAverage(live, 0.9)
    expected = [p.detach().clone() for p in live.parameters()]
    for u in range(1, 6):
        with torch.no_grad():
            for p in live.parameters():
                p.add_(torch.randn_like(p))
        avg.update(live)
        d = 0.9 * (1 - torch.exp(torch.tensor(-u / ema_mod.RAMP_STEPS, dtype=torch.float64))).item()
        expected = [d * e + (1 - d) * p.detach() for e, p in zip(expected, live.parameters(), strict=True)]
    for e, a in zip(expected, avg.model.parameters(), strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)
    assert not any(p.requires_grad for p in avg.model.parameters())
    # The live net is untouched by the average: it keeps training from its own weights.
    assert not torch.equal(next(live.parameters()), next(avg.model.parameters()))


def test_recalibrate_sets_batchnorm_statistics_to_those_of_the_averaged_weights_over_all_batches():
    live = _net()
    avg = WeightAverage(live, 0.5)
    with torch.no_grad():
        avg.model[0].weight.mul_(3.0)  # the averaged net differs from the one whose statistics it carries
    batches = [torch.randn(5, 1, 8, 8) * 20 + 7 for _ in range(3)]
    assert avg.recalibrate(iter(batches)) == 15
    with torch.no_grad():
        z = [avg.model[0](x) for x in batches]
    bn = avg.model[1]
    # The plain average over batches of each batch's statistics (BatchNorm's cumulative mode).
    per_batch_var = torch.stack([zb.var(dim=(0, 2, 3), unbiased=True) for zb in z])
    torch.testing.assert_close(bn.running_mean, torch.cat(z).mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(bn.running_var, per_batch_var.mean(0), rtol=1e-4, atol=1e-3)
    assert bn.momentum == 0.1 and not avg.model.training
    with pytest.raises(ValueError, match="at least one batch"):
        avg.recalibrate(iter([]))


def test_decay_outside_zero_one_is_refused():
    for bad in (0.0, 1.0, -0.5):
        with pytest.raises(ValueError, match="decay"):
            WeightAverage(_net(), bad)


def _trained(tmp_path, monkeypatch, ema):
    """(starting weights, saved last.pt weights) of a 4-step float-twin run with EMA decay ``ema``."""
    from dataclasses import replace

    from tests.test_train_loop import _config

    monkeypatch.setattr(ema_mod, "RAMP_STEPS", 1e-9)  # the full decay from the first update
    cfg = _config(tmp_path, max_steps=4, lr=0.05, ema=ema)
    out = tmp_path / "run"
    assert cli.main(["--config", str(cfg), "--float-twin", "--no-export", "--out", str(out)]) == 0
    mc = load_config(str(cfg))["model"]
    tt.seed_everything(0)
    start = Detector(replace(mc, binary=False), 1).state_dict()
    return start, torch.load(out / "last.pt", map_location="cpu", weights_only=True)["model"]


def test_trainer_saves_the_averaged_weights_with_statistics_recomputed_for_them(tmp_path, monkeypatch):
    start, plain = _trained(tmp_path / "a", monkeypatch, 0.0)
    start_b, frozen = _trained(tmp_path / "b", monkeypatch, 1 - 1e-9)
    name, mean = "layers.0.weight", "layers.0.bn.running_mean"
    torch.testing.assert_close(start_b[name], start[name], rtol=0, atol=0)
    # Without the average the trained weights are saved; with a decay of ~1 the average stays at the start.
    assert (plain[name] - start[name]).abs().max() > 1e-3
    torch.testing.assert_close(frozen[name], start[name], rtol=0, atol=1e-6)
    # Its statistics are recomputed for those weights: neither the initial (0) nor the live net's.
    assert frozen[mean].abs().max() > 1e-3
    assert (frozen[mean] - plain[mean]).abs().max() > 1e-3


def test_ema_out_of_range_is_a_config_error(tmp_path, capsys):
    from tests.test_train_loop import _config

    cfg = _config(tmp_path, ema=1.5)
    assert cli.main(["--config", str(cfg), "--float-twin", "--no-export", "--out", str(tmp_path / "x")]) == 78
    assert "train.ema" in capsys.readouterr().err
