"""The loop: newest frame -> detect -> keep what the config asks for -> log, preview, record.

Runs on the main thread. It takes the newest frame from the capture slot (never
a backlog), so detection never blocks capture. The systemd watchdog is pinged
only from here, once per processed frame, so a wedged loop or a dead camera
stops the pings; an open, healthy but idle source (slow image playback) may
ping for ``idle_grace_s`` after the last frame.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from app import overlay
from app.capture import Capture
from app.config import ConfigError
from app.events import NullEvents
from app.service import Notifier
from app.sinks import NullLog, NullPreview, NullRecorder, frame_record

log = logging.getLogger("xnorcam.pipeline")


class DetectionFilter:
    """Keeps the wanted classes, each above its own score threshold.

    ``base_threshold`` applies to classes without an entry in
    ``class_thresholds``. Unknown class names are a ConfigError naming them
    and the model's classes. ``split`` also returns the weaker boxes of the
    wanted classes, down to ``low_factor`` times their threshold, which the
    tracker uses to keep tracks alive (never reported).
    """

    def __init__(
        self,
        class_names: Sequence[str],
        classes: Sequence[str] = (),
        class_thresholds: dict[str, float] | None = None,
        base_threshold: float = 0.0,
        low_factor: float = 1.0,
    ) -> None:
        names = list(class_names)
        class_thresholds = dict(class_thresholds or {})
        for key, wanted in (("detector.classes", list(classes)), ("detector.class_thresholds", list(class_thresholds))):
            unknown = [n for n in wanted if n not in names]
            if unknown:
                raise ConfigError(
                    f"{key}: unknown class name(s) {', '.join(map(repr, unknown))}; this model's classes: "
                    f"{', '.join(map(repr, names))}"
                )
        self.thresholds = np.array([class_thresholds.get(n, base_threshold) for n in names], dtype=np.float32)
        self.keep_class = np.array([not classes or n in classes for n in names], dtype=bool)
        self.low_thresholds = self.thresholds * np.float32(low_factor)
        self.active = bool(classes) or any(t != base_threshold for t in class_thresholds.values()) or low_factor < 1

    def _masks(self, detections: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        cls = detections[:, 5].astype(np.int64)
        valid = (cls >= 0) & (cls < len(self.thresholds))
        idx = np.where(valid, cls, 0)
        return valid & self.keep_class[idx], detections[:, 4], idx

    def __call__(self, detections: np.ndarray) -> np.ndarray:
        if not self.active or len(detections) == 0:
            return detections
        wanted, score, idx = self._masks(detections)
        return detections[wanted & (score >= self.thresholds[idx])]

    def split(self, detections: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(reported, weaker): the boxes ``__call__`` keeps, and the wanted ones down to the low thresholds."""
        if not self.active or len(detections) == 0:
            return detections, detections[:0]
        wanted, score, idx = self._masks(detections)
        high = score >= self.thresholds[idx]
        return detections[wanted & high], detections[wanted & ~high & (score >= self.low_thresholds[idx])]


def filter_for(
    detector: Any, classes: Sequence[str], class_thresholds: dict[str, float], low_factor: float = 1.0
) -> DetectionFilter:
    """The filter for a loaded detector; lowers its own threshold when a per-class one is lower.

    The detector must let through what the lowest per-class threshold keeps,
    times ``low_factor`` when the tracker takes weaker boxes too; the filter
    then holds every class to its own threshold.
    """
    base = float(detector.score_threshold)
    keep = DetectionFilter(detector.class_names, classes, class_thresholds, base, low_factor)
    if class_thresholds or low_factor < 1:
        detector.score_threshold = min([base, *class_thresholds.values()]) * low_factor
    return keep


@dataclass
class PipelineStats:
    processed: int = 0
    captured: int = 0
    dropped: int = 0
    source_errors: int = 0
    log_lines: int = 0
    log_failures: int = 0
    events: int = 0
    snapshot_failures: int = 0
    fps: float = 0.0
    elapsed_s: float = 0.0
    stage_ms: dict[str, float] = field(default_factory=dict)  # summed over processed frames
    stopped_by: str = ""

    def summary(self) -> str:
        per = {k: v / self.processed for k, v in self.stage_ms.items()} if self.processed else {}
        split = " ".join(f"{k}={v:.1f}ms" for k, v in per.items())
        return (
            f"processed={self.processed} captured={self.captured} dropped={self.dropped} "
            f"source_errors={self.source_errors} log_lines={self.log_lines} log_failures={self.log_failures} "
            f"events={self.events} snapshot_failures={self.snapshot_failures} "
            f"fps={self.fps:.2f} {split} stopped_by={self.stopped_by}"
        )


class Pipeline:
    def __init__(
        self,
        capture: Capture,
        detector: Any,
        *,
        class_names: Sequence[str] | None = None,
        keep: Callable[[np.ndarray], np.ndarray] | None = None,
        log_sink: Any = None,
        preview: Any = None,
        recorder: Any = None,
        web: Any = None,
        notifier: Any = None,
        events: Any = None,
        hud: bool = True,
        max_frames: int = 0,
        idle_grace_s: float = 10.0,
        status_interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        status_note: str = "",
    ) -> None:
        self.capture = capture
        self.detector = detector
        self.class_names = list(class_names if class_names is not None else detector.class_names)
        self.keep = keep
        self.log = log_sink or NullLog()
        self.preview = preview or NullPreview()
        self.recorder = recorder or NullRecorder()
        self.web = web or NullPreview()  # the web preview (app/web.py): takes the newest frame, draws on its own
        self.notifier = notifier or Notifier()  # no address: every call a no-op
        self.events = events or NullEvents()
        self.hud = hud
        self.max_frames = max_frames
        self.idle_grace_s = idle_grace_s
        self.status_interval_s = status_interval_s
        self.clock = clock
        self.status_note = status_note  # put first in every STATUS= (e.g. the demo standing in for a camera)
        self.stats = PipelineStats(stage_ms={"detect": 0.0, "overlay": 0.0, "log": 0.0})
        self._done_times: collections.deque[float] = collections.deque(maxlen=30)
        self.watchdog_pings = 0
        self.sink_failures: dict[str, int] = {}
        self.last_detect_ms = 0.0

    def status(self) -> dict[str, Any]:
        """The numbers the web preview's /status shows; safe to call from another thread."""
        slot = self.capture.slot
        return {
            "fps": round(self._fps(), 2),
            "detect_ms": round(self.last_detect_ms, 2),
            "dropped": slot.dropped,
            "captured": slot.captured,
            "processed": self.stats.processed,
            "source_errors": self.capture.stats().errors,
            "outage": bool(self.capture.outage),
            "events": self.stats.events,  # as of the last status refresh (once a second)
        }

    def _fps(self) -> float:
        t = self._done_times
        if len(t) < 2 or t[-1] <= t[0]:
            return 0.0
        return (len(t) - 1) / (t[-1] - t[0])

    def _drain_events(self) -> None:
        events = self.capture.events
        while events:
            try:
                self.log.event(events.popleft())
            except IndexError:
                break

    def _ping(self) -> None:
        self.notifier.watchdog()
        self.watchdog_pings += 1

    def refresh_stats(self) -> None:
        cs = self.capture.stats()
        s = self.stats
        s.captured, s.dropped, s.source_errors = cs.captured, cs.dropped, cs.errors
        s.log_lines = getattr(self.log, "lines", 0)
        s.log_failures = getattr(self.log, "failures", 0)
        s.events = sum(self.events.counts.values())
        s.snapshot_failures = self.events.snapshots.failures
        s.fps = self._fps()

    def _outputs(self, frame: Any, detections: np.ndarray, hud: overlay.Hud | None,
                 marks: overlay.Marks | None) -> None:
        """Preview and recorder: their failures are counted and contained (one warning each)."""
        try:
            canvas = None
            if self.preview.needs_canvas or self.recorder.needs_canvas:
                canvas = overlay.render(frame.pixels, detections, self.class_names, hud, marks)
        except Exception as exc:
            self._sink_failed("overlay", exc)
            return
        for name, call in (("preview", lambda: self.preview.show(frame, canvas, detections, hud, marks)),
                           ("recorder", lambda: self.recorder.write(canvas)),
                           ("web", lambda: self.web.show(frame, canvas, detections, hud, marks))):
            try:
                call()
            except Exception as exc:
                self._sink_failed(name, exc)

    def _track(self, frame: Any, detections: np.ndarray) -> tuple[np.ndarray, overlay.Marks | None]:
        """The reported boxes and the tracker's marks for the overlay; tracker failures are contained too."""
        split = getattr(self.keep, "split", None)
        if split is not None:
            high, low = split(detections)
        else:
            high, low = (self.keep(detections) if self.keep is not None else detections), None
        base = self.events.marks_base
        if base is None:
            return high, None
        try:
            ids = self.events.frame(frame, high, low)
        except Exception as exc:
            self._sink_failed("events", exc)
            return high, base
        return high, overlay.Marks(ids, base.zones, base.line)

    def _sink_failed(self, name: str, exc: Exception) -> None:
        n = self.sink_failures.get(name, 0) + 1
        self.sink_failures[name] = n
        if n == 1:
            log.warning("%s failed (%s: %s); detection continues", name, type(exc).__name__, exc)

    def _events_call(self, name: str, now: float) -> None:
        try:
            getattr(self.events, name)(now)
        except Exception as exc:
            self._sink_failed("events", exc)

    def run(self, stop: threading.Event) -> PipelineStats:
        perf = time.perf_counter
        start = self.clock()
        last_frame_at = start
        next_status = start
        s = self.stats
        s.stopped_by = "stop"
        while True:
            if stop.is_set():
                s.stopped_by = "signal"
                break
            frame = self.capture.take(timeout=0.1)
            self._drain_events()
            now = self.clock()
            if now >= next_status:
                self.refresh_stats()
                self.notifier.status(
                    (f"{self.status_note}; " if self.status_note else "")
                    + f"fps={s.fps:.1f} dropped={s.dropped} processed={s.processed} source_errors={s.source_errors}"
                    + (" (source outage)" if self.capture.outage else "")
                )
                next_status = now + self.status_interval_s
            if frame is None:
                if self.capture.ended and self.capture.slot.pending == 0:
                    s.stopped_by = "source failed" if getattr(self.capture, "failure", None) else "source ended"
                    break
                # Idle but healthy (e.g. slow image playback): keep systemd happy for a grace period only.
                if self.capture.healthy and now - last_frame_at <= self.idle_grace_s:
                    self._ping()
                self._events_call("tick", now)
                continue

            t0 = perf()
            detections = self.detector.detect(frame.pixels)
            # A model can overflow to inf/NaN; such rows would crash the overlay and the (NaN-refusing) log.
            detections = detections[np.isfinite(detections).all(axis=1)]
            t1 = perf()
            detections, marks = self._track(frame, detections)
            detect_ms = (t1 - t0) * 1e3
            self.last_detect_ms = detect_ms
            s.processed += 1
            done = self.clock()
            last_frame_at = done
            self._done_times.append(done)
            fps = self._fps()
            dropped = self.capture.slot.dropped
            hud = overlay.Hud(fps, detect_ms, dropped) if self.hud else None

            self._outputs(frame, detections, hud, marks)
            t2 = perf()
            latency_ms = (done - frame.t) * 1e3
            record = frame_record(frame, detections, self.class_names, fps, latency_ms, dropped)
            record["detect_ms"] = round(detect_ms, 2)
            self.log.write(record)
            t3 = perf()
            s.stage_ms["detect"] += detect_ms
            s.stage_ms["overlay"] += (t2 - t1) * 1e3
            s.stage_ms["log"] += (t3 - t2) * 1e3

            self._ping()
            if getattr(self.preview, "stop_requested", False):
                s.stopped_by = "preview closed"
                break
            if self.max_frames and s.processed >= self.max_frames:
                s.stopped_by = "max frames"
                break
        s.elapsed_s = self.clock() - start
        self._events_call("close", self.clock())
        self._drain_events()
        self.refresh_stats()
        return s
