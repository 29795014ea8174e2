"""Detector: image in, float32 (N,6) detections out (x1, y1, x2, y2, score, class) in the image's pixels."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from app import memory
from app.decode import decode
from app.modelfile import Model, read_model
from app.network import Network
from app.preprocess import letterbox

STAGES = ("preprocess", "stem", "body", "head", "decode")
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
        """Run one frame so the numba kernels are compiled (or loaded from the cache).

        numba's runtime comes up a step at a time and LLVM's code is dropped
        from memory after each step (app.memory): a lower peak, same kernels.
        """
        memory.warm_numba()
        self.detect(np.full((self.input_size[1], self.input_size[0]), 128, np.uint8))
        memory.release_compiler_pages()

    def detect(self, image) -> np.ndarray:
        """Detections float32 (N,6) x1,y1,x2,y2,score,class in ``image`` pixels, by descending score."""
        clock = time.perf_counter
        marks = []

        def mark(stage):
            marks.append(clock())

        dets = self.detect_staged(image, mark)
        self.last_stage_ms = {name: (marks[i + 1] - marks[i]) * 1e3 for i, name in enumerate(STAGES)}
        return dets

    def detect_staged(self, image, on_stage) -> np.ndarray:
        """detect() calling ``on_stage(name)`` as each stage of STAGES begins and ``on_stage(None)`` at the end.

        Lets a benchmark time (or meter) the stages of exactly the code detect() runs.
        """
        on_stage("preprocess")
        w, h = self.input_size
        x, lb = letterbox(image, w, h, self.channels)  # checks the image (check_image), once a frame
        net = self.network
        on_stage("stem")
        net.stem(x)
        on_stage("body")
        net.body()
        on_stage("head")
        head = net.head()
        on_stage("decode")
        dets = decode(head, self.model.anchors, self.input_size, lb, image.shape, self.score_threshold,
                      self.nms_iou, self.max_detections)
        on_stage(None)
        return dets

    __call__ = detect
