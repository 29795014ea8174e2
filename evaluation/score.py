"""Run a detector over labelled images and score it: ``evaluate`` and the report ``python -m evaluation`` prints.

``detect(image) -> (N,6)`` is anything with the runtime Detector's contract: the
model file through ``app.detector.Detector`` (the Pi's exact code), or a torch
checkpoint inside the runtime's letterbox and decode (``train.evaluate_twin.torch_detector``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import cv2
import numpy as np

from app.sources import imread
from evaluation.datasets import DataError
from evaluation.metrics import coco_metrics, empty_images, frames_found, precision_recall, upright_found

# A low threshold gives COCO's AP the whole precision-recall curve; the other numbers use the model's own threshold.
EVAL_SCORE_THRESHOLD = 0.005


@dataclass(frozen=True)
class Scored:
    """One evaluated image: what the labels say and what the detector said (pixels), for a contact sheet."""

    image: object  # Path
    boxes: np.ndarray  # (n,4) labels of the scored classes, px
    classes: np.ndarray  # (n,) index into the class names
    dets: np.ndarray  # (N,6) detections of the scored classes, px
    shape: tuple  # (h, w)


def evaluate(
    detect,
    samples: list,
    class_names,
    score_threshold: float,
    limit: int = 0,
    progress=None,
    only: str | None = None,
    group_by=None,
    keep: bool = False,
) -> dict:
    """Run ``detect`` over :class:`evaluation.datasets.Sample` s; boxes of classes the model lacks are ignored.

    ``only``: score one class name (its labels and detections alone). ``group_by``: a key function of a
    sample; each key's samples are also scored on their own, under ``m["groups"][key]``. ``keep``: also
    return every image's labels and detections as ``m["scored"]`` (a list of :class:`Scored`).
    """
    names = [n for n in class_names if only is None or n == only]
    index = {n: list(class_names).index(n) for n in names}
    samples = samples[:limit] if limit else samples
    gts, dets, shapes, scored = [], [], [], []
    for s in progress(samples) if progress else samples:
        img = imread(s.image, cv2.IMREAD_COLOR)
        if img is None:
            raise DataError(f"{s.image}: cannot decode image")
        h, w = img.shape[:2]
        keep_idx = [k for k, n in enumerate(s.names) if n in index]
        boxes = s.boxes[keep_idx].astype(np.float64) * [w, h, w, h]
        classes = np.array([index[s.names[k]] for k in keep_idx], np.int64)
        d = np.asarray(detect(img), np.float32).reshape(-1, 6)
        d = d[np.isin(d[:, 5], list(index.values()))]
        gts.append((boxes, classes))
        dets.append(d)
        shapes.append((h, w))
        if keep:
            scored.append(Scored(s.image, boxes, classes, d, (h, w)))

    def score(sel):
        g, d, sh = [gts[i] for i in sel], [dets[i] for i in sel], [shapes[i] for i in sel]
        m = coco_metrics(g, d, len(class_names), sh)
        m["precision"], m["recall"] = precision_recall(g, d, score_threshold)
        m.update(
            images=len(sel),
            boxes=int(sum(len(x[0]) for x in g)),
            labelled_images=int(sum(len(x[0]) > 0 for x in g)),
            frames_found=frames_found(g, d, score_threshold),
        )
        m["upright_found"], m["upright_frames"] = upright_found(g, d, sh, score_threshold)
        m.update(empty_images(g, d, score_threshold))
        return m

    m = score(range(len(gts)))
    members: dict = {}
    for i, s in enumerate(samples if group_by else ()):
        members.setdefault(group_by(s), []).append(i)
    m["groups"] = {key: score(sel) for key, sel in sorted(members.items())}
    if keep:
        m["scored"] = scored
    return m


REPORT_KEYS = (
    "map50",
    "map50_95",
    "images",
    "precision",
    "recall",
    "boxes",
    "labelled_images",
    "frames_found",
    "upright_found",
    "upright_frames",
    "fp_per_100_empty",
    "empty_with_box",
    "empty_images",
)


def print_report(m: dict, threshold: float) -> dict:
    """Print evaluate()'s metrics; the last line is one JSON object (REPORT_KEYS and the threshold)."""
    print(f"mAP@0.5      {m['map50']:.4f}")
    print(f"mAP@0.5:0.95 {m['map50_95']:.4f}")
    print(
        f"at score >= {threshold:g} (IoU 0.5): precision {m['precision']:.4f}, recall {m['recall']:.4f} "
        f"of {m['boxes']} labelled objects in {m['labelled_images']} images"
    )
    print(
        f"images without a labelled object: {m['empty_images']}; false boxes per 100 of them "
        f"{m['fp_per_100_empty']:.1f}; {m['empty_with_box']:.1%} of them with any box"
    )
    print(f"frames with every labelled object boxed: {m['frames_found']:.1%}")
    print(
        f"frames of one upright object >= 1/4 of the frame tall, boxed: {m['upright_found']:.1%} "
        f"of {m['upright_frames']}"
    )
    for name, g in m.get("groups", {}).items():
        empty = f"  empty {g['empty_images']}: {g['fp_per_100_empty']:.0f} FP/100" if g["empty_images"] else ""
        print(
            f"  {name:<22} {g['images']:>4} images  mAP@0.5 {g['map50']:.3f}  mAP@0.5:0.95 {g['map50_95']:.3f}  "
            f"P {g['precision']:.3f}  R {g['recall']:.3f}  all boxed {g['frames_found']:.1%}  "
            f"upright {g['upright_found']:.1%} of {g['upright_frames']}{empty}"
        )
    out = {k: m[k] for k in REPORT_KEYS}
    out["score_threshold"] = threshold
    out["groups"] = {
        name: {k: g[k] for k in ("map50", "images", "recall", "boxes", "fp_per_100_empty", "empty_images")}
        for name, g in m.get("groups", {}).items()
    }
    print(json.dumps(out))
    return out
