"""Checkpoints: what the trainer writes, and older ones that record options the trainer no longer has."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tests.test_train_loop import _config  # noqa: E402
from train import cli  # noqa: E402
from train import model as tm  # noqa: E402
from train.checkpoints import load_checkpoint, read_checkpoint, save_checkpoint  # noqa: E402
from train.config import load_config  # noqa: E402
from train.data import ConfigError  # noqa: E402


def _older(tmp_path, name, real_act=(), distill_attention=0.0):
    """A binary checkpoint of the tiny config whose config records the retired options, as older ones do."""
    cfg = load_config(_config(tmp_path) if not (tmp_path / "tiny.toml").exists() else tmp_path / "tiny.toml")
    torch.manual_seed(0)
    net = tm.Detector(cfg["model"], 1)
    path = tmp_path / name
    anchors = np.array([[8, 16], [16, 32], [32, 48]], np.float32)
    save_checkpoint(path, net, cfg, anchors, ("person",), {"step": 7, "wall_s": 1.0, "epochs": 0.5})
    ck = torch.load(path, weights_only=True)
    ck["config"]["model"]["real_act"] = list(real_act)
    ck["config"]["train"]["distill_attention"] = distill_attention
    torch.save(ck, path)
    return path, net


def test_an_older_checkpoint_with_the_retired_options_off_loads_everywhere(tmp_path, capsys):
    path, net = _older(tmp_path, "older.pt")
    back, ck = load_checkpoint(path)
    assert "real_act" not in ck["config"]["model"] and "distill_attention" not in ck["config"]["train"]
    for a, b in zip(net.state_dict().values(), back.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    cfg = str(tmp_path / "tiny.toml")
    as_start_and_teacher = ["--set", f"train.init_from={path}", "--set", f"train.teacher={path}",
                            "--set", "train.distill=1"]
    assert cli.main(["--config", cfg, *as_start_and_teacher, "--no-export", "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert f"distilling from {path}" in out and f"weights from {path}" in out
    assert cli.main(["--config", cfg, "--resume", str(path), "--no-export", "--out", str(tmp_path / "r")]) == 0
    assert "resumed from" in capsys.readouterr().out
    resumed = read_checkpoint(tmp_path / "r" / "last.pt")
    assert resumed["total_steps"] == 7 + resumed["step"]  # the older checkpoint's steps count
    assert "real_act" not in resumed["config"]["model"]  # what is written is in the current form

    from train import evaluate_twin
    from train.export import export_checkpoint

    export_checkpoint(path, tmp_path / "older.xnc")
    data = str(tmp_path / "data" / "b")
    assert evaluate_twin.main([str(path), "--threshold", "0.1", "--data", data]) == 0


@pytest.mark.parametrize(
    "kw, key",
    [({"real_act": (0, 2)}, "model.real_act = [0, 2]"), ({"distill_attention": 0.5}, "train.distill_attention = 0.5")],
)
def test_a_checkpoint_that_used_a_retired_option_is_refused_naming_it(tmp_path, capsys, kw, key):
    path, _ = _older(tmp_path, "probe.pt", **kw)
    with pytest.raises(ConfigError, match="no longer has"):
        load_checkpoint(path)
    cfg = str(tmp_path / "tiny.toml")
    for flags in (["--set", f"train.init_from={path}"], ["--set", f"train.teacher={path}", "--set", "train.distill=1"],
                  ["--resume", str(path)]):
        assert cli.main(["--config", cfg, *flags, "--no-export", "--out", str(tmp_path / "x")]) == 78
        err = capsys.readouterr().err
        assert str(path) in err and key in err
    from train import evaluate_twin

    assert evaluate_twin.main([str(path), "--data", str(tmp_path / "data" / "b")]) == 1
    assert key in capsys.readouterr().err
