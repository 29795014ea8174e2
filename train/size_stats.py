"""How tall the training boxes are after augmentation, against the validation split's.

    python -m train.size_stats [--augment mosaic=0.1 ...] [--samples 2000]

A detector learns the object sizes it is shown. Mosaic, zooming out and
copy-paste all make people smaller, and the third-block network boxed people
taller than 0.65 of the frame in 30 % of frames against 52 % for shorter ones: its
augmented batches held a third as many of them as the validation frames do.
This prints the share of boxes per height band (fraction of the input height)
for augmented and plain training samples and for validation, and the share of
frames holding exactly one standing person (the walking-person case), so an
augmentation setting can be checked before hours are spent training with it.
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from evaluation.metrics import stands

BANDS = (0.0, 0.1, 0.25, 0.45, 0.65, 0.85, 1.0 + 1e-9)


def size_shares(maker, indices, augment: bool, height: int, batch: int = 64) -> dict:
    """{"bands": share of boxes per BANDS height band, "one_standing": share of samples with one box,
    taller than wide and at least a quarter of the input tall, "boxes": count} over ``indices``."""
    heights, single, n = [], 0, 0
    for k in range(0, len(indices), batch):
        chunk = indices[k : k + batch]
        _, _, tg = maker.sources(chunk, augment=augment)
        h = (tg[:, 5] - tg[:, 3]) / height
        w = (tg[:, 4] - tg[:, 2]) / height
        heights.append(h)
        for b in range(len(chunk)):
            mine = tg[:, 0] == b
            single += int(mine.sum() == 1 and stands(w[mine][0], h[mine][0], 1.0))
        n += len(chunk)
    h = np.concatenate(heights) if heights else np.zeros(0)
    counts = np.histogram(h, BANDS)[0]
    return {
        "bands": (counts / max(1, len(h))).round(4).tolist(),
        "one_standing": round(single / max(1, n), 4),
        "boxes": int(len(h)),
    }


def main(argv=None) -> int:
    from train.augment import BatchMaker, no_augment
    from train.config import load_config
    from train.data import ConfigError, LabelError, LoadReport, cached_split

    ap = argparse.ArgumentParser(prog="python -m train.size_stats", description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="train/configs/person.toml")
    ap.add_argument("--augment", action="append", default=[], metavar="KEY=VALUE",
                    help="override one [augment] setting, as train.train takes it (repeatable)")
    ap.add_argument("--samples", type=int, default=2000, help="training samples to draw (default 2000)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.samples < 1:
        print("--samples must be >= 1", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config, augment=args.augment)
        aug = cfg["augment"]
        report = LoadReport()
        train, val = cached_split(cfg["data"], "train", report), cached_split(cfg["data"], "val", report)
    except (ConfigError, LabelError) as e:
        print(f"config: {e}", file=sys.stderr)
        return 78
    w, h = cfg["model"].input_width, cfg["model"].input_height
    rng = np.random.default_rng(args.seed)
    draw = rng.integers(0, len(train), args.samples)
    rows = {
        "train augmented": size_shares(BatchMaker(train, aug, w, h, seed=args.seed), draw, True, h),
        "train plain": size_shares(BatchMaker(train, no_augment(), w, h), draw, False, h),
        "validation": size_shares(BatchMaker(val, no_augment(), w, h), np.arange(len(val)), False, h),
    }
    edges = [f"{a:g}-{min(b, 1.0):g}" for a, b in zip(BANDS[:-1], BANDS[1:], strict=True)]
    print(f"augment: {aug}")
    print(f"{'boxes per height band':<18}" + "".join(f"{e:>10}" for e in edges) + f"{'one standing':>14}")
    for name, r in rows.items():
        print(f"{name:<18}" + "".join(f"{v:>10.1%}" for v in r["bands"]) + f"{r['one_standing']:>14.1%}")
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
