"""Head grid -> boxes: sigmoid, anchors, grid (YOLOv5 form), per-class NMS, undo the letterbox.

Pure numpy, so the trainer can decode a torch head (converted to numpy) the
same way the runtime does.
"""

from __future__ import annotations

import numpy as np

from app.preprocess import Letterbox

EMPTY = np.zeros((0, 6), dtype=np.float32)
# Candidates kept for NMS: bounds the per-frame cost on a random or untrained model.
MAX_CANDIDATES = 1000


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -60.0, 60.0)))


def nms(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, iou: float, limit: int) -> np.ndarray:
    """Greedy per-class NMS; returns kept indices in descending score order."""
    order = np.argsort(-scores, kind="stable")
    # Shifting each class into its own region makes one greedy pass per-class.
    offset = classes.astype(np.float64)[:, None] * (np.abs(boxes).max() + 1.0) * 2.0
    b = boxes.astype(np.float64) + offset
    area = np.maximum(b[:, 2] - b[:, 0], 0) * np.maximum(b[:, 3] - b[:, 1], 0)
    keep = []
    while order.size and len(keep) < limit:
        i = order[0]
        keep.append(i)
        rest = order[1:]
        iw = np.maximum(np.minimum(b[i, 2], b[rest, 2]) - np.maximum(b[i, 0], b[rest, 0]), 0)
        ih = np.maximum(np.minimum(b[i, 3], b[rest, 3]) - np.maximum(b[i, 1], b[rest, 1]), 0)
        inter = iw * ih
        union = area[i] + area[rest] - inter
        overlap = np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)
        order = rest[overlap <= iou]
    return np.array(keep, dtype=np.int64)


def decode(
    head: np.ndarray,
    anchors: np.ndarray,
    input_size: tuple[int, int],
    letterbox: Letterbox | None = None,
    image_shape: tuple[int, int] | None = None,
    score_threshold: float = 0.25,
    nms_iou: float = 0.45,
    max_detections: int = 100,
) -> np.ndarray:
    """Decode a head grid (gh, gw, A*(5+C)) into float32 (N,6) x1,y1,x2,y2,score,class.

    ``anchors`` (A,2) and the boxes are in input pixels of ``input_size`` (w, h).
    With a ``letterbox`` the boxes are mapped back to image pixels; with an
    ``image_shape`` (h, w, ...) they are clipped to it. Sorted by score, descending.
    """
    head = np.asarray(head, dtype=np.float32)
    anchors = np.asarray(anchors, dtype=np.float64).reshape(-1, 2)
    gh, gw, ch = head.shape
    a = anchors.shape[0]
    if ch % a or ch // a < 6:
        raise ValueError(f"head has {ch} channels, not a multiple A*(5+C) of {a} anchors with C >= 1")
    nc = ch // a - 5
    if max_detections <= 0:
        return EMPTY.copy()
    t = head.reshape(gh, gw, a, 5 + nc)
    obj = _sigmoid(t[..., 4].astype(np.float64))
    # score = obj * cls <= obj: cells whose obj is already below the threshold are skipped cheaply.
    cand = np.nonzero(obj > score_threshold)
    if cand[0].size == 0:
        return EMPTY.copy()
    tc = t[cand].astype(np.float64)  # (n, 5+C)
    cls_p = _sigmoid(tc[:, 5:])
    cls = np.argmax(cls_p, axis=1)
    score = obj[cand] * cls_p[np.arange(cls.size), cls]
    ok = score > score_threshold
    if not np.any(ok):
        return EMPTY.copy()
    gy, gx, ai = (c[ok] for c in cand)
    tc, cls, score = tc[ok], cls[ok], score[ok]
    if score.size > MAX_CANDIDATES:
        top = np.argsort(-score, kind="stable")[:MAX_CANDIDATES]
        gy, gx, ai, tc, cls, score = gy[top], gx[top], ai[top], tc[top], cls[top], score[top]
    sx, sy = input_size[0] / gw, input_size[1] / gh
    s = _sigmoid(tc[:, :4])
    cx = (gx + 2.0 * s[:, 0] - 0.5) * sx
    cy = (gy + 2.0 * s[:, 1] - 0.5) * sy
    w = anchors[ai, 0] * (2.0 * s[:, 2]) ** 2
    h = anchors[ai, 1] * (2.0 * s[:, 3]) ** 2
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
    if letterbox is not None:
        boxes = letterbox.to_image(boxes)
    if image_shape is not None:
        boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, image_shape[1])
        boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, image_shape[0])
        # A box wholly in the letterbox padding clips to nothing: not a detection.
        real = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        boxes, score, cls = boxes[real], score[real], cls[real]
        if score.size == 0:
            return EMPTY.copy()
    keep = nms(boxes, score, cls, nms_iou, max_detections)
    out = np.empty((keep.size, 6), dtype=np.float32)
    out[:, :4] = boxes[keep]
    out[:, 4] = score[keep]
    out[:, 5] = cls[keep]
    return out
