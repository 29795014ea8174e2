"""Events: what the tracks did, as lines for the JSON Lines log, and snapshots.

``Events.frame(frame, high, low)`` runs the tracker (app/tracker.py) on one
frame's boxes and writes, through ``emit`` (the log's ``event``):

- ``enter``: a track was confirmed (N of the last M frames);
- ``update``: at most every ``update_every_s`` seconds while a track lives (0 = never);
- ``cross``: the track's feet crossed the counting line, ``direction`` ``in`` or ``out``;
- ``leave``: the track ended, unmatched for T seconds (``reason`` ``lost``) or the
  app stopping (``reason`` ``stop``), with its ``duration_s``.

Every event carries the track id, the class, the first and last seen times, the
best score and the best box, and, when zones are configured, the zones the
track's feet (the bottom middle of its box) are in. With ``only_in_zones``, a
track makes events only once it has been seen inside one of those zones: its
enter comes then, and its leave when it ends. With snapshots on, enter and
leave write a JPEG of the track's best frame so far with its box drawn, and the
event names the file (null when it could not be written).

The best frame is the frame pixels themselves, kept by reference (sources hand
over a fresh array per frame): at most one per live track. ``NullEvents`` does
nothing: no tracker, no events.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np

from app import overlay
from app.geometry import Point, inside, orient, segments_meet
from app.snapshots import NullSnapshots
from app.tracker import Track, Tracker

EVENT_SCHEMA_VERSION = 1
EVENT_KINDS = ("enter", "update", "cross", "leave")
# The feet must be this far (normalised) from the counting line for their side to count: no jitter crossings.
LINE_MARGIN = 0.01


def iso_utc(wall: float) -> str:
    return datetime.fromtimestamp(wall, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _stamp(wall: float) -> str:
    """20261128T032906.123Z: a snapshot name's prefix, sorting by time."""
    d = datetime.fromtimestamp(wall, UTC)
    return d.strftime("%Y%m%dT%H%M%S.") + f"{d.microsecond // 1000:03d}Z"


class NullEvents:
    """No tracker, no events; the interface of ``Events``."""

    zones: dict[str, tuple[Point, ...]] = {}
    line: tuple[Point, ...] = ()
    counts: Counter = Counter()
    snapshots = NullSnapshots()
    marks_base = None

    def frame(self, frame: Any, high: np.ndarray, low: np.ndarray | None) -> np.ndarray | None:
        return None

    def tick(self, now: float) -> None:
        pass

    def close(self, now: float) -> None:
        pass


@dataclass
class _Seen:
    """Events' own state of one confirmed track."""

    announced: bool = False
    last_update: float = 0.0
    side: int = 0  # of the counting line: -1, +1, 0 = not yet on one
    side_point: Point | None = None  # where the feet last were on that side


_EDGE = 1.0 - 1e-6  # the largest normalised coordinate a point in the frame is given


class Events:
    def __init__(
        self,
        tracker: Tracker,
        emit: Callable[[dict[str, Any]], Any],
        class_names: Sequence[str],
        *,
        zones: dict[str, tuple[Point, ...]] | None = None,
        only_in_zones: Sequence[str] = (),
        line: Sequence[Point] = (),
        update_every_s: float = 0.0,
        snapshots: Any = None,
        wall_clock: Callable[[], float] = time.time,
        mono_clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.tracker = tracker
        self.emit = emit
        self.class_names = list(class_names)
        self.zones = dict(zones or {})
        self.only_in_zones = tuple(only_in_zones)
        self.line = tuple(line)
        self.update_every_s = update_every_s
        self.snapshots = snapshots if snapshots is not None else NullSnapshots()
        self._keep_frames = not isinstance(self.snapshots, NullSnapshots)
        self._wall, self._mono = wall_clock, mono_clock
        self._seen: dict[Track, _Seen] = {}
        self._best: dict[Track, np.ndarray] = {}
        self._size = (1, 1)  # (w, h) of the latest frame: zones and the line are normalised
        self.counts: Counter = Counter()
        self.crossings = {"in": 0, "out": 0}
        self.marks_base = overlay.Marks(zones=tuple(self.zones.items()), line=self.line)

    # --- per frame ---

    def frame(self, frame: Any, high: np.ndarray, low: np.ndarray | None) -> np.ndarray:
        """Track one frame's boxes and write its events; returns the track id of each high box (0 = none)."""
        t = frame.t
        h, w = frame.pixels.shape[:2]
        self._size = (w, h)
        tf = self.tracker.update(high, low, t)
        if self._keep_frames:
            for tr in tf.improved:
                self._best[tr] = frame.pixels
        for tr in tf.ended:
            self._end(tr, t, "lost")
        for tr in tf.entered:
            self._seen[tr] = _Seen()
        for tr in tf.live:
            seen = self._seen[tr]
            if not seen.announced:
                if tr.matched and self._admitted(tr):
                    seen.announced = True
                    seen.last_update = t
                    self._emit("enter", tr, t, snapshot=True)
                continue
            if self.line and tr.matched:
                self._cross(tr, seen, t)
            if self.update_every_s > 0 and t - seen.last_update >= self.update_every_s:
                seen.last_update = t
                self._emit("update", tr, t)
        if len(self._best) > len(self.tracker.tracks):  # tentative tracks forgotten: let their frames go
            live = set(self.tracker.tracks)
            self._best = {tr: px for tr, px in self._best.items() if tr in live}
        return tf.high_ids

    def tick(self, now: float) -> None:
        """No frame came (an outage, slow playback): end the tracks lost by ``now``."""
        for tr in self.tracker.tick(now):
            self._end(tr, now, "lost")

    def close(self, now: float) -> None:
        """The app stops: every live track leaves (``reason`` ``stop``)."""
        for tr in self.tracker.close():
            self._end(tr, now, "stop")
        self._best.clear()

    # --- helpers ---

    def _admitted(self, tr: Track) -> bool:
        if not self.only_in_zones:
            return True
        zones = self._zones_of(tr)
        return any(z in zones for z in self.only_in_zones)

    def _feet(self, tr: Track) -> Point:
        x1, _, x2, y2 = tr.box
        w, h = self._size
        # Just inside the frame: feet cut off by its bottom edge are in a zone drawn to that edge (a point on a
        # polygon's far edge counts as outside).
        return min((x1 + x2) * 0.5 / w, _EDGE), min(y2 / h, _EDGE)

    def _zones_of(self, tr: Track) -> list[str]:
        x, y = self._feet(tr)
        return [name for name, poly in self.zones.items() if inside(poly, x, y)]

    def _cross(self, tr: Track, seen: _Seen, t: float) -> None:
        a, b = self.line
        p = self._feet(tr)
        length = ((b[0] - a[0]) ** 2 + (b[1] - a[1]) ** 2) ** 0.5
        dist = orient(a, b, p) / length
        if abs(dist) <= LINE_MARGIN:
            return  # on the line: wait until the feet are clearly on one side
        side = 1 if dist > 0 else -1
        if seen.side and side != seen.side and seen.side_point is not None and segments_meet(seen.side_point, p, a, b):
            direction = "in" if side > 0 else "out"
            self.crossings[direction] += 1
            self._emit("cross", tr, t, direction=direction, **self.crossings)
        seen.side, seen.side_point = side, p

    def _end(self, tr: Track, t: float, reason: str) -> None:
        seen = self._seen.pop(tr, None)
        if seen is not None and seen.announced:
            self._emit("leave", tr, t, snapshot=True, duration_s=round(tr.last_t - tr.first_t, 3), reason=reason)
        self._best.pop(tr, None)

    def _emit(self, kind: str, tr: Track, t: float, snapshot: bool = False, **extra: Any) -> None:
        offset = self._wall() - self._mono()
        cls = tr.cls
        record: dict[str, Any] = {
            "event": kind,
            "mono_ms": round(t * 1000.0, 3),
            "track": tr.id,
            "label": self.class_names[cls] if 0 <= cls < len(self.class_names) else f"class{cls}",
            "first_seen": iso_utc(tr.first_t + offset),
            "last_seen": iso_utc(tr.last_t + offset),
            "score": round(tr.best_score, 4),
            "box": [round(v, 1) for v in tr.best_box],
        }
        if self.zones:
            record["zones"] = self._zones_of(tr)
        record.update(extra)
        if snapshot and self._keep_frames:
            record["snapshot"] = self._snapshot(kind, tr, t + offset)
        self.counts[kind] += 1
        self.emit(record)

    def _snapshot(self, kind: str, tr: Track, wall: float) -> str | None:
        pixels = self._best.get(tr)
        if pixels is None:
            return None
        box = np.array([[*tr.best_box, tr.best_score, tr.cls]], np.float32)
        image = overlay.render(pixels, box, self.class_names, None, overlay.Marks(ids=np.array([tr.id])))
        return self.snapshots.save(f"{_stamp(wall)}-track{tr.id}-{kind}.jpg", image)
