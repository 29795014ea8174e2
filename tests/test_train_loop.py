"""The trainer end to end on a tiny synthetic dataset: float twin, then the binary net from it, then export.

A few steps on 64x64 images; this checks the plumbing (config, data, two stages,
distillation, checkpoints, export to a file the runtime loads), not accuracy.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from train import train as tt  # noqa: E402


def _dataset(root, n, seed):
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    (root / "data.yaml").write_text("names: ['person']\n")
    for i in range(n):
        img = np.full((64, 64), 50, np.uint8)
        w, h = int(rng.integers(10, 20)), int(rng.integers(20, 40))
        x, y = int(rng.integers(0, 64 - w)), int(rng.integers(0, 64 - h))
        img[y : y + h, x : x + w] = 220
        cv2.imwrite(str(root / "images" / f"{i}.png"), img)
        (root / "labels" / f"{i}.txt").write_text(f"0 {(x + w / 2) / 64} {(y + h / 2) / 64} {w / 64} {h / 64}\n")


def _config(tmp_path, model="", **train):
    _dataset(tmp_path / "data" / "a", 24, 0)
    _dataset(tmp_path / "data" / "b", 8, 1)
    train = {"batch_size": 8, "max_steps": 3, "minutes": 5.0, "threads": 1, "warmup_steps": 1,
             "val_every_minutes": 1000.0, **train}
    settings = "".join(f"{k} = {json.dumps(v)}\n" for k, v in train.items())
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(
        f"""
[data]
classes = ["person"]
root = "{tmp_path / "data"}"

[[data.sources]]
name = "a"
path = "a"
format = "yolo"

[[data.sources]]
name = "b"
path = "b"
format = "yolo"
split = "val"

[model]
input_width = 64
input_height = 64
widths = [8, 16, 16, 16]
{model}

[train]
{settings}
[augment]
mosaic = 0.5
copy_paste = 0.0
"""
    )
    return cfg


def test_two_stages_train_and_export_a_model_the_runtime_runs(tmp_path):
    from app.detector import Detector
    from train.export import export_checkpoint

    teacher = tmp_path / "float" / "best.pt"
    cfg = _config(tmp_path, init_from=str(teacher), teacher=str(teacher), distill=1.0)
    assert tt.main(["--config", str(cfg), "--float-twin", "--no-export", "--out", str(tmp_path / "float")]) == 0
    assert teacher.is_file()
    assert tt.main(["--config", str(cfg), "--no-export", "--out", str(tmp_path / "bin")]) == 0
    history = json.loads((tmp_path / "bin" / "history.json").read_text())
    assert len(history["train"]) == 3 and all("kd" in r for r in history["train"])
    assert (tmp_path / "bin" / "curves.png").stat().st_size > 1000
    _, ck = tt.load_checkpoint(tmp_path / "bin" / "best.pt")
    _, fck = tt.load_checkpoint(teacher)
    assert ck["anchors"] == fck["anchors"]  # the head's meaning is inherited with the weights
    assert ck["config"]["model"]["binary"] and not fck["config"]["model"]["binary"]
    export_checkpoint(tmp_path / "bin" / "best.pt", tmp_path / "tiny.xnc")
    det = Detector(tmp_path / "tiny.xnc", score_threshold=0.0)
    out = det.detect(cv2.imread(str(tmp_path / "data" / "b" / "images" / "0.png")))
    assert out.ndim == 2 and out.shape[1] == 6


def test_binary_stage_without_its_float_twin_says_so(tmp_path, capsys):
    cfg = _config(tmp_path, init_from=str(tmp_path / "missing.pt"))
    assert tt.main(["--config", str(cfg), "--no-export", "--out", str(tmp_path / "bin")]) == 78
    err = capsys.readouterr().err
    assert "train.init_from" in err and "does not exist" in err and "--float-twin" in err


def test_bireal_blocks_train_in_both_stages_and_export_as_rbconv(tmp_path):
    from app.detector import Detector
    from app.modelfile import read_model
    from train.export import export_checkpoint

    teacher = tmp_path / "float" / "best.pt"
    cfg = _config(tmp_path, model="res_blocks = 2", init_from=str(teacher), teacher=str(teacher), distill=1.0)
    assert tt.main(["--config", str(cfg), "--float-twin", "--no-export", "--out", str(tmp_path / "float")]) == 0
    assert tt.main(["--config", str(cfg), "--no-export", "--out", str(tmp_path / "bin")]) == 0
    net, _ = tt.load_checkpoint(tmp_path / "bin" / "best.pt")
    twin, _ = tt.load_checkpoint(teacher)
    # The blocks start from the twin's signs (scaled into [-1, 1]), like every other binary conv.
    for b, f in zip(net.layers[-3:-1], twin.layers[-3:-1], strict=True):
        assert type(b).__name__ == "ResBConv" and b.weight.abs().max() <= 1.0
        assert bool(((b.weight >= 0) == (f.weight >= 0)).float().mean() > 0.9)
    export_checkpoint(tmp_path / "bin" / "best.pt", tmp_path / "res.xnc")
    assert [la.op for la in read_model(tmp_path / "res.xnc").layers][-3:] == ["rbconv", "rbconv", "head"]
    out = Detector(tmp_path / "res.xnc", score_threshold=0.0).detect(np.full((64, 64), 90, np.uint8))
    assert out.ndim == 2 and out.shape[1] == 6


def test_attention_transfer_pulls_the_real_stream_towards_a_same_topology_teacher(tmp_path, capsys):
    teacher = tmp_path / "float" / "best.pt"
    cfg = _config(tmp_path, model="res_blocks = 2", init_from=str(teacher), teacher=str(teacher), distill=1.0,
                  distill_attention=2.0)
    assert tt.main(["--config", str(cfg), "--float-twin", "--no-export", "--out", str(tmp_path / "float")]) == 0
    assert tt.main(["--config", str(cfg), "--no-export", "--out", str(tmp_path / "bin")]) == 0
    assert "attention transfer on layers [6, 7, 8]" in capsys.readouterr().out
    rows = json.loads((tmp_path / "bin" / "history.json").read_text())["train"]
    assert len(rows) == 3 and all(0 < r["at"] <= 4 for r in rows)
    # A teacher of another topology has no layer-for-layer stream to match.
    other = _config(tmp_path / "o", model="res_blocks = 1", teacher=str(teacher), distill=1.0, distill_attention=1.0)
    assert tt.main(["--config", str(other), "--no-export", "--out", str(tmp_path / "o" / "bin")]) == 78
    assert "same topology" in capsys.readouterr().err


def test_attention_maps_ignore_scale_and_see_where_the_activity_is():
    import torch

    r = torch.randn(2, 4, 3, 3)
    assert tt.attention_loss([r], [5 * r]).item() == pytest.approx(0.0, abs=1e-6)
    moved = torch.roll(r, 1, dims=3)
    assert tt.attention_loss([r], [moved]).item() > 0.01
    spot, flat = torch.zeros(1, 2, 2, 2), torch.ones(1, 2, 2, 2)
    spot[0, :, 0, 0] = 1  # all activity in one place against activity everywhere: |e1 - (1,1,1,1)/2|^2 = 1
    assert tt.attention_loss([spot], [flat]).item() == pytest.approx(1.0)


def test_attention_transfer_without_a_teacher_is_a_config_error():
    with pytest.raises(tt.ConfigError, match="needs a teacher"):
        tt.TrainConfig(distill_attention=1.0)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_bf16_precision_trains_in_bfloat16_then_settles_in_float32(tmp_path, monkeypatch, precision):
    import torch

    seen = []
    forward = tt.Detector.forward

    def recording(self, x, trace=False):
        out = forward(self, x, trace)
        seen.append((self.training, out.dtype))
        return out

    monkeypatch.setattr(tt.Detector, "forward", recording)
    cfg = _config(tmp_path, max_steps=10, precision=precision)
    assert tt.main(["--config", str(cfg), "--float-twin", "--no-export", "--out", str(tmp_path / "f")]) == 0
    student = [dtype for training, dtype in seen if training]
    assert len(student) == 10
    if precision == "bf16":
        # Progress 0.0 .. 0.8 under autocast; the last step (progress 0.9) is the float32 tail.
        assert student == [torch.bfloat16] * 9 + [torch.float32]
    else:
        assert set(student) == {torch.float32}
    assert {dtype for training, dtype in seen if not training} == {torch.float32}  # validation
    _, ck = tt.load_checkpoint(tmp_path / "f" / "best.pt")
    assert ck["config"]["train"]["precision"] == precision


def test_unknown_precision_is_a_config_error(tmp_path, capsys):
    cfg = _config(tmp_path, precision="fp16")
    assert tt.main(["--config", str(cfg), "--no-export", "--out", str(tmp_path / "x")]) == 78
    assert "train.precision must be fp32 or bf16" in capsys.readouterr().err


def test_evaluate_twin_scores_a_checkpoint_exactly_as_evaluation_scores_its_export(tmp_path, capsys):
    """The float twin's card numbers come from train.evaluate_twin: it must be python -m evaluation's scorer around torch.

    A binary checkpoint is bit-exact with its exported file, so the two reports must be equal, at the
    threshold --like reads from that file. A different letterbox, decode or threshold would show.
    """
    import dataclasses

    from evaluation.__main__ import main as evaluation_main
    from app.modelfile import read_model, write_model
    from train import evaluate_twin
    from train.export import export_checkpoint

    teacher = tmp_path / "float" / "best.pt"
    cfg = _config(tmp_path, init_from=str(teacher), max_steps=6)
    assert tt.main(["--config", str(cfg), "--float-twin", "--no-export", "--out", str(tmp_path / "float")]) == 0
    assert tt.main(["--config", str(cfg), "--no-export", "--out", str(tmp_path / "bin")]) == 0
    xnc = tmp_path / "bin.xnc"
    export_checkpoint(tmp_path / "bin" / "best.pt", xnc)
    write_model(xnc, dataclasses.replace(read_model(xnc), score_threshold=0.01))
    data = str(tmp_path / "data" / "b")

    def last_json(rc):
        assert rc == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    runtime = last_json(evaluation_main(["--model", str(xnc), "--data", data]))
    torch_side = last_json(evaluate_twin.main([str(tmp_path / "bin" / "best.pt"), "--like", str(xnc), "--data", data]))
    assert runtime["score_threshold"] == torch_side["score_threshold"] == pytest.approx(0.01)
    assert runtime["images"] == 8 and runtime["boxes"] == 8
    assert runtime["map50"] > 0  # some detections overlap the labels, so equal APs say equal boxes and scores
    for k in ("map50", "map50_95", "precision", "recall", "frames_found", "fp_per_100_empty"):
        assert torch_side[k] == pytest.approx(runtime[k], abs=1e-9), k
    twin = last_json(evaluate_twin.main([str(teacher), "--threshold", "0.1", "--data", data]))
    assert twin["score_threshold"] == 0.1 and twin["images"] == 8
    assert evaluate_twin.main([str(teacher), "--threshold", "2", "--data", data]) == 2
    assert evaluate_twin.main([str(teacher), "--like", str(tmp_path / "none.xnc"), "--data", data]) == 65


@pytest.mark.parametrize("which", ["best", "last"])
def test_eval_only_exports_the_chosen_checkpoint(tmp_path, monkeypatch, which):
    import train.export as te

    out = tmp_path / "run"
    out.mkdir()
    for name in ("best", "last"):
        (out / f"{name}.pt").write_bytes(b"")
    seen = []

    def fake_export(ckpt, target, command=""):
        seen.append(Path(ckpt).name)
        raise KeyboardInterrupt  # stop before calibration and evaluation, which need the datasets

    monkeypatch.setattr(te, "export_checkpoint", fake_export)
    cfg = _config(tmp_path)
    argv = ["--config", str(cfg), "--eval-only", "--out", str(out), "--export-to", str(tmp_path / "m.xnc")]
    with pytest.raises(KeyboardInterrupt):
        tt.main(argv + (["--checkpoint", which] if which == "last" else []))
    assert seen == [f"{which}.pt"]


def test_distill_flag_sets_the_gain_after_teacher_and_rejects_a_negative_one():
    cfg = tt.load_config(Path(__file__).resolve().parents[1] / "train" / "configs" / "person.toml")
    parse = tt._parser().parse_args
    with_teacher = tt._overridden(dict(cfg), parse(["--teacher", "t.pt"]))
    assert with_teacher["train"].distill == 1.0  # --teacher alone turns distillation on
    lowered = tt._overridden(dict(cfg), parse(["--teacher", "t.pt", "--distill", "0.25"]))
    assert (lowered["train"].teacher, lowered["train"].distill) == ("t.pt", 0.25)
    assert tt._overridden(dict(cfg), parse(["--distill", "0"]))["train"].distill == 0.0
    for bad in ("-0.5", "nan"):
        with pytest.raises(tt.ConfigError, match="distill"):
            tt._overridden(dict(cfg), parse(["--teacher", "t.pt", "--distill", bad]))


def test_augment_flag_overrides_one_setting_and_rejects_unknown_keys_and_ranges():
    cfg = tt.load_config(Path(__file__).resolve().parents[1] / "train" / "configs" / "person.toml")
    parse = tt._parser().parse_args
    got = tt._overridden(dict(cfg), parse(["--augment", "mosaic=0.1", "--augment", "scale_min=0.75"]))["augment"]
    assert (got.mosaic, got.scale_min) == (0.1, 0.75)
    assert got.copy_paste == cfg["augment"].copy_paste  # the others stay as configured
    for bad, why in (("mosaic=1.5", "mosaic"), ("scale_min=2", "scale_min"), ("zoom=1", "unknown key"),
                     ("mosaic", "KEY=NUMBER"), ("noise=x", "KEY=NUMBER"), ("translate=nan", "translate")):
        with pytest.raises(tt.ConfigError, match=why):
            tt._overridden(dict(cfg), parse(["--augment", bad]))


def test_an_augment_table_out_of_range_is_refused_with_the_key(tmp_path):
    text = (Path(__file__).resolve().parents[1] / "train" / "configs" / "person.toml").read_text()
    bad = tmp_path / "bad.toml"
    bad.write_text(text.replace("mosaic = 0.3", "mosaic = -0.3"))
    with pytest.raises(tt.ConfigError, match=r"augment: .*mosaic"):
        tt.load_config(bad)


def _has_cxx() -> bool:
    import os
    import shutil

    return any(shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "clang++", "c++") if c)


@pytest.mark.skipif(not _has_cxx(), reason="torch.compile's CPU backend (inductor) needs a C++ compiler")
def test_compiled_training_follows_the_eager_one(tmp_path):
    """--compile must train the same network: the same losses (distillation included) and the same weights.

    Compiled kernels may round differently, and a sign can flip where a pre-activation sits on a threshold. Here
    three steps from one seed agree to 1e-7; the bound is 1e-3. Weighting the teacher's term 10 % lower in the
    compiled path fails it.
    """
    import torch

    teacher = tmp_path / "float" / "best.pt"
    cfg = _config(tmp_path, init_from=str(teacher), teacher=str(teacher), distill=1.0)
    assert tt.main(["--config", str(cfg), "--float-twin", "--no-export", "--out", str(tmp_path / "float")]) == 0
    runs = {}
    for side, extra in (("eager", []), ("compiled", ["--compile"])):
        logs = []
        cfg_d = tt._overridden(tt.load_config(cfg), tt._parser().parse_args(extra))
        tt.train(cfg_d, tmp_path / side, log=logs.append)
        assert not any("compile: failed" in m for m in logs), logs
        assert any(m.startswith("compile:") for m in logs) == (side == "compiled")
        runs[side] = json.loads((tmp_path / side / "history.json").read_text())["train"]
    for e, c in zip(runs["eager"], runs["compiled"], strict=True):
        for k in ("loss", "box", "obj", "kd"):
            assert c[k] == pytest.approx(e[k], rel=1e-3, abs=1e-6), (e["step"], k)
    (eager, _), (compiled, _) = (tt.load_checkpoint(tmp_path / s / "last.pt") for s in ("eager", "compiled"))
    for (name, a), b in zip(eager.state_dict().items(), compiled.state_dict().values(), strict=True):
        if a.is_floating_point():
            assert torch.allclose(a, b, rtol=1e-2, atol=1e-3), name


def test_a_failing_compile_falls_back_to_eager_training(tmp_path, monkeypatch):
    import torch

    def broken(fn):
        def call(*a, **k):
            raise RuntimeError("no C++ compiler\nsecond line")

        return call

    monkeypatch.setattr(torch, "compile", broken)
    logs = []
    cfg = tt._overridden(tt.load_config(_config(tmp_path)), tt._parser().parse_args(["--compile"]))
    tt.train(cfg, tmp_path / "run", log=logs.append)
    assert [m for m in logs if "compile: failed" in m] == [
        "compile: failed (RuntimeError: no C++ compiler); training eagerly"
    ]
    assert len(json.loads((tmp_path / "run" / "history.json").read_text())["train"]) == 3


def test_real_act_naming_a_layer_without_a_sign_stops_before_training(tmp_path, capsys):
    cfg = _config(tmp_path)
    assert tt.main(["--config", str(cfg), "--no-export", "--real-act", "1", "--out", str(tmp_path / "p")]) == 78
    assert "layer 1 takes no sign" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def test_a_real_act_probe_trains_records_its_layers_and_is_not_exported(tmp_path, capsys):
    cfg = _config(tmp_path)
    target = tmp_path / "probe.xnc"
    argv = ["--config", str(cfg), "--real-act", "0,2", "--out", str(tmp_path / "p"), "--export-to", str(target)]
    assert tt.main(argv) == 0
    out = capsys.readouterr().out
    assert "probe: layers [0, 2] keep real activations" in out and "not exported" in out
    net, ck = tt.load_checkpoint(tmp_path / "p" / "best.pt")
    assert ck["config"]["model"]["real_act"] == [0, 2]
    assert [i for i, m in enumerate(net.layers) if getattr(m, "real_act", False)] == [0, 2]
    assert not target.exists()


@pytest.mark.parametrize(
    "model, flags, message",
    [
        ("", ["--float-twin", "--real-act", "0"], "probe of the binary net"),
        ("real_act = [1]", [], "layer 1 takes no sign"),
        ("", ["--ternary", "1"], "ternary: layer 1 takes no sign"),
        ("ternary = [5]", [], "ternary: layer 5 takes no sign"),  # the real-output bconv
        ("ternary = [2]", ["--real-act", "2"], "in both ternary and real_act"),
    ],
)
def test_a_real_act_or_ternary_the_net_cannot_take_is_a_config_error_from_the_flag_or_the_file(
    tmp_path, capsys, model, flags, message
):
    cfg = _config(tmp_path, model=model)
    assert tt.main(["--config", str(cfg), "--no-export", *flags, "--out", str(tmp_path / "p")]) == 78
    assert message in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def test_a_ternary_net_trains_exports_and_the_runtime_computes_it(tmp_path, capsys):
    """--ternary end to end: the checkpoint records the layers, export writes ternary layers, and the
    runtime's head on a frame is torch's."""
    from app.modelfile import read_model
    from app.network import Network
    from app.randmodel import synthetic_frame
    from train.export import export_checkpoint

    cfg = _config(tmp_path)
    assert tt.main(["--config", str(cfg), "--no-export", "--ternary", "0,2", "--out", str(tmp_path / "t")]) == 0
    assert "ternary: layers [0, 2] have ternary activations (two sign planes each on the Pi)" in capsys.readouterr().out
    net, ck = tt.load_checkpoint(tmp_path / "t" / "best.pt")
    assert ck["config"]["model"]["ternary"] == [0, 2]
    assert [i for i, m in enumerate(net.layers) if getattr(m, "ternary", False)] == [0, 2]
    export_checkpoint(tmp_path / "t" / "best.pt", tmp_path / "t.xnc")
    model = read_model(tmp_path / "t.xnc")
    assert model.layers[0].params["output"] == "ternary" and model.layers[2].params["output"] == "ternary"
    assert model.layers[0].tensors["threshold"].shape == (2, 8)
    img = synthetic_frame(3, 64, 64, 1)
    with torch.no_grad():
        head_t = net(torch.from_numpy(img).float()[None, None])[0].permute(1, 2, 0).numpy()
    assert np.abs(Network(model).forward(img[:, :, None]) - head_t).max() < 1e-4


def test_the_float_twin_of_a_ternary_net_is_the_same_float_net(tmp_path):
    """One MODEL_ARGS serves both stages of train/gpu.sh: the twin drops --ternary, the binary stage keeps it."""
    path = _config(tmp_path)
    twin = tt._overridden(tt.load_config(path), tt._parser().parse_args(["--float-twin", "--ternary", "0,2"]))
    assert twin["model"].ternary == () and not twin["model"].binary
    binary = tt._overridden(tt.load_config(path), tt._parser().parse_args(["--ternary", "0,2"]))
    assert binary["model"].ternary == (0, 2) and binary["model"].binary
