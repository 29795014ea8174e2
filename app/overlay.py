"""Pure drawing: detections, track ids, zones, the counting line and a small HUD onto pixels.

``render`` returns a new BGR image (the frame, converted from grey when
needed, with boxes drawn on it) for the OpenCV window and the recorder.
``render_rgba`` returns a transparent RGBA image holding only the drawings,
for picamera2's DRM ``set_overlay``: the camera frame itself is never copied.
Inputs are never modified.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np

FONT = cv2.FONT_HERSHEY_SIMPLEX


@dataclass(frozen=True)
class Hud:
    fps: float
    latency_ms: float
    dropped: int

    def text(self) -> str:
        return f"{self.fps:4.1f} fps  det {self.latency_ms:5.1f} ms  dropped {self.dropped}"


Point = tuple[float, float]


@dataclass(frozen=True)
class Marks:
    """What the tracker adds to a frame's drawing.

    ``ids``: per detection, the id of its confirmed track (0 = none), shown as ``#7``.
    ``zones``: (name, polygon) pairs and ``line`` a counting line, in normalised coordinates (0..1).
    """

    ids: np.ndarray | None = None
    zones: tuple[tuple[str, tuple[Point, ...]], ...] = ()
    line: tuple[Point, ...] = ()


ZONE_RGB = (80, 200, 255)
LINE_RGB = (255, 80, 200)


@lru_cache(maxsize=256)
def class_colour(index: int) -> tuple[int, int, int]:
    """A bright, stable colour per class index as (R, G, B); neighbours differ by the golden angle."""
    hue = (index * 0.618033988749895 + 0.33) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


_DIGITS_AS_ZERO = str.maketrans("123456789", "000000000")


@lru_cache(maxsize=1024)
def _text_size_cached(shape: str, scale: float) -> tuple[tuple[int, int], int]:
    return cv2.getTextSize(shape, FONT, scale, 1)


def text_size(text: str, scale: float) -> tuple[tuple[int, int], int]:
    """cv2.getTextSize, cached: digits all have one width in the Hershey fonts, so a label
    or HUD line measures like its digits-as-zeros form (getTextSize costs more than drawing)."""
    return _text_size_cached(text.translate(_DIGITS_AS_ZERO), scale)


def label_text(det_class: int, score: float, class_names: Sequence[str], track_id: int = 0) -> str:
    name = class_names[det_class] if 0 <= det_class < len(class_names) else f"class{det_class}"
    return f"#{track_id} {name} {score:.2f}" if track_id > 0 else f"{name} {score:.2f}"


def _style(height: int) -> tuple[float, int]:
    """Font scale and line thickness that stay readable from 240 to 1080 lines."""
    scale = max(0.35, height / 600.0)
    return scale, max(1, round(height / 160.0))


def _draw(
    canvas: np.ndarray,
    detections: np.ndarray,
    class_names: Sequence[str],
    hud: Hud | None,
    scale: tuple[float, float],
    rgba: bool,
    marks: Marks | None = None,
) -> None:
    h, w = canvas.shape[:2]
    font_scale, thick = _style(h)
    sx, sy = scale

    def colour(rgb: tuple[int, int, int]) -> tuple[int, ...]:
        return (*rgb, 255) if rgba else (rgb[2], rgb[1], rgb[0])

    # Zones and the line first: boxes and labels are drawn over them.
    if marks is not None:
        for name, polygon in marks.zones:
            pts = np.array([[round(x * (w - 1)), round(y * (h - 1))] for x, y in polygon], np.int32)
            cv2.polylines(canvas, [pts], True, colour(ZONE_RGB), 1, cv2.LINE_8)
            org = (int(pts[:, 0].min()) + 2, int(pts[:, 1].min()) + text_size(name, font_scale)[0][1] + 2)
            cv2.putText(canvas, name, org, FONT, font_scale, colour(ZONE_RGB), 1, cv2.LINE_AA)
        if len(marks.line) == 2:
            (ax, ay), (bx, by) = marks.line
            a = (round(ax * (w - 1)), round(ay * (h - 1)))
            b = (round(bx * (w - 1)), round(by * (h - 1)))
            cv2.line(canvas, a, b, colour(LINE_RGB), thick, cv2.LINE_AA)
            cv2.circle(canvas, a, thick + 2, colour(LINE_RGB), cv2.FILLED)  # the line's first point

    # HUD first, bottom-left: labels sit at the tops of boxes and are drawn over it, never hidden.
    if hud is not None:
        text = hud.text()
        (tw, th), base = text_size(text, font_scale)
        bg = (0, 0, 0, 160) if rgba else (0, 0, 0)
        cv2.rectangle(canvas, (0, h - th - base - 6), (tw + 6, h - 1), bg, cv2.FILLED)
        cv2.putText(canvas, text, (3, h - base - 3), FONT, font_scale, colour((255, 255, 255)), 1, cv2.LINE_AA)

    dets = np.asarray(detections, dtype=np.float32).reshape(-1, 6)
    ids = marks.ids.tolist() if marks is not None and marks.ids is not None and len(marks.ids) == len(dets) else None
    for k, (x1, y1, x2, y2, score, cls) in enumerate(dets):
        cls_i = int(cls)
        c = colour(class_colour(cls_i))
        p1 = (int(round(x1 * sx)), int(round(y1 * sy)))
        p2 = (int(round(x2 * sx)), int(round(y2 * sy)))
        cv2.rectangle(canvas, p1, p2, c, thick)
        text = label_text(cls_i, float(score), class_names, ids[k] if ids is not None else 0)
        (tw, th), base = text_size(text, font_scale)
        # Label sits above the box, or inside it when the box touches the top.
        ty = p1[1] - 2 if p1[1] - th - base - 2 >= 0 else p1[1] + th + base + 2
        tx = min(max(p1[0], 0), max(0, w - tw - 2))
        cv2.rectangle(canvas, (tx, ty - th - base), (tx + tw + 2, ty + 1), c, cv2.FILLED)
        cv2.putText(canvas, text, (tx + 1, ty - base + 1), FONT, font_scale, colour((0, 0, 0)), 1, cv2.LINE_AA)


def render(
    pixels: np.ndarray,
    detections: np.ndarray,
    class_names: Sequence[str],
    hud: Hud | None = None,
    marks: Marks | None = None,
) -> np.ndarray:
    """A new BGR image: ``pixels`` (grey or BGR uint8) with boxes, labels, scores, ``marks`` and the HUD drawn on."""
    if pixels.dtype != np.uint8 or not (pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[2] == 3)):
        raise ValueError(f"render expects uint8 (H,W) or (H,W,3), got {pixels.dtype} {pixels.shape}")
    canvas = cv2.cvtColor(pixels, cv2.COLOR_GRAY2BGR) if pixels.ndim == 2 else pixels.copy()
    _draw(canvas, detections, class_names, hud, (1.0, 1.0), rgba=False, marks=marks)
    return canvas


def render_rgba(
    size: tuple[int, int],
    detections: np.ndarray,
    class_names: Sequence[str],
    hud: Hud | None = None,
    frame_size: tuple[int, int] | None = None,
    marks: Marks | None = None,
) -> np.ndarray:
    """A transparent (H,W,4) RGBA image of ``size`` = (W,H) holding only the drawings.

    ``frame_size`` (W,H) is the size of the image the detections refer to; the
    boxes are scaled from it to ``size``.
    """
    w, h = size
    fw, fh = frame_size or size
    canvas = np.zeros((h, w, 4), dtype=np.uint8)
    _draw(canvas, detections, class_names, hud, (w / fw, h / fh), rgba=True, marks=marks)
    return canvas
