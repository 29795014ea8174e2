"""``python -m evaluation``: score a model file through the runtime Detector (the exact Pi code).

    python -m evaluation [--model FILE] [--data DIR [--format yolo|voc|coco] | --images val|drop] [--source NAME]
                         [--class NAME] [--limit N] [--threshold T] [--sheet FILE.png [--sheet-images N]]

Without ``--data`` it scores the shipped model's held-out split from the shared
datasets folder: the images listed as ``val`` in models/person-split.txt (whole
scenes of the person sets, a block of everyday photos and the person-free crops
cut from them) plus all of coco_mini, and each source on its own too.
``--source general/coco_person`` keeps one of those sources. ``--images drop``
scores the split's dropped images instead (used neither to train nor to validate:
where the default threshold is calibrated, and where to compare training runs
without looking at the held-out split).

It prints mAP@0.5 and mAP@0.5:0.95 (pycocotools); at the model's default score
threshold (or ``--threshold``) precision and recall, false boxes per 100 images
without a labelled object and the share of those with any box; and as the LAST
line one JSON object with every number and its count. ``--sheet`` draws a
contact sheet: true positives green, false positives red, missed objects yellow.

A YOLO folder without data.yaml reads its class ids as the model's classes (0 = the
model's first). A class that has no labelled box in the data is said and refused
(exit 65): its mAP would be a silent 0; ``--allow-no-boxes`` scores such data anyway
(false boxes on person-free images). A malformed label stops the run with a message
naming the file and the entry; ``--skip-bad`` skips those images and counts them.

Exit codes: 0 done, 2 bad command line (or no data to find), 65 model file or data
refused, 1 anything else.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from evaluation.datasets import (
    FORMATS,
    DataError,
    LoadReport,
    load_dataset,
    source_of,
    split_images,
    validation_split,
)
from evaluation.score import EVAL_SCORE_THRESHOLD, evaluate, print_report


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m evaluation", description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="model file (default: the shipped models/person.xnc)")
    ap.add_argument("--data", help="dataset folder (default: the held-out validation split in ../shared)")
    ap.add_argument("--format", choices=FORMATS, help="dataset format (default: detected)")
    ap.add_argument("--images", choices=("val", "drop"), default="val",
                    help="of the default split: the held-out images (val, with coco_mini) or the dropped ones")
    ap.add_argument("--source", help="of the default split, score only this source (e.g. general/coco_person)")
    ap.add_argument("--class", dest="cls", help="score only this class name (default: all of the model's classes)")
    ap.add_argument("--limit", type=int, default=0, help="evaluate at most N images")
    ap.add_argument(
        "--threshold",
        type=float,
        help="score threshold for every number but mAP (default: the model's own)",
    )
    ap.add_argument("--skip-bad", action="store_true",
                    help="skip images with a malformed label (counted and the first named) instead of stopping")
    ap.add_argument("--allow-no-boxes", action="store_true",
                    help="score even when a scored class has no labelled box (false boxes on person-free images)")
    ap.add_argument("--sheet", help="also draw a contact sheet of the evaluated images to this PNG")
    ap.add_argument("--sheet-images", type=int, default=48, help="images on the sheet, spread evenly (default 48)")
    return ap


def main(argv=None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    if args.limit < 0:
        print("--limit must be >= 0", file=sys.stderr)
        return 2
    if args.threshold is not None and not EVAL_SCORE_THRESHOLD <= args.threshold <= 1.0:
        print(f"--threshold must be in [{EVAL_SCORE_THRESHOLD}, 1] (got {args.threshold})", file=sys.stderr)
        return 2
    if args.sheet is not None and not args.sheet.lower().endswith(".png"):
        print(f"--sheet must name a .png file (got {args.sheet!r})", file=sys.stderr)
        return 2
    if args.sheet_images < 1:
        print(f"--sheet-images must be >= 1 (got {args.sheet_images})", file=sys.stderr)
        return 2
    if args.data and args.images != "val":
        print("--images picks the default split's images; it does not go with --data", file=sys.stderr)
        return 2
    if args.source and args.data:
        print("--source picks a source of the default split; with --data, point --data at that source", file=sys.stderr)
        return 2
    try:  # the metric's dependency, before minutes of detection rather than after
        import pycocotools.cocoeval  # noqa: F401
    except ImportError as e:
        print(f"mAP needs pycocotools ({e}): pip install -r requirements-dev.txt", file=sys.stderr)
        return 1
    from app.detector import Detector
    from app.modelfile import ModelFormatError

    try:
        det = Detector(args.model, score_threshold=EVAL_SCORE_THRESHOLD)
    except ModelFormatError as e:
        print(f"model refused: {e}", file=sys.stderr)
        return 65
    except OSError as e:
        print(f"cannot load the model: {e}", file=sys.stderr)
        return 1
    names = list(det.class_names)
    if args.cls and args.cls not in names:
        print(f"--class {args.cls!r} is not one of the model's classes {names}", file=sys.stderr)
        return 2
    threshold = float(det.model.score_threshold) if args.threshold is None else args.threshold
    report = LoadReport()
    try:
        if args.data:
            samples = load_dataset(args.data, args.format, report=report, stop=not args.skip_bad, names=names)
        else:
            samples = validation_split() if args.images == "val" else split_images("drop")
    except DataError as e:
        print(f"evaluation data: {e}", file=sys.stderr)
        return 2 if not args.data else 65
    if args.data and (args.format or "yolo") == "yolo" and (Path(args.data) / "labels").is_dir() \
            and not (Path(args.data) / "data.yaml").exists():
        print(f"evaluation data: {args.data} has no data.yaml: its class ids are read as the model's classes "
              f"({', '.join(f'{i} = {n}' for i, n in enumerate(names))})", file=sys.stderr)
    if report.problems:
        print(f"evaluation data: skipped {len(report.problems)} malformed label(s) (--skip-bad); the first: "
              f"{report.problems[0]}", file=sys.stderr)
    if args.source:
        known = sorted({source_of(s) for s in samples})
        samples = [s for s in samples if source_of(s) == args.source]
        if not samples:
            print(f"--source {args.source!r} is not a source of the split; its sources are {known}", file=sys.stderr)
            return 2
    scored = [args.cls] if args.cls else names
    boxes = {n: sum(s.names.count(n) for s in samples[: args.limit or None]) for n in scored}
    empty = [n for n in scored if not boxes[n]]
    if empty and not args.allow_no_boxes:
        found = sorted({n for s in samples for n in s.names})
        print(f"evaluation data: no labelled box of class {', '.join(map(repr, empty))} in {len(samples)} images "
              f"(the labels name {found or 'no class at all'}); its mAP would be 0. Check the class names "
              f"(data.yaml 'names'), or pass --allow-no-boxes to score false boxes alone", file=sys.stderr)
        return 65
    what = args.data or (
        "validation split (models/person-split.txt + coco_mini)" if args.images == "val"
        else "the split's dropped images (models/person-split.txt)"
    )
    if args.source:
        what += f", source {args.source}"
    print(f"model: {args.model or 'default'}  data: {what}  images: {len(samples[: args.limit or None])}")
    try:
        # The default split is also scored per source, since they differ so much.
        group_by = None if args.data or args.source else source_of
        m = evaluate(det.detect, samples, names, threshold, args.limit, only=args.cls, group_by=group_by,
                     keep=bool(args.sheet))
        if args.sheet:
            from evaluation.sheet import draw_sheet

            title = f"{args.model or 'models/person.xnc'} on {args.source or args.data or 'the held-out split'}"
            n = draw_sheet(m["scored"], threshold, args.sheet, args.sheet_images, title=title)
            print(f"sheet: {n} images -> {args.sheet}")
    except DataError as e:
        print(f"evaluation data: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"{e}", file=sys.stderr)
        return 1
    print_report(m, threshold)
    return 0


if __name__ == "__main__":
    sys.exit(main())
