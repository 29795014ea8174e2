"""What packing costs: size of the packed caches, and the shipped model's mAP on pixels that went through the pack.

    python benchmarks/pack_quality.py [--config train/configs/person.toml] [--sides 224,192] [--qualities 60,70,80,90]

For each long side and JPEG quality it packs the training split (the size that must
travel) and the validation split, decodes the validation pack, and scores the shipped
model (the runtime Detector) on those grey images against the same images straight from
the cache. The pack's price is the mAP it loses; the pack must fit beside the code.
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from app.detector import Detector  # noqa: E402
from evaluation.metrics import coco_metrics  # noqa: E402
from evaluation.score import EVAL_SCORE_THRESHOLD  # noqa: E402
from train.config import load_config  # noqa: E402
from train.data import (  # noqa: E402
    LoadReport,
    cached_split,
    load_packed,
    pack_cache,
    repo_root,  # noqa: E402
    shrink_cache,
)
from train.pack import CARRY_LIMIT, WHEEL_ALLOWANCE, tree_bytes  # noqa: E402


def map50(det, cache) -> float:
    dets = [det.detect(im) for im in cache.images]
    gts = list(zip(cache.boxes, cache.classes, strict=True))
    return coco_metrics(gts, dets, 1, [im.shape for im in cache.images])["map50"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="train/configs/person.toml")
    ap.add_argument("--sides", default="224,192")
    ap.add_argument("--qualities", default="60,70,80,90")
    args = ap.parse_args(argv)
    dc = load_config(args.config)["data"]
    train, val = cached_split(dc, "train", LoadReport()), cached_split(dc, "val", LoadReport())
    det = Detector(score_threshold=EVAL_SCORE_THRESHOLD)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for side in (int(v) for v in args.sides.split(",")):
            t_side, v_side = shrink_cache(train, side), shrink_cache(val, side)
            raw = map50(det, v_side)
            for q in (int(v) for v in args.qualities.split(",")):
                size = pack_cache(t_side, Path(tmp) / "t.npz", "k", q) + pack_cache(v_side, Path(tmp) / "v.npz", "k", q)
                back = map50(det, load_packed(Path(tmp) / "v.npz", "k"))
                rows.append({"long_side": side, "quality": q, "mib": round(size / 2**20, 1),
                             "map50_raw": round(raw, 4), "map50_packed": round(back, 4)})
                print(f"long side {side}  quality {q}: {size / 2**20:5.1f} MiB  val mAP@0.5 {raw:.4f} -> {back:.4f}")
    print(f"budget beside the tracked files: {(CARRY_LIMIT - tree_bytes(repo_root()) - WHEEL_ALLOWANCE) / 2**20:.1f} MiB")
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
