"""Score a torch checkpoint (the float twin) exactly as ``python -m evaluation`` scores a model file.

    python -m train.evaluate_twin runs/person-float/best.pt --like models/person.xnc

The checkpoint's forward runs inside the runtime's letterbox, decode and NMS
(:func:`torch_detector`), on the same split, with the same scorer, so
the model card's binary and float rows differ only by the network. ``--like``
takes the score threshold for precision, recall, "all boxed" and "upright" from
a model file, so both rows use one threshold; ``--threshold`` sets it directly.
The last line is one JSON object, the same keys as ``python -m evaluation``'s.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from app.decode import decode
from app.modelfile import ModelFormatError, read_model
from app.preprocess import letterbox
from evaluation.datasets import DataError, load_dataset, source_of, validation_split
from evaluation.score import EVAL_SCORE_THRESHOLD, evaluate, print_report
from train.checkpoints import load_checkpoint
from train.data import ConfigError
from train.model import Detector


def torch_detector(net: Detector, anchors, score_threshold: float, nms_iou: float = 0.45):
    """detect(image) with the runtime's letterbox and decode around a torch model (for the float twin)."""
    c = net.cfg
    net.eval()

    @torch.no_grad()
    def detect(image):
        x, lb = letterbox(image, c.input_width, c.input_height, c.channels)
        t = torch.from_numpy(x).permute(2, 0, 1)[None].float()
        head = net(t)[0].permute(1, 2, 0).contiguous().numpy()
        return decode(
            head,
            anchors,
            (c.input_width, c.input_height),
            lb,
            image.shape[:2],
            score_threshold=score_threshold,
            nms_iou=nms_iou,
        )

    return detect


def evaluate_torch(ckpt, limit: int = 0, score_threshold: float = 0.25, samples=None, group_by=None) -> dict:
    """COCO metrics of a torch checkpoint by the same code as ``python -m evaluation`` (default: the validation split)."""
    net, ck = load_checkpoint(ckpt)
    detect = torch_detector(net, np.asarray(ck["anchors"], np.float32), EVAL_SCORE_THRESHOLD)
    samples = validation_split() if samples is None else samples
    return evaluate(detect, samples, ck["class_names"], score_threshold, limit, group_by=group_by)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.evaluate_twin", description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint", help="a training checkpoint (best.pt / last.pt), float or binary")
    how = ap.add_mutually_exclusive_group()
    how.add_argument("--like", help="take the score threshold from this model file (e.g. models/person.xnc)")
    how.add_argument("--threshold", type=float, help="score threshold for precision, recall and boxed frames")
    ap.add_argument("--data", help="dataset folder (default: the held-out validation split in ../shared)")
    ap.add_argument("--limit", type=int, default=0, help="evaluate at most N images")
    args = ap.parse_args(argv)

    if args.like:
        try:
            threshold = float(read_model(args.like).score_threshold)
        except (ModelFormatError, OSError) as e:
            print(f"--like {args.like}: {e}", file=sys.stderr)
            return 65
    else:
        threshold = 0.25 if args.threshold is None else args.threshold
    if not 0.0 <= threshold <= 1.0:
        print(f"--threshold must be within [0, 1] (got {threshold})", file=sys.stderr)
        return 2
    try:
        _, ck = load_checkpoint(args.checkpoint)  # fail here, with a clear message, not inside the scorer
    except (OSError, KeyError, RuntimeError, ConfigError) as e:
        print(f"cannot load the checkpoint {args.checkpoint}: {e}", file=sys.stderr)
        return 1
    try:
        samples = load_dataset(args.data) if args.data else validation_split()
    except DataError as e:
        print(f"evaluation data: {e}", file=sys.stderr)
        return 1
    kind = "binary" if ck["config"]["model"]["binary"] else "float"
    print(f"checkpoint: {args.checkpoint} ({kind}, torch)  images: {len(samples[: args.limit or None])}")
    m = evaluate_torch(args.checkpoint, args.limit, threshold, samples, group_by=None if args.data else source_of)
    print_report(m, threshold)
    return 0


if __name__ == "__main__":
    sys.exit(main())
