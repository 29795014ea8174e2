"""A FAKE detector with the engine's Detector contract, for testing the app without a model.

Contract (ARCHITECTURE.md): ``detect(image)`` takes uint8 (H,W) or (H,W,3) and
returns float32 (N,6) ``x1,y1,x2,y2,score,class`` sorted by score, raising
ValueError for a wrong dtype or shape; ``class_names``; ``warmup()``.
"""

from __future__ import annotations

import time

import numpy as np


class FakeDetector:
    def __init__(self, detections=None, class_names=("person",), delay_s: float = 0.0, score_threshold=None):
        dets = np.zeros((0, 6), np.float32) if detections is None else np.asarray(detections, np.float32)
        self.detections = dets.reshape(-1, 6)
        self.class_names = list(class_names)
        self.delay_s = delay_s
        self.score_threshold = score_threshold
        self.calls = 0
        self.seen_shapes: list[tuple[int, ...]] = []
        self.warmed = False

    def warmup(self) -> None:
        self.warmed = True

    def detect(self, image: np.ndarray) -> np.ndarray:
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
            raise ValueError(f"expected a uint8 array, got {getattr(image, 'dtype', type(image))}")
        if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
            raise ValueError(f"expected (H,W) or (H,W,3), got {image.shape}")
        self.calls += 1
        self.seen_shapes.append(image.shape)
        if self.delay_s:
            time.sleep(self.delay_s)
        h, w = image.shape[:2]
        out = self.detections.copy()
        if len(out):
            out[:, [0, 2]] = np.clip(out[:, [0, 2]], 0, w)
            out[:, [1, 3]] = np.clip(out[:, [1, 3]], 0, h)
        return out[np.argsort(-out[:, 4], kind="stable")]
