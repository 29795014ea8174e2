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


def _stages():
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    out = subprocess.run(
        ["make", "-n", "--no-print-directory", "train-shipped", "LINEAGE=L"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    lines = [shlex.split(x) for x in out.splitlines() if "-m train.train" in x]
    return [x[x.index("train.train") + 1 :] for x in lines]


def test_every_stage_parses_and_starts_from_an_earlier_stage():
    stages = _stages()
    assert len(stages) == 10  # eight training stages and stage 8's teacher, then the export of the last
    made: list[str] = []
    for argv in stages:
        args = tt._parser().parse_args(argv)
        for needed in (args.init_from, args.resume, args.teacher):
            if needed:
                folder, name = needed.rsplit("/", 1)
                assert folder in made and name in ("best.pt", "last.pt"), f"{needed} is not made by an earlier stage"
        if not args.eval_only:
            assert args.no_export and args.minutes > 0
            made.append(args.out)
        else:
            assert args.out == made[-1]  # the last stage is the one exported
    assert tt._parser().parse_args(stages[0]).float_twin
    # The card's lineage names the same flags for the stage that made the shipped file.
    card = (ROOT / "models" / "README.md").read_text()
    assert "--ema 0.999" in card and "--resume" in card
    exported = tt._parser().parse_args(stages[-1])
    assert exported.eval_only and f"--res-blocks {exported.res_blocks} --eval-only --checkpoint {exported.checkpoint}" in card
