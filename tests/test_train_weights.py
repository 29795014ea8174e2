"""train.weights: checkpoints kept in the repository as compact, strict, pickle-free .npz files."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch")

import torch  # noqa: E402

from train.weights import WeightsError, load_weights, save_weights  # noqa: E402


def _ck():
    g = torch.Generator().manual_seed(0)
    return {
        "model": {
            "layers.0.weight": torch.randn(8, 1, 3, 3, generator=g),
            "layers.0.bn.running_var": torch.rand(8, generator=g) + 0.5,
            "layers.0.bn.num_batches_tracked": torch.tensor(1234),
            "latent": torch.tensor([1e-9, -1e-9, 0.3, -0.7, 0.0]),
        },
        "config": {"model": {"binary": True, "widths": [8]}, "train": {"lr": 1e-3}},
        "anchors": np.array([[3.0, 11.0], [20.0, 33.0]], np.float32),
        "class_names": ["person"],
        "step": np.int64(42),
        "val": 0.5,
    }


def test_round_trip_keeps_config_integers_and_every_sign(tmp_path):
    ck = _ck()
    size = save_weights(ck, tmp_path / "w.npz")
    back = load_weights(tmp_path / "w.npz")
    assert size == (tmp_path / "w.npz").stat().st_size
    assert back["config"] == ck["config"] and back["class_names"] == ["person"] and back["step"] == 42
    assert back["anchors"] == [[3.0, 11.0], [20.0, 33.0]]
    m = back["model"]
    assert m["layers.0.bn.num_batches_tracked"].item() == 1234 and m["layers.0.bn.num_batches_tracked"].dtype == torch.int64
    torch.testing.assert_close(m["layers.0.weight"], ck["model"]["layers.0.weight"], atol=2e-3, rtol=1e-3)
    assert torch.equal(torch.sign(m["latent"]), torch.sign(ck["model"]["latent"]))  # 1e-9 underflows float16
    exact = load_weights(tmp_path / "e.npz") if save_weights(ck, tmp_path / "e.npz", exact=True) else None
    assert torch.equal(exact["model"]["layers.0.weight"], ck["model"]["layers.0.weight"])


def test_half_precision_halves_the_file(tmp_path):
    ck = _ck()
    ck["model"]["big"] = torch.randn(256, 256, 3, 3)
    half, full = save_weights(ck, tmp_path / "h.npz"), save_weights(ck, tmp_path / "f.npz", exact=True)
    assert half < 0.6 * full


def test_a_file_that_is_not_ours_is_refused(tmp_path):
    np.savez(tmp_path / "plain.npz", a=np.zeros(3))
    with pytest.raises(WeightsError, match="not an xnorcam weights file"):
        load_weights(tmp_path / "plain.npz")
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(WeightsError, match="not a weights file"):
        load_weights(tmp_path / "junk.npz")
    meta = json.dumps({"format": "xnorcam-weights", "version": 99, "config": {}, "anchors": [], "class_names": []})
    np.savez(tmp_path / "future.npz", __meta__=np.frombuffer(meta.encode(), np.uint8))
    with pytest.raises(WeightsError, match="version 99"):
        load_weights(tmp_path / "future.npz")
    with pytest.raises(WeightsError, match="no 'anchors'"):
        save_weights({"model": {}, "config": {}, "class_names": []}, tmp_path / "x.npz")


def test_nothing_in_the_file_needs_pickle(tmp_path):
    save_weights(_ck(), tmp_path / "w.npz")
    with np.load(tmp_path / "w.npz", allow_pickle=False) as z:
        assert all(z[k].dtype != object for k in z.files)


def test_a_weights_file_starts_training_like_its_checkpoint(tmp_path):
    """The trainer's every checkpoint read takes the .npz: a net loaded from it computes what the checkpoint's does."""
    from tests.test_train_loop import _config
    from train import cli
    from train.checkpoints import load_checkpoint
    from train.weights import main

    cfg = _config(tmp_path, max_steps=3)
    assert cli.main(["--config", str(cfg), "--float-twin", "--no-export", "--out", str(tmp_path / "f")]) == 0
    assert main([str(tmp_path / "f" / "best.pt"), str(tmp_path / "f.npz"), "--exact"]) == 0
    assert main([str(tmp_path / "f" / "best.pt"), str(tmp_path / "f.pt")]) == 2
    (a, _), (b, ck) = load_checkpoint(tmp_path / "f" / "best.pt"), load_checkpoint(tmp_path / "f.npz")
    x = torch.rand(2, 1, 64, 64) * 255
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x))
    assert ck["class_names"] == ["person"]
    rc = cli.main(["--config", str(cfg), "--set", f"train.init_from={tmp_path / 'f.npz'}", "--set", "train.distill=0",
                  "--no-export", "--out", str(tmp_path / "b")])
    assert rc == 0 and (tmp_path / "b" / "last.pt").is_file()
