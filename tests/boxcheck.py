"""Are the detector's boxes drawn on a picture of the stream? For screenshots of the web page and of a window.

``recent_boxes(log, t)`` reads the frame lines of a JSON Lines log whose capture time (``mono_ms``,
the system's monotonic clock, the same in every process) falls shortly before ``t``, as boxes
normalised to their frame. ``boxes_drawn(image, boxes)`` looks at a picture of the whole frame
(any size) for pixels of the box colour (class 0's green, ``app.overlay.class_colour``): there must
be enough of them, nearly all inside those boxes (with room for the label above a box), and one
box's left edge must be drawn down most of its height.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from app.overlay import class_colour

MARGIN = 0.03  # normalised: the line's thickness and the screenshot's scaling
LABEL = 0.10  # normalised height of the label above a box


def recent_boxes(log: Path, t: float, window_s: float = 2.5) -> list[tuple[float, float, float, float]]:
    boxes = []
    for line in log.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line being written
        if "event" in rec or not rec.get("detections"):
            continue
        if not t - window_s <= rec["mono_ms"] / 1000.0 <= t + 0.2:
            continue
        w, h = rec["width"], rec["height"]
        for d in rec["detections"]:
            x1, y1, x2, y2 = d["box"]
            boxes.append((x1 / w, y1 / h, x2 / w, y2 / h))
    return boxes


def box_colour_mask(image: np.ndarray) -> np.ndarray:
    """Pixels of class 0's colour (a saturated green) in a BGR picture, allowing for JPEG and scaling."""
    r, g, b = class_colour(0)
    assert g == 255 and max(r, b) < 60, "the box colour is no longer green: update this check"
    px = image.astype(int)
    return (px[:, :, 1] > 150) & (px[:, :, 1] - np.maximum(px[:, :, 0], px[:, :, 2]) > 70)


def boxes_drawn(image: np.ndarray, boxes: list[tuple[float, float, float, float]], least: int = 30) -> bool:
    if not boxes:
        return False
    mask = box_colour_mask(image)
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    if len(xs) < least:
        return False
    u, v = xs / w, ys / h
    inside = np.zeros(len(xs), bool)
    for x1, y1, x2, y2 in boxes:
        inside |= (u >= x1 - MARGIN) & (u <= x2 + MARGIN) & (v >= y1 - MARGIN - LABEL) & (v <= y2 + MARGIN)
    if inside.mean() < 0.85:
        return False
    for x1, y1, _x2, y2 in boxes:  # an outline: the left edge's column is green down most of the box
        c0, c1 = int((x1 - MARGIN / 2) * w), int((x1 + MARGIN / 2) * w) + 1
        r0, r1 = int((y1 + 0.1 * (y2 - y1)) * h), int((y2 - 0.1 * (y2 - y1)) * h)
        if r1 - r0 < 5:
            continue
        band = mask[r0:r1, max(0, c0):max(1, c1)]
        if band.size and band.any(axis=1).mean() > 0.6:
            return True
    return False
