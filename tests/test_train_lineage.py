"""`make train-shipped` replays the shipped model's stages: each stage starts from one made before it."""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("torch")

from train import train as tt  # noqa: E402

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
    for line in out.splitlines():
        for module in ("train.train", "train.from_model"):
            if f"-m {module}" in line:
                argv = shlex.split(line)
                steps.append((module, argv[argv.index(module) + 1 :]))
    return steps


def test_every_stage_parses_and_starts_from_an_earlier_stage():
    steps = _steps()
    stages = [argv for module, argv in steps if module == "train.train"]
    # ten training stages and stage 8's teacher; stage 8 exported for from_model, the last exported
    assert len(stages) == 13 and sum(m == "train.from_model" for m, _ in steps) == 1
    made: list[str] = []
    exported: list[str] = []
    for module, argv in steps:
        if module == "train.from_model":
            src, dst = argv[0], argv[1]
            assert src in exported, f"{src} is not exported by an earlier stage"
            made.append(dst.rsplit("/", 1)[0])
            continue
        args = tt._parser().parse_args(argv)
        for needed in (args.init_from, args.resume, args.teacher):
            if needed:
                folder, name = needed.rsplit("/", 1)
                assert folder in made and name in ("best.pt", "last.pt"), f"{needed} is not made by an earlier stage"
        if not args.eval_only:
            assert args.no_export and args.minutes > 0
            made.append(args.out)
        else:
            assert args.out in made
            exported.append(args.export_to or "models/person.xnc")
    last = tt._parser().parse_args(stages[-1])
    assert last.eval_only and last.export_to is None and last.out == made[-1]  # the last stage is the one shipped
    assert tt._parser().parse_args(stages[0]).float_twin
    # The card's lineage names the same flags for the stage that made the shipped file.
    card = (ROOT / "models" / "README.md").read_text()
    assert "--ema 0.999" in card and "--resume" in card and "python -m train.from_model" in card
    ternary = f" --ternary {last.ternary}" if last.ternary else ""
    assert f"--res-blocks {last.res_blocks}{ternary} --eval-only --checkpoint {last.checkpoint}" in card
