"""Tracks: each detection is tied to a track across frames, ByteTrack-style, small enough for the Pi.

``Tracker.update(high, low, t)`` takes one frame's boxes, float32 (N,6)
``x1, y1, x2, y2, score, class`` as ``Detector.detect`` returns them, split in
two: ``high``, the boxes the app reports (at or above the score threshold), and
``low``, weaker boxes the app does not report (down to a fraction of the
threshold). ``t`` is the frame's capture time in seconds. Then:

1. every track's box is predicted to ``t`` by its motion model;
2. the high boxes are matched to all tracks by IoU, best pairs first;
3. the low boxes are matched to the confirmed tracks still unmatched, with a
   stricter IoU: a person the detector is unsure of for a frame or two keeps
   their track instead of breaking it (ByteTrack's second association);
4. each high box left over starts a tentative track.

A tentative track is confirmed once it has been matched in ``confirm_hits``
(N) of the last ``confirm_frames`` (M) frames, and only then gets its id; one
unmatched for M frames in a row is forgotten. That is where the
detector's single-frame false boxes end. A confirmed track ends after
``lost_after_s`` (T) seconds unmatched, on a frame or on ``tick``.

Motion model: an alpha-beta filter (constant velocity, fixed gains) on the
box's centre and size, in pixels per second, so dropped frames and uneven
frame times are handled; a track unmatched for a while is extrapolated over at
most ``max_predict_s``. Matching is greedy, highest IoU first, rather than an
optimal assignment: with the few people one camera sees they agree except on
contrived ties, and greedy needs no solver. Classes never match each other.

Cost: the numbers of all tracks live in one float64 array (a row per track)
and each association (predict, IoU, greedy pairing, filter update) is one
numba call, so a frame costs a few Python steps per track; ``make bench-arm``
meters it with 0, 5 and 20 people.

The table is bounded: at most ``max_tracks`` tracks live at once; a new box
that would exceed it starts no track (counted in ``refused``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

# Alpha-beta gains: position and velocity corrections per observation.
ALPHA = 0.7
BETA = 0.35

# Columns of the state array, one row per live track.
CX, CY, W, H, VX, VY, VW, VH = range(8)
T_LAST, CLS, HITS, FIRST_T = 8, 9, 10, 11
BEST_SCORE, BEST_BOX, BEST_T = 12, 13, 17  # BEST_BOX: 4 columns x1, y1, x2, y2
BOX, SCORE, MATCHED, IMPROVED = 18, 22, 23, 24  # BOX: the last matched detection's 4 columns
NCOLS = 25


@dataclass(frozen=True)
class TrackerSettings:
    confirm_hits: int = 5
    confirm_frames: int = 7
    lost_after_s: float = 2.0
    match_iou: float = 0.2
    low_match_iou: float = 0.5
    max_predict_s: float = 1.0
    max_tracks: int = 32

    def __post_init__(self) -> None:
        if not 1 <= self.confirm_hits <= self.confirm_frames <= 32:
            raise ValueError(f"need 1 <= confirm_hits <= confirm_frames <= 32, got {self.confirm_hits}, "
                             f"{self.confirm_frames}")
        if not self.lost_after_s >= 0 or not self.max_predict_s >= 0 or self.max_tracks < 1:
            raise ValueError("lost_after_s and max_predict_s must be >= 0, max_tracks >= 1")


@njit(cache=True)
def _associate(S, k, eligible, boxes, taken, t, horizon, threshold):
    """Match ``boxes`` (D,6) not yet ``taken`` to the eligible tracks (rows < k), best IoU first; observe each pair.

    ``taken[j]`` becomes the row of the track box j went to. Returns the number of pairs.
    """
    d = boxes.shape[0]
    px1 = np.empty(k)
    py1 = np.empty(k)
    px2 = np.empty(k)
    py2 = np.empty(k)
    for i in range(k):
        dt = min(t - S[i, T_LAST], horizon)
        cx = S[i, CX] + S[i, VX] * dt
        cy = S[i, CY] + S[i, VY] * dt
        w = max(1.0, S[i, W] + S[i, VW] * dt)
        h = max(1.0, S[i, H] + S[i, VH] * dt)
        px1[i], py1[i], px2[i], py2[i] = cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h
    ious = np.empty(k * d)
    rows = np.empty(k * d, np.int64)
    cols = np.empty(k * d, np.int64)
    n = 0
    for i in range(k):
        if not eligible[i]:
            continue
        area_i = (px2[i] - px1[i]) * (py2[i] - py1[i])
        for j in range(d):
            if taken[j] >= 0 or boxes[j, 5] != S[i, CLS]:
                continue
            ix = min(px2[i], boxes[j, 2]) - max(px1[i], boxes[j, 0])
            iy = min(py2[i], boxes[j, 3]) - max(py1[i], boxes[j, 1])
            if ix <= 0.0 or iy <= 0.0:
                continue
            inter = ix * iy
            union = area_i + (boxes[j, 2] - boxes[j, 0]) * (boxes[j, 3] - boxes[j, 1]) - inter
            iou = inter / union if union > 0.0 else 0.0
            if iou >= threshold:
                ious[n], rows[n], cols[n] = -iou, i, j
                n += 1
    order = np.argsort(ious[:n], kind="mergesort")
    used = np.zeros(k, np.bool_)
    pairs = 0
    for m in order:
        i, j = rows[m], cols[m]
        if used[i] or taken[j] >= 0:
            continue
        used[i] = True
        taken[j] = i
        pairs += 1
        _observe(S, i, boxes[j, 0], boxes[j, 1], boxes[j, 2], boxes[j, 3], boxes[j, 4], t, horizon)
    return pairs


@njit(cache=True)
def _observe(S, i, x1, y1, x2, y2, score, t, horizon):
    """The alpha-beta filter's update of row i with one detection at time t."""
    z = np.array([(x1 + x2) * 0.5, (y1 + y2) * 0.5, x2 - x1, y2 - y1])
    dt = t - S[i, T_LAST]
    if dt > 1e-6:
        if S[i, HITS] == 1.0:  # the second sighting: the velocity is the difference
            for c in range(4):
                S[i, VX + c] = (z[c] - S[i, CX + c]) / dt
                S[i, CX + c] = z[c]
        else:
            p = min(dt, horizon)
            g = BETA / dt
            for c in range(4):
                pred = S[i, CX + c] + S[i, VX + c] * p
                r = z[c] - pred
                S[i, CX + c] = pred + ALPHA * r
                S[i, VX + c] += g * r
    else:  # two boxes at one instant: take the new one, keep the velocity
        for c in range(4):
            S[i, CX + c] = z[c]
    S[i, T_LAST] = t
    S[i, HITS] += 1.0
    S[i, BOX], S[i, BOX + 1], S[i, BOX + 2], S[i, BOX + 3] = x1, y1, x2, y2
    S[i, SCORE] = score
    S[i, MATCHED] = 1.0
    if score > S[i, BEST_SCORE]:
        S[i, BEST_SCORE] = score
        S[i, BEST_BOX], S[i, BEST_BOX + 1], S[i, BEST_BOX + 2], S[i, BEST_BOX + 3] = x1, y1, x2, y2
        S[i, BEST_T] = t
        S[i, IMPROVED] = 1.0


class Track:
    """One object over time: a row of the tracker's state array, plus its id and confirmation window.

    ``id`` is 0 while tentative, then 1, 2, ... in the order tracks are confirmed.
    The numbers are read from the tracker while the track lives and kept when it ends.
    """

    __slots__ = ("id", "bits", "confirmed_t", "_S", "row")

    def __init__(self, S: np.ndarray, row: int) -> None:
        self.id = 0
        self.bits = 1  # bit i: matched i frames ago
        self.confirmed_t: float | None = None
        self._S = S
        self.row = row

    def _v(self, col: int) -> float:
        return float(self._S[self.row, col])

    def _box(self, col: int) -> tuple[float, float, float, float]:
        x1, y1, x2, y2 = self._S[self.row, col:col + 4].tolist()
        return x1, y1, x2, y2

    confirmed = property(lambda self: self.id > 0)
    cls = property(lambda self: int(self._v(CLS)))
    first_t = property(lambda self: self._v(FIRST_T))
    last_t = property(lambda self: self._v(T_LAST))
    hits = property(lambda self: int(self._v(HITS)))
    box = property(lambda self: self._box(BOX), doc="the last matched detection's box")
    score = property(lambda self: self._v(SCORE))
    matched = property(lambda self: self._v(MATCHED) > 0, doc="matched on the latest frame")
    improved = property(lambda self: self._v(IMPROVED) > 0, doc="best_* changed on the latest frame")
    best_score = property(lambda self: self._v(BEST_SCORE))
    best_box = property(lambda self: self._box(BEST_BOX))
    best_t = property(lambda self: self._v(BEST_T))

    def _keep(self) -> None:
        """The track leaves the table: keep its own copy of its numbers."""
        self._S = self._S[self.row:self.row + 1].copy()
        self.row = 0

    def __repr__(self) -> str:
        return f"Track(id={self.id}, cls={self.cls}, box={self.box}, hits={self.hits})"


@dataclass
class TrackFrame:
    """What one ``update`` did.

    ``high_ids``: for each high box, the id of the confirmed track it belongs to, or 0.
    ``entered``: tracks confirmed on this frame. ``ended``: confirmed tracks that ended.
    ``live``: every confirmed track alive after this frame (matched or not), oldest first.
    ``improved``: live tracks, tentative ones too, whose best score was set on this frame.
    """

    high_ids: np.ndarray
    entered: list[Track]
    ended: list[Track]
    live: list[Track]
    improved: list[Track]


_NO_BOXES = np.zeros((0, 6), np.float32)


class Tracker:
    """ByteTrack-style tracker (module docstring). One instance per camera; not thread-safe."""

    def __init__(self, settings: TrackerSettings | None = None) -> None:
        self.settings = s = settings or TrackerSettings()
        self.tracks: list[Track] = []  # track i owns row i of S
        self.S = np.zeros((s.max_tracks, NCOLS), np.float64)
        self.next_id = 1
        self.refused = 0  # boxes that started no track because the table was full
        self._window = (1 << s.confirm_frames) - 1
        self._all = np.ones(s.max_tracks, np.bool_)

    def warmup(self) -> None:
        """Compile the numba kernels (or load them from the cache) on a throwaway tracker."""
        probe = Tracker(self.settings)
        boxes = np.array([[0, 0, 10, 10, 0.9, 0]], np.float32)
        for i in range(2):
            probe.update(boxes, boxes, i * 0.1)

    def update(self, high: np.ndarray | None, low: np.ndarray | None, t: float) -> TrackFrame:
        s = self.settings
        high = _NO_BOXES if high is None or len(high) == 0 else np.ascontiguousarray(high, np.float32)
        S = self.S
        tracks = self.tracks
        k = len(tracks)
        if k:
            S[:k, MATCHED] = 0.0
            S[:k, IMPROVED] = 0.0
        taken = np.full(len(high), -1, np.int64)
        # 1. high boxes against every track
        if k and len(high):
            _associate(S, k, self._all, high, taken, float(t), s.max_predict_s, s.match_iou)
        # 2. low boxes keep the confirmed tracks left over alive
        if k and low is not None and len(low):
            eligible = np.array([tr.id > 0 for tr in tracks]) & (S[:k, MATCHED] == 0.0)
            if eligible.any():
                low = np.ascontiguousarray(low, np.float32)
                _associate(S, k, eligible, low, np.full(len(low), -1, np.int64), float(t), s.max_predict_s,
                           s.low_match_iou)
        # 3. new tentative tracks from the high boxes nobody took
        taken_rows = taken.tolist()
        born_at = [j for j, r in enumerate(taken_rows) if r < 0]
        for j in born_at:
            if len(tracks) >= s.max_tracks:
                self.refused += 1
                taken_rows[j] = -2
                continue
            row = len(tracks)
            x1, y1, x2, y2, score, cls = high[j].tolist()
            S[row] = (0.5 * (x1 + x2), 0.5 * (y1 + y2), x2 - x1, y2 - y1, 0, 0, 0, 0, t, cls, 1, t,
                      score, x1, y1, x2, y2, t, x1, y1, x2, y2, score, 1, 1)
            tracks.append(Track(S, row))
            taken_rows[j] = row
        # 4. lifecycle
        entered: list[Track] = []
        ended: list[Track] = []
        keep: list[Track] = []
        window = self._window
        need = s.confirm_hits
        n = len(tracks)
        matched = S[:n, MATCHED].tolist()
        last_t = S[:n, T_LAST].tolist()
        better = S[:n, IMPROVED].tolist()
        improved: list[Track] = []
        for i, tr in enumerate(tracks):
            if i < k:  # born tracks already hold their first hit
                tr.bits = ((tr.bits << 1) | (matched[i] > 0)) & window
            if tr.id:
                if not matched[i] and t - last_t[i] >= s.lost_after_s:
                    ended.append(tr)
                    continue
            elif tr.bits.bit_count() >= need:
                tr.id = self.next_id
                self.next_id += 1
                tr.confirmed_t = t
                entered.append(tr)
            elif not tr.bits:
                continue  # not seen in the last M frames: forgotten
            keep.append(tr)
            if better[i]:
                improved.append(tr)
        ids = [tr.id for tr in tracks]
        high_ids = np.array([ids[r] if r >= 0 else 0 for r in taken_rows], np.int64)
        if len(keep) != n:
            self._compact(keep, ended)
        return TrackFrame(high_ids, entered, ended, [tr for tr in keep if tr.id], improved)

    def _compact(self, keep: list[Track], ended: list[Track]) -> None:
        for tr in ended:
            tr._keep()
        rows = [tr.row for tr in keep]
        if rows != list(range(len(rows))):
            self.S[:len(rows)] = self.S[rows]
            for i, tr in enumerate(keep):
                tr.row = i
        self.tracks = keep

    def tick(self, t: float) -> list[Track]:
        """No frame came: end the confirmed tracks unmatched for ``lost_after_s`` by ``t``; returns them."""
        lost = self.settings.lost_after_s
        ended = [tr for tr in self.tracks if tr.id and t - tr.last_t >= lost]
        if ended:
            self._compact([tr for tr in self.tracks if tr not in ended], ended)
        return ended

    def close(self) -> list[Track]:
        """End every track (the app is stopping): returns the confirmed ones, oldest first."""
        ended = [tr for tr in self.tracks if tr.id]
        for tr in ended:
            tr._keep()
        self.tracks = []
        return ended

    @property
    def live(self) -> list[Track]:
        return [tr for tr in self.tracks if tr.id]
