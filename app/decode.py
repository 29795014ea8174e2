"""Head grid -> boxes: sigmoid, anchors, grid (YOLOv5 form), per-class NMS, undo the letterbox.

Pure numpy, so the trainer can decode a torch head (converted to numpy) the
same way the runtime does.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from app.preprocess import Letterbox

EMPTY = np.zeros((0, 6), dtype=np.float32)
# Candidates kept for NMS: bounds the per-frame cost on a random or untrained model.
MAX_CANDIDATES = 1000


@njit(cache=True, inline="always")
def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-min(max(x, -60.0), 60.0)))


@njit(cache=True, inline="always")
def _iou(b, i, j):
    iw = min(b[i, 2], b[j, 2]) - max(b[i, 0], b[j, 0])
    ih = min(b[i, 3], b[j, 3]) - max(b[i, 1], b[j, 1])
    if iw <= 0.0 or ih <= 0.0:
        return 0.0
    inter = iw * ih
    union = (b[i, 2] - b[i, 0]) * (b[i, 3] - b[i, 1]) + (b[j, 2] - b[j, 0]) * (b[j, 3] - b[j, 1]) - inter
    return inter / union if union > 0.0 else 0.0


@njit(cache=True)
def _decode_core(t, anchors, sx, sy, lb_scale, pad_x, pad_y, img_w, img_h, score_threshold, nms_iou,
                 max_detections, max_candidates):
    """t: (gh, gw, A, 5+C) float32. Returns float32 (N, 6) sorted by score, after per-class NMS."""
    gh, gw, na, nf = t.shape
    nc = nf - 5
    n_max = gh * gw * na
    boxes = np.empty((n_max, 4), np.float64)
    score = np.empty(n_max, np.float64)
    cls = np.empty(n_max, np.int64)
    n = 0
    for gy in range(gh):
        for gx in range(gw):
            for a in range(na):
                obj = _sigmoid(np.float64(t[gy, gx, a, 4]))
                # score = obj * cls <= obj: most cells end here
                if obj <= score_threshold:
                    continue
                best, best_p = 0, -1.0
                for c in range(nc):
                    pc = _sigmoid(np.float64(t[gy, gx, a, 5 + c]))
                    if pc > best_p:
                        best, best_p = c, pc
                sc = obj * best_p
                if sc <= score_threshold:
                    continue
                cx = (gx + 2.0 * _sigmoid(np.float64(t[gy, gx, a, 0])) - 0.5) * sx
                cy = (gy + 2.0 * _sigmoid(np.float64(t[gy, gx, a, 1])) - 0.5) * sy
                bw = anchors[a, 0] * (2.0 * _sigmoid(np.float64(t[gy, gx, a, 2]))) ** 2
                bh = anchors[a, 1] * (2.0 * _sigmoid(np.float64(t[gy, gx, a, 3]))) ** 2
                x1 = (cx - bw / 2 - pad_x) / lb_scale
                y1 = (cy - bh / 2 - pad_y) / lb_scale
                x2 = (cx + bw / 2 - pad_x) / lb_scale
                y2 = (cy + bh / 2 - pad_y) / lb_scale
                if img_w > 0:
                    x1, x2 = min(max(x1, 0.0), img_w), min(max(x2, 0.0), img_w)
                    y1, y2 = min(max(y1, 0.0), img_h), min(max(y2, 0.0), img_h)
                    # a box wholly in the letterbox padding clips to nothing: not a detection
                    if x2 <= x1 or y2 <= y1:
                        continue
                boxes[n, 0], boxes[n, 1], boxes[n, 2], boxes[n, 3] = x1, y1, x2, y2
                score[n] = sc
                cls[n] = best
                n += 1
    order = np.argsort(-score[:n], kind="mergesort")[:max_candidates]
    keep = np.empty(min(order.size, max_detections), np.int64)
    nk = 0
    for i in order:
        if nk >= max_detections:
            break
        ok = True
        for j in range(nk):
            if cls[keep[j]] == cls[i] and _iou(boxes, keep[j], i) > nms_iou:
                ok = False
                break
        if ok:
            keep[nk] = i
            nk += 1
    out = np.empty((nk, 6), np.float32)
    for r in range(nk):
        i = keep[r]
        out[r, 0], out[r, 1], out[r, 2], out[r, 3] = boxes[i, 0], boxes[i, 1], boxes[i, 2], boxes[i, 3]
        out[r, 4] = score[i]
        out[r, 5] = cls[i]
    return out


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
    ``image_shape`` (h, w, ...) they are clipped to it (boxes clipped to nothing are
    dropped). Per-class greedy NMS at ``nms_iou``; sorted by score, descending.
    Works on any float head (e.g. a trainer's torch output converted to numpy).
    """
    head = np.ascontiguousarray(head, dtype=np.float32)
    anchors = np.ascontiguousarray(anchors, dtype=np.float64).reshape(-1, 2)
    if head.ndim != 3:
        raise ValueError(f"head must be (grid_h, grid_w, A*(5+C)), got shape {head.shape}")
    gh, gw, ch = head.shape
    a = anchors.shape[0]
    if a == 0 or ch % a or ch // a < 6:
        raise ValueError(f"head has {ch} channels, not a multiple A*(5+C) of {a} anchors with C >= 1")
    if max_detections <= 0 or gh == 0 or gw == 0:
        return EMPTY.copy()
    lb = letterbox or Letterbox(1.0, 0, 0)
    img_h, img_w = (float(image_shape[0]), float(image_shape[1])) if image_shape is not None else (0.0, 0.0)
    return _decode_core(head.reshape(gh, gw, a, ch // a), anchors, input_size[0] / gw, input_size[1] / gh,
                        float(lb.scale), float(lb.pad_x), float(lb.pad_y), img_w, img_h, float(score_threshold),
                        float(nms_iou), int(max_detections), MAX_CANDIDATES)
