"""Detector: image in, float32 (N,6) detections out (x1, y1, x2, y2, score, class) in the image's pixels."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from app.decode import decode
from app.modelfile import Model, read_model
from app.network import Network
from app.preprocess import check_image, letterbox

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "models" / "person.xnc"


class Detector:
    """Loads a model file (default: the shipped models/person.xnc) and detects objects in images.

    One Detector is not re-entrant (its network reuses buffers): call detect from one thread.
    """

    def __init__(self, path=None, threads: int = 1, score_threshold=None, nms_iou=None, max_detections: int = 100,
                 model: Model | None = None):
        if model is None:
            self.path = Path(path) if path is not None else DEFAULT_MODEL
            model = read_model(self.path)
        else:
            self.path = None
        self.model = model
        self.class_names = tuple(model.class_names)
        self.input_size = (model.input_width, model.input_height)
        self.channels = model.channels
        self.score_threshold = float(model.score_threshold if score_threshold is None else score_threshold)
        self.nms_iou = float(model.nms_iou if nms_iou is None else nms_iou)
        if not 0.0 <= self.score_threshold <= 1.0 or not 0.0 <= self.nms_iou <= 1.0:
            raise ValueError(f"score_threshold and nms_iou must be in 0..1, got {self.score_threshold}, {self.nms_iou}")
        if not isinstance(max_detections, int) or max_detections < 0:
            raise ValueError(f"max_detections must be an integer >= 0, got {max_detections!r}")
        self.max_detections = max_detections
        self.network = Network(model, threads=threads)
        self.last_stage_ms: dict[str, float] = {}

    def warmup(self) -> None:
        """Run one frame so the numba kernels are compiled (or loaded from the cache)."""
        self.detect(np.full((self.input_size[1], self.input_size[0]), 128, np.uint8))

    def detect(self, image) -> np.ndarray:
        """Detections float32 (N,6) x1,y1,x2,y2,score,class in ``image`` pixels, by descending score."""
        clock = time.perf_counter
        t0 = clock()
        image = check_image(image)
        w, h = self.input_size
        x, lb = letterbox(image, w, h, self.channels)
        net = self.network
        t1 = clock()
        net.stem(x)
        t2 = clock()
        net.body()
        t3 = clock()
        head = net.head()
        t4 = clock()
        dets = decode(head, self.model.anchors, self.input_size, lb, image.shape, self.score_threshold,
                      self.nms_iou, self.max_detections)
        t5 = clock()
        self.last_stage_ms = {
            "preprocess": (t1 - t0) * 1e3,
            "stem": (t2 - t1) * 1e3,
            "body": (t3 - t2) * 1e3,
            "head": (t4 - t3) * 1e3,
            "decode": (t5 - t4) * 1e3,
        }
        return dets

    __call__ = detect
