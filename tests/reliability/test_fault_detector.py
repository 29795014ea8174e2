"""A model the loader accepts can still compute non-finite numbers (huge but finite weights overflow to inf,
inf - inf = NaN). The pipeline must not die on them: the overlay, the filter and the JSON log (which refuses
NaN) only ever see finite detections."""

from __future__ import annotations

import dataclasses

import numpy as np

from app.capture import Capture
from app.detector import Detector
from app.modelfile import Layer, validate
from app.pipeline import Pipeline
from app.sinks import JsonlLog
from tests.fakes.fake_source import FakeSource
from tests.reliability.logread import frames_and_events, read_log
from tests.reliability.support import run_pipeline


class RenderingPreview:
    """Headless, but asks for the rendered canvas like the window preview does."""

    needs_canvas = True
    stop_requested = False

    def __init__(self):
        self.canvases = 0

    def show(self, frame, canvas, detections, hud, marks=None):
        assert canvas is not None and canvas.ndim == 3
        self.canvases += 1

    def close(self):
        pass


def overflowing_model(rand_model):
    head = rand_model.layers[-1]
    w, b = head.tensors["weight"].copy(), head.tensors["bias"].copy()
    stride = 5 + rand_model.num_classes
    w[0::stride, 0::2] = 3e38  # tx of every anchor sums +inf and -inf: NaN box centres
    w[0::stride, 1::2] = -3e38
    b[4::stride] = 10.0  # confident objectness, so the NaN boxes are not thresholded away
    layers = (*rand_model.layers[:-1], Layer("head", head.params, {"weight": w, "bias": b}))
    model = dataclasses.replace(rand_model, layers=layers)
    validate(model)  # the file format has nothing against it
    return model


class NonFiniteDetector:
    """A FAKE detector whose every other frame has NaN / inf rows among good ones."""

    class_names = ("person",)
    score_threshold = 0.25

    def __init__(self):
        self.calls = 0

    def detect(self, image):
        self.calls += 1
        good = [10, 10, 30, 40, 0.9, 0]
        if self.calls % 2:
            return np.array([good], np.float32)
        return np.array([[np.nan, 5, 20, 20, 0.8, 0], good, [0, 0, np.inf, 9, 0.7, 0], [1, 1, 5, 5, np.nan, 0]],
                        np.float32)


def run(detector, tmp_path, frames=20):
    path = tmp_path / "log.jsonl"
    log = JsonlLog(str(path))
    preview = RenderingPreview()
    cap = Capture(lambda: FakeSource(period=0.002, shape=(48, 64)))
    p = Pipeline(cap, detector, log_sink=log, preview=preview, max_frames=frames)
    stats = run_pipeline(cap, p, 30, log)
    assert stats.processed == frames and stats.stopped_by == "max frames"
    assert preview.canvases == frames and log.failures == 0
    records, _ = read_log(path, allow_torn_tail=False)
    logged, _ = frames_and_events(records)
    assert len(logged) == frames
    return logged


def test_non_finite_rows_are_dropped_before_overlay_filter_and_log(tmp_path):
    logged = run(NonFiniteDetector(), tmp_path)
    assert [len(f["detections"]) for f in logged] == [1] * 20  # only the good row, every frame
    assert all(f["detections"][0]["box"] == [10.0, 10.0, 30.0, 40.0] for f in logged)


def test_a_loader_valid_model_that_overflows_does_not_stop_the_pipeline(rand_model, tmp_path):
    detector = Detector(model=overflowing_model(rand_model))
    logged = run(detector, tmp_path)
    boxes = [d["box"] for f in logged for d in f["detections"]]
    assert all(np.isfinite(b).all() for b in boxes)
