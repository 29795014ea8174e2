"""``python -m train.train``: train the binary detector (or its float twin), then export, calibrate and evaluate it.

    python -m train.train [--config FILE] [--float-twin] [--set SECTION.KEY=VALUE ...] [--augment KEY=VALUE ...]
                          [--out DIR] [--packed DIR] [--resume CKPT] [--smoke] [--no-export]
    python -m train.train --eval-only [--checkpoint best|last] [--out DIR] [--export-to FILE]

Every setting of a run is a key of the config file (train/config.py), changed
for one run with ``--set``, e.g. ``--set train.minutes=20 --set train.lr=3e-4
--set model.res_blocks=3 --set train.init_from=runs/x/best.pt``. The flags are
what is not a setting: which stage, where things go, what to do after.

After training a binary net, the chosen checkpoint (``--checkpoint``) is exported
to ``train.export_to`` (or ``--export-to``), its default score threshold set on the
split's dropped images, and the file scored through the runtime Detector on the
held-out split; a float twin's checkpoint is scored in torch the same way.

Exit codes: 0 done, 2 bad command line, 78 configuration refused (an unknown
key, a value of the wrong type or out of range, a checkpoint that is missing).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from train.config import check_model, float_twin, load_config, set_keys, smoke
from train.data import ConfigError, repo_root


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m train.train",
        description="Train the binary detector (or its float twin), then export, calibrate and evaluate it.",
    )
    ap.add_argument("--config", default="train/configs/person.toml", help="the TOML config (default: %(default)s)")
    ap.add_argument(
        "--float-twin",
        action="store_true",
        help="train the float twin: the same network in real values, from nothing, for train.float_minutes at "
        "train.float_lr",
    )
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="set one config key for this run, VALUE in TOML (repeatable), e.g. --set train.lr=3e-4 "
        "--set model.ternary=[2,4]",
    )
    ap.add_argument(
        "--augment",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set one [augment] number, e.g. --augment mosaic=0.1 (repeatable)",
    )
    ap.add_argument("--out", help="run folder (default: train.out_dir, with -float for the twin)")
    ap.add_argument("--packed", help="train from python -m train.pack's folder instead of the datasets")
    ap.add_argument("--resume", help="continue from this checkpoint (weights and anchors; a new schedule)")
    ap.add_argument("--smoke", action="store_true", help="a few steps on a few images: checks the pipeline")
    ap.add_argument("--no-export", action="store_true", help="skip export and evaluation after training")
    ap.add_argument(
        "--eval-only", action="store_true", help="no training: export and evaluate OUT/best.pt (or --checkpoint)"
    )
    ap.add_argument(
        "--checkpoint",
        choices=("best", "last"),
        default="best",
        help="which checkpoint of OUT to export and evaluate: the one validation picked, or the last (default best)",
    )
    ap.add_argument("--export-to", help="model file to write (default: train.export_to)")
    return ap


def configure(args) -> dict:
    """The run's config: the file, the ``--set`` and ``--augment`` items, then the twin's or a smoke run's changes."""
    cfg = load_config(args.config, args.set, args.augment)
    if args.float_twin:
        cfg = float_twin(cfg, explicit=set_keys(args.set))
    if args.smoke:
        cfg = smoke(cfg)
    check_model(cfg)
    return cfg


def out_dir(cfg: dict, args) -> Path:
    if args.out:
        return Path(args.out)
    out = repo_root() / cfg["train"].out_dir
    return out.with_name(out.name + "-float") if args.float_twin else out


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        cfg = configure(args)
        out = out_dir(cfg, args)
        if not args.eval_only:
            from train.train import train

            train(cfg, out, resume=args.resume, packed=args.packed)
    except ConfigError as e:
        print(f"config: {e}", file=sys.stderr)
        return 78
    if args.no_export or args.smoke:
        return 0
    return export_and_evaluate(cfg, out, args.checkpoint, args.export_to, argv)


def export_and_evaluate(cfg: dict, out: Path, checkpoint: str, export_to, argv) -> int:
    """Binary: export OUT/CHECKPOINT.pt, set its default threshold, score the file. Float twin: score it in torch."""
    from evaluation.datasets import validation_split
    from evaluation.score import EVAL_SCORE_THRESHOLD, REPORT_KEYS, evaluate
    from train.report import plot_pr

    ckpt = out / f"{checkpoint}.pt"
    if cfg["model"].binary:
        from app.detector import Detector
        from train.calibrate import calibrate_score_threshold
        from train.export import export_checkpoint

        target = Path(export_to) if export_to else repo_root() / cfg["train"].export_to
        export_checkpoint(ckpt, target, command=" ".join(["python -m train.train", *(argv or sys.argv[1:])]))
        print(f"exported {target}")
        thr, f1, p, r = calibrate_score_threshold(target, cfg["data"])
        # The exported file through the runtime Detector: the numbers the Pi would get.
        det = Detector(target, score_threshold=EVAL_SCORE_THRESHOLD)
        on = det.model.metadata["score_threshold_calibration"]["on"]  # training images when the split drops none
        print(f"default score threshold {thr} (F1 {f1:.3f}, P {p:.3f}, R {r:.3f} on {on})")
        m = evaluate(det.detect, validation_split(), list(det.class_names), det.model.score_threshold)
        title = "binary (runtime)"
    else:
        from train.evaluate_twin import evaluate_torch

        m = evaluate_torch(ckpt)
        title = "float twin (torch)"
    plot_pr(m, out / "pr.png", title)
    summary = {k: m[k] for k in REPORT_KEYS}  # python -m evaluation's numbers, false boxes on empty scenes too
    (out / "metrics.json").write_text(json.dumps(summary))
    print(json.dumps(summary))
    return 0
