"""Letterbox and channel conversion, shared by the runtime and the trainer.

The trainer calls this exact function so that a model sees the same pixels in
training as on the Pi.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class Letterbox:
    """How an image was placed into the network input: x_img = (x_in - pad_x) / scale."""

    scale: float
    pad_x: int
    pad_y: int

    def to_image(self, xy: np.ndarray) -> np.ndarray:
        """Map input-pixel x,y pairs (last axis alternating x, y) back to image pixels."""
        out = np.array(xy, dtype=np.float64, copy=True)
        out[..., 0::2] = (out[..., 0::2] - self.pad_x) / self.scale
        out[..., 1::2] = (out[..., 1::2] - self.pad_y) / self.scale
        return out


def check_image(image) -> np.ndarray:
    """Return image as a uint8 (H,W) or (H,W,3) array or raise ValueError saying what was expected."""
    if not isinstance(image, np.ndarray):
        raise ValueError(f"expected a numpy uint8 image (H,W) or (H,W,3), got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image (H,W) grey or (H,W,3) BGR, got dtype {image.dtype}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
        raise ValueError(f"expected a uint8 image of shape (H,W) grey or (H,W,3) BGR, got shape {image.shape}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"expected a non-empty image, got shape {image.shape}")
    return image


def letterbox(image, width: int, height: int, channels: int, pad_value: int = 128):
    """Fit ``image`` into (height, width, channels) uint8 keeping its aspect ratio.

    Returns the network input and the :class:`Letterbox` that maps input pixels
    back to image pixels.
    """
    image = check_image(image)
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    h, w = image.shape[:2]
    if (h, w) == (height, width) and image.ndim == (2 if channels == 1 else 3):
        # The Pi's lores stream at the network's size and layout: nothing to scale, pad or convert,
        # only a copy (the caller may reuse its frame buffer). The general path below gives the same bytes.
        return np.array(image, np.uint8, order="C").reshape(height, width, channels), Letterbox(1.0, 0, 0)
    scale = min(width / w, height / h)
    nw = max(1, min(width, int(round(w * scale))))
    nh = max(1, min(height, int(round(h * scale))))
    if channels == 1 and image.ndim == 3:
        image = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_BGR2GRAY)
    elif channels == 3 and image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    image = np.ascontiguousarray(image)
    if (nw, nh) != (w, h):
        # Shrinking averages pixel areas, as the trainer's image cache does (train/data.py): bilinear
        # samples only 2x2 neighbours, so a 640-wide photo shrunk to 192 aliases, and the binary net
        # saw none of that in training (mAP@0.5 of an earlier binary model: 0.165 bilinear, 0.181 area).
        shrink = nw < w or nh < h
        image = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    pad_x, pad_y = (width - nw) // 2, (height - nh) // 2
    out = np.full((height, width, channels), pad_value, dtype=np.uint8)
    out[pad_y : pad_y + nh, pad_x : pad_x + nw] = image.reshape(nh, nw, channels)
    return out, Letterbox(scale=float(scale), pad_x=int(pad_x), pad_y=int(pad_y))
