"""The pipeline loop with a FAKE detector and FAKE sources: accounting, log, watchdog, status, filters."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from app.capture import Capture
from app.config import ConfigError
from app.pipeline import DetectionFilter, Pipeline, filter_for
from app.sinks import JsonlLog
from tests.fakes.fake_detector import FakeDetector
from tests.fakes.fake_source import FakeSource
from tests.reliability import support

BOX = [[40, 30, 120, 200, 0.9, 0]]


class CountingNotifier:
    """A FAKE app.service.Notifier that records calls."""

    def __init__(self):
        self.pings: list[float] = []
        self.statuses: list[str] = []
        self.calls: list[str] = []

    def watchdog(self):
        self.pings.append(time.monotonic())
        return True

    def status(self, text):
        self.statuses.append(text)
        return True

    def ready(self):
        self.calls.append("ready")

    def extend_timeout(self, s):
        self.calls.append("extend")

    def stopping(self):
        self.calls.append("stopping")


class ListRecorder:
    needs_canvas = True

    def __init__(self):
        self.canvases = []

    def write(self, canvas):
        self.canvases.append(canvas)

    def close(self):
        pass


def run_pipeline(capture, pipeline, stop_after=None):
    """Until the pipeline stops itself (max frames, source end), or ``stop_after`` seconds."""
    return support.run_pipeline(capture, pipeline, 3600.0 if stop_after is None else stop_after)


def test_processes_logs_and_accounts_for_every_frame(tmp_path):
    path = tmp_path / "log.jsonl"
    log = JsonlLog(str(path))
    cap = Capture(lambda: FakeSource(period=0.001, shape=(48, 64)))
    det = FakeDetector(BOX, delay_s=0.01)
    notifier = CountingNotifier()
    rec = ListRecorder()
    p = Pipeline(cap, det, log_sink=log, notifier=notifier, recorder=rec, max_frames=20)
    stats = run_pipeline(cap, p)
    log.close()
    assert stats.processed == 20 and stats.stopped_by == "max frames"
    assert stats.dropped > 0  # the source is ~10x faster than the detector
    assert stats.captured == stats.processed + stats.dropped
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert len(lines) == 20
    seqs = [x["seq"] for x in lines]
    assert seqs == sorted(seqs) and len(set(seqs)) == 20
    assert all(x["detections"][0]["label"] == "person" and x["width"] == 64 for x in lines)
    assert lines[-1]["fps"] > 0 and lines[-1]["dropped"] > 0
    assert len(notifier.pings) == 20  # one per processed frame
    assert len(rec.canvases) == 20 and rec.canvases[0].shape == (48, 64, 3)
    assert stats.stage_ms["detect"] >= 20 * 10 * 0.9


def test_source_errors_become_event_lines_and_the_loop_continues(tmp_path):
    path = tmp_path / "log.jsonl"
    log = JsonlLog(str(path))
    made = []

    def factory():
        made.append(FakeSource(script={2: "raise"} if not made else {}))
        return made[-1]

    cap = Capture(factory, backoff_initial_s=0.01)
    p = Pipeline(cap, FakeDetector(BOX), log_sink=log, max_frames=10)
    stats = run_pipeline(cap, p, stop_after=5)
    log.close()
    assert stats.processed == 10
    objs = [json.loads(x) for x in path.read_text().splitlines()]
    events = [o for o in objs if "event" in o]
    assert [e["event"] for e in events][:2] == ["source_error", "source_recovered"]
    assert events[0]["stage"] == "read" and "camera unplugged" in events[0]["message"] and events[0]["v"] == 1
    assert sum("seq" in o for o in objs) == 10


def test_no_watchdog_pings_while_the_source_is_wedged():
    made = []

    def factory():
        made.append(FakeSource(script={3: "hang"}))
        return made[-1]

    cap = Capture(factory, hang_timeout_s=30)
    notifier = CountingNotifier()
    p = Pipeline(cap, FakeDetector(BOX), notifier=notifier, idle_grace_s=0.2)
    stats = run_pipeline(cap, p, stop_after=2.0)
    assert stats.processed == 3
    last_frame = cap.last_frame_t
    assert notifier.pings, "pings while frames flowed"
    # pings stop once the grace after the last frame is over (they would go on for 2 s otherwise)
    assert max(notifier.pings) - last_frame < 0.2 + 0.5
    assert stats.stopped_by == "signal"


def test_status_about_once_per_interval():
    cap = Capture(lambda: FakeSource(period=0.01))
    notifier = CountingNotifier()
    p = Pipeline(cap, FakeDetector(BOX), notifier=notifier, status_interval_s=0.1)
    run_pipeline(cap, p, stop_after=0.55)
    assert 3 <= len(notifier.statuses) <= 8
    assert "fps=" in notifier.statuses[-1] and "dropped=" in notifier.statuses[-1]


def test_stop_is_prompt():
    cap = Capture(lambda: FakeSource(period=0.01))
    p = Pipeline(cap, FakeDetector(BOX))
    t0 = time.monotonic()
    stats = run_pipeline(cap, p, stop_after=0.2)
    assert time.monotonic() - t0 < 1.0 and stats.stopped_by == "signal"


def test_finite_source_ends_the_loop_after_its_last_frame():
    cap = Capture(lambda: FakeSource(limit=5, period=0.0), lossless=True)
    p = Pipeline(cap, FakeDetector(BOX, delay_s=0.005))
    stats = run_pipeline(cap, p, stop_after=5)
    assert stats.processed == 5 and stats.dropped == 0 and stats.stopped_by == "source ended"


def test_detection_filter_classes_and_per_class_thresholds():
    names = ["person", "dog", "cat"]
    dets = np.array(
        [[0, 0, 1, 1, 0.9, 0], [0, 0, 1, 1, 0.4, 0], [0, 0, 1, 1, 0.6, 1], [0, 0, 1, 1, 0.3, 2], [0, 0, 1, 1, 0.9, 7]],
        np.float32,
    )
    f = DetectionFilter(names, classes=["person", "dog"], class_thresholds={"person": 0.5}, base_threshold=0.25)
    out = f(dets)
    assert out[:, 4].tolist() == pytest.approx([0.9, 0.6])
    g = DetectionFilter(names, class_thresholds={"cat": 0.35}, base_threshold=0.25)
    assert g(dets)[:, 4].tolist() == pytest.approx([0.9, 0.4, 0.6])
    noop = DetectionFilter(names, base_threshold=0.25)
    assert noop(dets) is dets
    with pytest.raises(ConfigError, match="'horse'.*'person'"):
        DetectionFilter(names, classes=["horse"])
    with pytest.raises(ConfigError, match="class_thresholds.*'zebra'"):
        DetectionFilter(names, class_thresholds={"zebra": 0.5})


def test_keep_is_applied_before_logging(tmp_path):
    path = tmp_path / "log.jsonl"
    log = JsonlLog(str(path), only_detections=True)
    cap = Capture(lambda: FakeSource(period=0.005))
    keep = DetectionFilter(["person"], class_thresholds={"person": 0.95}, base_threshold=0.25)
    p = Pipeline(cap, FakeDetector(BOX), keep=keep, log_sink=log, max_frames=5)
    stats = run_pipeline(cap, p)
    log.close()
    assert stats.processed == 5
    assert path.read_text() == ""  # 0.9 < 0.95: nothing kept, nothing logged


def test_filter_for_lowers_the_detector_threshold_for_a_lower_class_threshold():
    det = FakeDetector(class_names=("person", "dog"), score_threshold=0.4)
    keep = filter_for(det, (), {"dog": 0.2})
    assert det.score_threshold == pytest.approx(0.2)
    dets = np.array([[0, 0, 1, 1, 0.3, 0], [0, 0, 1, 1, 0.3, 1], [0, 0, 1, 1, 0.5, 0]], np.float32)
    np.testing.assert_allclose(keep(dets)[:, [4, 5]], [[0.3, 1], [0.5, 0]])  # person still needs 0.4
    det2 = FakeDetector(class_names=("person",), score_threshold=0.4)
    filter_for(det2, (), {"person": 0.6})
    assert det2.score_threshold == pytest.approx(0.4)  # a higher class threshold is the filter's job


# --- the Pi path end to end, against the FAKE picamera2 ---------------------------------------


@pytest.fixture
def fake_cam(monkeypatch):
    import sys

    from tests.fakes import fake_picamera2

    module = fake_picamera2.make_module()
    monkeypatch.setitem(sys.modules, "picamera2", module)
    return module


def test_picamera2_with_drm_overlay_per_frame(fake_cam):
    from app.config import SourceConfig
    from app.sinks import DrmPreview
    from app.sources import make_factory

    preview = DrmPreview(["person"])
    cap = Capture(make_factory("picamera2", SourceConfig(), preview))
    det = FakeDetector(BOX)
    p = Pipeline(cap, det, preview=preview, max_frames=8)
    stats = run_pipeline(cap, p)
    assert stats.processed == 8
    assert all(shape == (240, 320) for shape in det.seen_shapes)  # the cropped Y plane
    overlays = [o for o in fake_cam.state.overlays if o is not None]
    # The same box on every frame: set once, then only for the HUD twice a second (DrmPreview.show).
    assert 1 <= len(overlays) <= 4 and overlays[0].shape == (240, 320, 4)
    assert preview.overlays_set + preview.overlays_skipped == 8
    assert overlays[0][100, 40, 3] == 255 and overlays[0][100, 80, 3] == 0


def test_picamera2_hang_is_reported_and_the_camera_reopened(fake_cam, tmp_path):
    from app.config import SourceConfig
    from app.sinks import DrmPreview
    from app.sources import make_factory
    from tests.fakes.fake_picamera2 import STALL

    state = fake_cam.state

    def on_capture(n):
        return STALL if n == 3 else None  # no frame more until the camera is closed

    state.on_capture = on_capture
    path = tmp_path / "log.jsonl"
    log = JsonlLog(str(path))
    preview = DrmPreview(["person"])
    cap = Capture(make_factory("picamera2", SourceConfig(), preview), hang_timeout_s=0.3, backoff_initial_s=0.01)
    p = Pipeline(cap, FakeDetector(BOX), log_sink=log, preview=preview, max_frames=10)
    stats = run_pipeline(cap, p, stop_after=10)
    log.close()
    assert stats.processed == 10
    assert len(state.opened) >= 2 and state.opened[0].closed
    # The boxes follow the camera: the reopened one is on HDMI and gets the overlays after the hang.
    assert 1 <= len(state.opened[0].overlays) <= 3  # the frames before the hang
    assert len(state.opened[-1].overlays) >= 1  # drawn again on the new camera, then when the drawing changes
    assert preview.camera is None  # every camera closed on stop
    events = [json.loads(x) for x in path.read_text().splitlines() if '"event"' in x]
    assert [e["event"] for e in events][:2] == ["source_error", "source_recovered"]
    assert events[0]["stage"] == "hang"


def test_failing_preview_and_recorder_do_not_stop_detection(tmp_path, caplog):
    class BrokenPreview:
        needs_canvas = True
        stop_requested = False

        def show(self, *a):
            raise RuntimeError("window vanished")

        def close(self):
            pass

    class BrokenRecorder(ListRecorder):
        def write(self, canvas):
            raise OSError(28, "No space left on device")

    path = tmp_path / "log.jsonl"
    log = JsonlLog(str(path))
    cap = Capture(lambda: FakeSource(period=0.002))
    p = Pipeline(cap, FakeDetector(BOX), log_sink=log, preview=BrokenPreview(), recorder=BrokenRecorder(),
                 max_frames=6)
    stats = run_pipeline(cap, p)
    log.close()
    assert stats.processed == 6 and len(path.read_text().splitlines()) == 6
    assert p.sink_failures == {"preview": 6, "recorder": 6}
    assert caplog.text.count("window vanished") == 1


def test_non_finite_detections_are_dropped_not_fatal(tmp_path):
    path = tmp_path / "log.jsonl"
    log = JsonlLog(str(path))
    cap = Capture(lambda: FakeSource(period=0.002))
    p = Pipeline(cap, FakeDetector([[1, 2, 3, 4, float("nan"), 0], [1, 2, 9, 9, 0.8, 0]]), log_sink=log, max_frames=3)
    stats = run_pipeline(cap, p)
    log.close()
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert stats.processed == 3 and log.failures == 0
    assert [len(x["detections"]) for x in lines] == [1, 1, 1]


def tracked_pipeline(tmp_path, detections, frames, only_events=False, **events_kw):
    from app.events import Events
    from app.tracker import Tracker, TrackerSettings

    path = tmp_path / "log.jsonl"
    log = JsonlLog(str(path), only_events=only_events)
    det = FakeDetector(detections, score_threshold=0.25)
    keep = filter_for(det, (), {}, low_factor=0.5)
    events = Events(Tracker(TrackerSettings(confirm_hits=3, confirm_frames=5, lost_after_s=0.05)), log.event,
                    det.class_names, **events_kw)
    rec = ListRecorder()

    class MarksPreview:
        needs_canvas = False
        stop_requested = False
        marks: list = []

        def show(self, frame, canvas, detections, hud, marks=None):
            self.marks.append(marks)

        def close(self):
            pass

    rec.preview = MarksPreview()
    cap = Capture(lambda: FakeSource(period=0.002, shape=(120, 160)))
    p = Pipeline(cap, det, keep=keep, log_sink=log, recorder=rec, preview=rec.preview, events=events,
                 max_frames=frames)
    stats = run_pipeline(cap, p)
    log.close()
    return stats, [json.loads(x) for x in path.read_text().splitlines()], rec, p


def test_tracks_become_event_lines_beside_the_frame_lines(tmp_path):
    stats, lines, rec, _ = tracked_pipeline(tmp_path, [[40, 30, 80, 110, 0.9, 0], [100, 20, 150, 60, 0.2, 0]], 12)
    frames = [x for x in lines if "event" not in x]
    events = [x for x in lines if "event" in x]
    assert len(frames) == 12 and all(len(f["detections"]) == 1 for f in frames)  # the weak box is not reported
    assert [(e["event"], e["track"]) for e in events] == [("enter", 1), ("leave", 1)]
    assert events[1]["reason"] == "stop" and all(e["v"] == 1 for e in events)
    seqs = [x.get("seq") for x in lines]
    assert seqs.index(None) == 2  # confirmed on the third frame: its enter line comes just before that frame's line
    assert stats.events == 2


def test_only_events_writes_no_frame_lines(tmp_path):
    _, lines, _, _ = tracked_pipeline(tmp_path, BOX, 8, only_events=True)
    assert [x["event"] for x in lines] == ["enter", "leave"]


def test_the_overlay_shows_track_ids_and_zones(tmp_path):
    zone = {"left": ((0.0, 0.0), (0.4, 0.0), (0.4, 1.0), (0.0, 1.0))}
    _, _, rec, _ = tracked_pipeline(tmp_path, [[40, 30, 80, 110, 0.9, 0]], 6, zones=zone)
    plain, _, rec_plain, _ = tracked_pipeline(tmp_path, [[40, 30, 80, 110, 0.9, 0]], 6)
    from app.overlay import ZONE_RGB

    zone_bgr = np.array(ZONE_RGB[::-1])
    last = rec.canvases[-1]
    assert (np.abs(last.astype(int) - zone_bgr).sum(axis=2) == 0).any()  # the zone is drawn
    assert not (np.abs(rec_plain.canvases[-1].astype(int) - zone_bgr).sum(axis=2) == 0).any()
    # the preview is handed the track id of each box once its track is confirmed, and the zones
    marks = rec.preview.marks
    assert [m.ids.tolist() for m in marks] == [[0], [0], [1], [1], [1], [1]]
    assert marks[-1].zones == tuple(zone.items()) and rec_plain.preview.marks[-1].zones == ()


def test_a_failing_tracker_does_not_stop_detection(tmp_path, caplog):
    class Broken:
        marks_base = None
        counts: dict = {}

        class snapshots:
            failures = 0

        def frame(self, *a):
            raise RuntimeError("tracker bug")

        def tick(self, now):
            raise RuntimeError("tracker bug")

        close = tick

    from app.overlay import Marks

    Broken.marks_base = Marks()
    path = tmp_path / "log.jsonl"
    log = JsonlLog(str(path))
    cap = Capture(lambda: FakeSource(period=0.002))
    p = Pipeline(cap, FakeDetector(BOX), log_sink=log, events=Broken(), max_frames=5)
    stats = run_pipeline(cap, p)
    log.close()
    assert stats.processed == 5 and len(path.read_text().splitlines()) == 5
    assert p.sink_failures["events"] >= 5 and caplog.text.count("tracker bug") == 1


def test_the_filter_splits_reported_and_weaker_boxes():
    det = FakeDetector(score_threshold=0.4, class_names=("person", "dog"))
    keep = filter_for(det, ("person",), {}, low_factor=0.5)
    assert det.score_threshold == pytest.approx(0.2)  # the detector lets the weaker boxes through
    d = np.array([[0, 0, 1, 1, 0.9, 0], [0, 0, 1, 1, 0.3, 0], [0, 0, 1, 1, 0.1, 0], [0, 0, 1, 1, 0.9, 1]], np.float32)
    high, low = keep.split(d)
    assert high[:, 4].tolist() == pytest.approx([0.9]) and low[:, 4].tolist() == pytest.approx([0.3])
    assert np.array_equal(keep(d), high)
    plain = filter_for(FakeDetector(score_threshold=0.4), (), {})
    h, lo = plain.split(d[:3])
    assert len(h) == 3 and len(lo) == 0 and not plain.active
