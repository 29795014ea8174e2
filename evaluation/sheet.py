"""A contact sheet of evaluated images: people would rather look than read.

Each tile is one image with the detections at the score threshold: true positives
green, false positives red, and labelled objects that no detection found yellow.
The tile's caption counts them. Images are taken evenly across the evaluated set,
so a sheet of a held-out source shows that source, not its first folder.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from app.sources import imread
from evaluation.metrics import match_image

GREEN, RED, YELLOW = (60, 200, 60), (40, 40, 230), (0, 220, 255)  # BGR
TILE_W, TILE_H, CAPTION = 240, 180, 18


def pick(n_total: int, n: int) -> list:
    """``n`` indices spread evenly over ``n_total`` images (all of them when there are fewer)."""
    if n >= n_total:
        return list(range(n_total))
    return sorted({int(round(v)) for v in np.linspace(0, n_total - 1, n)})


def tile(scored, score_threshold: float, iou: float = 0.5) -> np.ndarray:
    """One image shrunk into a TILE_W x TILE_H tile (plus caption) with its boxes drawn."""
    img = imread(scored.image, cv2.IMREAD_COLOR)
    h, w = scored.shape
    if img is None or img.shape[:2] != (h, w):
        img = np.full((h, w, 3), 96, np.uint8)  # the file changed since it was scored: keep the boxes readable
    s = min(TILE_W / w, TILE_H / h)
    small = cv2.resize(img, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
    out = np.full((TILE_H + CAPTION, TILE_W, 3), 32, np.uint8)
    oy, ox = (TILE_H - small.shape[0]) // 2, (TILE_W - small.shape[1]) // 2
    out[oy : oy + small.shape[0], ox : ox + small.shape[1]] = small
    found, kept, true = match_image(scored.boxes, scored.classes, scored.dets, score_threshold, iou)

    def box(b, colour, thick):
        x1, y1, x2, y2 = (int(round(v * s)) for v in b[:4])
        cv2.rectangle(out, (ox + x1, oy + y1), (ox + x2, oy + y2), colour, thick, cv2.LINE_AA)

    for b in scored.boxes[~found]:
        box(b, YELLOW, 1)
    for d, t in zip(kept, true, strict=True):
        box(d, GREEN if t else RED, 2)
    tp, fp, missed = int(true.sum()), int((~true).sum()), int((~found).sum())
    # ASCII: the Hershey fonts have nothing else, and cv2.putText crashes on a name that is not UTF-8.
    stem = Path(str(scored.image)).stem[:16].encode("ascii", "replace").decode()
    text = f"{stem}  {tp} ok {fp} false {missed} missed"
    cv2.putText(out, text, (3, TILE_H + 13), cv2.FONT_HERSHEY_SIMPLEX, 0.36, (230, 230, 230), 1, cv2.LINE_AA)
    return out


def draw_sheet(scored: list, score_threshold: float, out_png, n: int = 48, columns: int = 8, title: str = "") -> int:
    """Write a PNG of ``n`` tiles (evenly picked from ``scored``); returns how many tiles it holds."""
    if n < 1 or columns < 1:
        raise ValueError(f"a sheet needs n >= 1 and columns >= 1 (got {n}, {columns})")
    chosen = [scored[i] for i in pick(len(scored), n)]
    columns = max(1, min(columns, len(chosen)))
    rows = -(-len(chosen) // columns) if chosen else 0
    th = TILE_H + CAPTION
    head = 26
    sheet = np.full((head + rows * th, columns * TILE_W, 3), 16, np.uint8)
    legend = [("found", GREEN), ("false box", RED), ("missed", YELLOW)]
    x = 6
    for word, colour in legend:
        cv2.rectangle(sheet, (x, 7), (x + 14, 19), colour, -1)
        cv2.putText(sheet, word, (x + 18, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.42, (235, 235, 235), 1, cv2.LINE_AA)
        x += 28 + 8 * len(word)
    caption = f"{title}  score >= {score_threshold:g}, IoU 0.5, {len(chosen)} of {len(scored)} images"
    cv2.putText(sheet, caption, (x + 8, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.42, (235, 235, 235), 1, cv2.LINE_AA)
    for k, sc in enumerate(chosen):
        r, c = divmod(k, columns)
        sheet[head + r * th : head + (r + 1) * th, c * TILE_W : (c + 1) * TILE_W] = tile(sc, score_threshold)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    # Encoded here and written by Python: cv2.imwrite crashes on a file name that is not UTF-8.
    ok, png = cv2.imencode(out_png.suffix or ".png", sheet, [cv2.IMWRITE_PNG_COMPRESSION, 9])
    if not ok:
        raise OSError(f"{out_png}: cannot write the sheet (is the suffix .png?)")
    out_png.write_bytes(png.tobytes())
    return len(chosen)
