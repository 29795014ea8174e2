"""Detection metrics: COCO mAP (pycocotools), and what a camera owner feels at one score threshold.

Every function takes per-image ground truth ``(boxes (n,4) xyxy px, classes (n,) int)`` and
detections ``(N,6) x1,y1,x2,y2,score,class`` in the same pixels. pycocotools (a development
dependency, never on the Pi) is imported only by :func:`coco_metrics`.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np


def coco_metrics(gts: list, dets: list, num_classes: int, shapes: list) -> dict:
    """mAP@0.5 and mAP@0.5:0.95 with pycocotools.

    gts: per image (boxes (n,4) xyxy px, classes (n,) int); dets: per image float32 (N,6);
    shapes: per image (h, w). Returns map50, map50_95 and the 101-point PR curve at IoU 0.5.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, anns, results = [], [], []
    for i, ((boxes, classes), (h, w)) in enumerate(zip(gts, shapes, strict=True)):
        images.append({"id": i, "width": int(w), "height": int(h)})
        for b, c in zip(np.asarray(boxes, np.float64).reshape(-1, 4), classes, strict=True):
            bw, bh = float(b[2] - b[0]), float(b[3] - b[1])
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i,
                    "category_id": int(c) + 1,
                    "iscrowd": 0,
                    "bbox": [float(b[0]), float(b[1]), bw, bh],
                    "area": bw * bh,
                }
            )
        for d in np.asarray(dets[i], np.float64).reshape(-1, 6):
            results.append(
                {
                    "image_id": i,
                    "category_id": int(d[5]) + 1,
                    "score": float(d[4]),
                    "bbox": [float(d[0]), float(d[1]), float(d[2] - d[0]), float(d[3] - d[1])],
                }
            )
    empty = {"map50": 0.0, "map50_95": 0.0, "pr_recall": np.linspace(0, 1, 101), "pr_precision": np.zeros(101)}
    if not anns or not results:
        return empty
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {
            "images": images,
            "annotations": anns,
            "categories": [{"id": k + 1, "name": str(k)} for k in range(num_classes)],
        }
        gt.createIndex()
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    prec = ev.eval["precision"][0, :, :, 0, -1]  # IoU 0.5, all recalls, classes, area all, 100 dets
    valid = prec > -1
    curve = np.where(valid, prec, 0).sum(1) / np.maximum(valid.sum(1), 1)
    return {
        "map50": max(0.0, float(ev.stats[1])),
        "map50_95": max(0.0, float(ev.stats[0])),
        "pr_recall": np.linspace(0, 1, 101),
        "pr_precision": curve,
    }


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    iw = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    ih = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = iw * ih
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    union = area(a)[:, None] + area(b)[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0)


def match_image(boxes, classes, d, score_threshold: float, iou: float = 0.5) -> tuple:
    """Greedy one-to-one matching (by score) of one image's detections at or above ``score_threshold``.

    Returns (labels matched: bool (n,), kept detections (K,6) sorted by score, each kept detection
    true: bool (K,)).
    """
    boxes, classes = np.asarray(boxes, np.float64).reshape(-1, 4), np.asarray(classes)
    d = np.asarray(d, np.float64).reshape(-1, 6)
    d = d[d[:, 4] >= score_threshold]
    d = d[np.argsort(-d[:, 4], kind="stable")]
    used = np.zeros(len(boxes), bool)
    true = np.zeros(len(d), bool)
    ious = _iou(d[:, :4], boxes) if len(d) and len(boxes) else np.zeros((len(d), len(boxes)))
    for k in range(len(d)):
        cand = np.where(~used & (classes == d[k, 5]), ious[k], -1.0) if len(boxes) else np.zeros(0)
        j = int(np.argmax(cand)) if cand.size else -1
        if j >= 0 and cand[j] >= iou:
            used[j] = true[k] = True
    return used, d, true


def _match(boxes, classes, d, score_threshold: float, iou: float) -> tuple:
    """(labels matched mask, false positives) of one image."""
    used, _, true = match_image(boxes, classes, d, score_threshold, iou)
    return used, int((~true).sum())


def match_counts(gts: list, dets: list, thresholds, iou: float = 0.5) -> np.ndarray:
    """Per image and threshold: (true positives, false positives, labels), shape (images, thresholds, 3).

    Kept per image so that callers can resample images (a bootstrap) without matching again.
    """
    out = np.zeros((len(gts), len(thresholds), 3), np.int64)
    for i, ((boxes, classes), d) in enumerate(zip(gts, dets, strict=True)):
        for j, t in enumerate(thresholds):
            used, f = _match(boxes, classes, d, float(t), iou)
            out[i, j] = used.sum(), f, len(used)
    return out


def precision_recall(gts: list, dets: list, score_threshold: float, iou: float = 0.5) -> tuple:
    """Precision and recall of the detections above ``score_threshold``, matched one-to-one at ``iou``."""
    tp, fp, n_gt = (int(v) for v in match_counts(gts, dets, [score_threshold], iou).sum(0)[0])
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / n_gt if n_gt else 0.0
    return precision, recall


def frames_found(gts: list, dets: list, score_threshold: float, iou: float = 0.5) -> float:
    """Share of the frames with labels in which EVERY labelled object is boxed: the camera's view of recall."""
    n = found = 0
    for (boxes, classes), d in zip(gts, dets, strict=True):
        used, _ = _match(boxes, classes, d, score_threshold, iou)
        if len(used):
            n += 1
            found += bool(used.all())
    return found / n if n else 0.0


def stands(box_w, box_h, frame_h) -> bool:
    """A box of a standing person, as "upright" counts it: taller than wide and at least a quarter of the frame tall."""
    return bool(box_h >= max(box_w, frame_h / 4))


def upright_found(gts: list, dets: list, shapes: list, score_threshold: float, iou: float = 0.5) -> tuple:
    """(share boxed, frames) over frames of ONE labelled object standing up (taller than wide) and at
    least a quarter of the frame tall: the issue's "a person walking through a room", as labels can say it.
    """
    n = found = 0
    for (boxes, classes), d, (h, _) in zip(gts, dets, shapes, strict=True):
        b = np.asarray(boxes, np.float64).reshape(-1, 4)
        if len(b) != 1 or not stands(b[0, 2] - b[0, 0], b[0, 3] - b[0, 1], h):
            continue
        used, _ = _match(boxes, classes, d, score_threshold, iou)
        n += 1
        found += bool(used.all())
    return (found / n if n else 0.0), n


def empty_images(gts: list, dets: list, score_threshold: float) -> dict:
    """False alarms where there is nothing to find: over the images without a label (of the scored classes),
    the false boxes at ``score_threshold`` per 100 images, and the share of those images with any box.

    A camera at home looks at an empty room most of the time; every box there is a false alarm.
    """
    n = boxes = boxed = 0
    for (b, _), d in zip(gts, dets, strict=True):
        if len(b):
            continue
        k = int((np.asarray(d, np.float64).reshape(-1, 6)[:, 4] >= score_threshold).sum())
        n, boxes, boxed = n + 1, boxes + k, boxed + (k > 0)
    return {
        "empty_images": n,
        "fp_per_100_empty": 100.0 * boxes / n if n else 0.0,
        "empty_with_box": boxed / n if n else 0.0,
    }
