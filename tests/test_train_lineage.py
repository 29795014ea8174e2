"""`make train-shipped` replays the shipped model's stages: each stage starts from one made before it."""

from __future__ import annotations

import shlex
import shutil
import subprocess
from dataclasses import asdict
from pathlib import Path

import pytest

pytest.importorskip("torch")

from train import cli  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _steps():
    """(module, argv) of every python step of the replay, in order."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    out = subprocess.run(
        ["make", "-n", "--no-print-directory", "train-shipped", "LINEAGE=L"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    steps = []
    for line in out.replace("\\\n", " ").splitlines():
        for module in ("train.train", "train.from_model"):
            if f"-m {module}" in line:
                argv = shlex.split(line)
                steps.append((module, argv[argv.index(module) + 1 :]))
    return steps


def _stage(argv):
    """(parsed flags, the config the stage trains with: config file, --set, --augment, the twin's changes)."""
    args = cli.parser().parse_args(argv)
    return args, cli.configure(args)


def test_every_stage_starts_from_checkpoints_made_by_an_earlier_stage():
    """Every checkpoint a stage reads (its start, its teacher) comes from the replay itself.

    The config file names runs/person-float/best.pt as start and teacher; a stage that forgot to
    set its own would silently read whatever is there instead of its lineage.
    """
    steps = _steps()
    stages = [argv for module, argv in steps if module == "train.train"]
    # twelve training stages and two twins; the distillation and ternary stages exported for from_model, the last
    # exported
    assert len(stages) == 17 and sum(m == "train.from_model" for m, _ in steps) == 2
    made: list[str] = []
    exported: list[str] = []
    for module, argv in steps:
        if module == "train.from_model":
            src, dst = argv[0], argv[1]
            assert src in exported, f"{src} is not exported by an earlier stage"
            made.append(dst.rsplit("/", 1)[0])
            continue
        args, cfg = _stage(argv)
        tc = cfg["train"]
        if args.eval_only:
            assert args.out in made
            exported.append(args.export_to or tc.export_to)
            continue
        read = [args.resume] if args.resume else [tc.init_from]
        read += [tc.teacher] if tc.distill > 0 else []
        for needed in filter(None, read):
            folder, name = needed.rsplit("/", 1)
            assert folder in made and name in ("best.pt", "last.pt"), f"{args.out}: {needed} is not made earlier"
        assert args.no_export and tc.minutes > 0 and args.out not in made
        made.append(args.out)
    first, _ = _stage(stages[0])
    assert first.float_twin and not _stage(stages[0])[1]["train"].init_from  # the lineage starts from nothing
    last, last_cfg = _stage(stages[-1])
    assert last.eval_only and last.export_to is None and last.out == made[-1]  # the last stage is the one shipped
    assert last_cfg["train"].export_to == "models/person.xnc"


def test_the_replay_ends_in_the_shipped_network():
    """The last stage trains and exports the network of models/person.xnc, layer for layer."""
    from app.modelfile import read_model
    from train.from_model import config_of

    _, cfg = _stage([argv for module, argv in _steps() if module == "train.train"][-1])
    shipped = read_model(ROOT / "models" / "person.xnc")
    assert asdict(cfg["model"]) == asdict(config_of(shipped))
    assert list(cfg["data"].classes) == list(shipped.class_names)
