"""Soak of tracks and events: many frames of people appearing and vanishing; tables, memory and snapshots bounded.

    .venv/bin/python benchmarks/soak_events.py [--frames 20000] [--warmup-frames 2000] [--seed 0]
                                               [--snapshot-files 40] [--snapshot-mb 1.0] [--keep DIR]

A scripted scene played at 10 fps (frame times are the scene's own, so the
run takes as long as the machine needs, not 33 minutes for 20,000 frames):
people arrive at random (now and then a crowd of up to 25, more than the
track table holds), walk for 1 to 40 s and go; the detector misses each one
on 10 % of frames, sees them only weakly on 5 %, and raises single-frame
false boxes (one every other frame) and two-frame ones. Each frame goes the
app's way from the detections on: the detection filter's split, the tracker
and events (zones, a counting line, update events every 5 s, snapshots with
retention), the overlay drawn with the track ids, the frame line and the
event lines into a rotating JSON Lines log. Frames are fresh arrays, as a
camera hands them over, so kept best frames would show as memory.

Checks (exit 1 if one fails):
  - the track table never holds more than ``max_tracks``; the events' own
    tables (states, kept best frames) never more than the tracker's;
  - RSS growth after the warm-up <= --rss-limit-mb (5 MB);
  - the snapshot folder never holds more than --snapshot-files files or
    --snapshot-mb MiB, checked every 500 frames and at the end;
  - every log line parses; every enter has its leave (the run ends with close).

The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from app import overlay, sinks  # noqa: E402
from app.events import Events  # noqa: E402
from app.pipeline import DetectionFilter  # noqa: E402
from app.snapshots import SnapshotStore  # noqa: E402
from app.sources import Frame  # noqa: E402
from app.tracker import Tracker, TrackerSettings  # noqa: E402

FPS = 10.0
W, H = 320, 240
THRESHOLD = 0.25
PAGE = os.sysconf("SC_PAGE_SIZE")
ZONES = {"left": ((0.0, 0.0), (0.5, 0.0), (0.5, 1.0), (0.0, 1.0)), "door": ((0.7, 0.5), (1.0, 0.5), (1.0, 1.0), (0.7, 1.0))}
LINE = ((0.5, 0.0), (0.5, 1.0))


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * PAGE / 2**20


class Scene:
    """People walking in and out of a 320x240 view; ``boxes(i)`` is what a detector would return on frame i."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.people: list[list[float]] = []  # x, y, vx, vy, w, h, frames left
        self.stats = {"arrivals": 0, "crowds": 0, "blips": 0, "two_frame_boxes": 0}
        self._again: list[float] | None = None  # a false box that shows on the next frame too

    def _arrive(self) -> None:
        r = self.rng
        w, h = r.uniform(18, 50), r.uniform(45, 130)
        side = r.integers(2)
        x = -w / 2 if side == 0 else W + w / 2
        vx = r.uniform(8, 40) * (1 if side == 0 else -1)
        self.people.append([x, r.uniform(h / 2, H - h / 2), vx, r.uniform(-5, 5), w, h, r.uniform(1, 40) * FPS])
        self.stats["arrivals"] += 1

    def boxes(self, i: int) -> np.ndarray:
        r = self.rng
        if r.random() < 0.03:
            self._arrive()
        if r.random() < 0.0005:  # a crowd, more than the table holds
            self.stats["crowds"] += 1
            for _ in range(int(r.integers(15, 26))):
                self._arrive()
        rows = []
        alive = []
        for p in self.people:
            p[0] += p[2] / FPS
            p[1] += p[3] / FPS
            p[6] -= 1
            if p[6] <= 0 or not -60 < p[0] < W + 60:
                continue
            alive.append(p)
            u = r.random()
            if u < 0.10:
                continue  # missed on this frame
            score = 0.16 if u < 0.15 else r.uniform(0.3, 0.95)
            x, y, _, _, w, h, _ = p
            jitter = r.normal(0, 1.5, 4)
            x1, y1, x2, y2 = x - w / 2 + jitter[0], y - h / 2 + jitter[1], x + w / 2 + jitter[2], y + h / 2 + jitter[3]
            if x2 > 0 and x1 < W:
                rows.append([max(0.0, x1), max(0.0, y1), min(W, x2), min(H, y2), score, 0])
        self.people = alive
        if self._again is not None:
            rows.append(self._again)
            self._again = None
        if r.random() < 0.5:  # a single-frame false box, now and then a two-frame one
            x, y = r.uniform(0, W - 30), r.uniform(0, H - 60)
            rows.append([x, y, x + 30, y + 60, r.uniform(0.25, 0.6), 0])
            if r.random() < 0.1:
                self._again = [x + 2, y + 1, x + 32, y + 61, r.uniform(0.25, 0.6), 0]
                self.stats["two_frame_boxes"] += 1
            else:
                self.stats["blips"] += 1
        if not rows:
            return np.zeros((0, 6), np.float32)
        d = np.asarray(rows, np.float32)
        return d[np.argsort(-d[:, 4], kind="stable")]


def folder_size(path: Path) -> tuple[int, int]:
    files = [p for p in path.iterdir() if p.is_file()] if path.exists() else []
    return len(files), sum(p.stat().st_size for p in files)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=20000)
    ap.add_argument("--warmup-frames", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--snapshot-files", type=int, default=40)
    ap.add_argument("--snapshot-mb", type=float, default=1.0)
    ap.add_argument("--rss-limit-mb", type=float, default=5.0)
    ap.add_argument("--keep", metavar="DIR", help="keep the log and snapshots here")
    args = ap.parse_args(argv)
    work = Path(args.keep or tempfile.mkdtemp(prefix="xnorcam-soak-events-"))
    work.mkdir(parents=True, exist_ok=True)
    snap_dir = work / "snapshots"
    log = sinks.JsonlLog(str(work / "log.jsonl"), max_bytes=256 * 1024, files=3)
    settings = TrackerSettings()
    tracker = Tracker(settings)
    tracker.warmup()
    snapshots = SnapshotStore(str(snap_dir), args.snapshot_files, int(args.snapshot_mb * 2**20))
    events = Events(tracker, log.event, ["person"], zones=ZONES, line=LINE, update_every_s=5.0, snapshots=snapshots)
    keep = DetectionFilter(["person"], base_threshold=THRESHOLD, low_factor=0.5)
    scene = Scene(args.seed)
    rng = np.random.default_rng(args.seed + 1)
    background = rng.integers(0, 255, (H, W), np.uint8)
    failures: list[str] = []
    max_table = max_seen = max_best = 0
    max_files = max_bytes = 0
    rss_start = 0.0
    for i in range(args.frames):
        pixels = np.roll(background, i % W, axis=1)  # a fresh array per frame
        frame = Frame(pixels, i, i / FPS)
        high, low = keep.split(scene.boxes(i))
        ids = events.frame(frame, high, low)
        overlay.render(pixels, high, ["person"], None, overlay.Marks(ids, events.marks_base.zones, LINE))
        log.write(sinks.frame_record(frame, high, ["person"], FPS, 0.0, 0))
        max_table = max(max_table, len(tracker.tracks))
        max_seen = max(max_seen, len(events._seen))
        max_best = max(max_best, len(events._best))
        if len(events._best) > len(tracker.tracks) or len(events._seen) > len(tracker.tracks):
            failures.append(f"frame {i}: events keep more than the tracker ({len(events._best)}, {len(events._seen)})")
        if i % 500 == 0 or i == args.frames - 1:
            n, size = folder_size(snap_dir)
            max_files, max_bytes = max(max_files, n), max(max_bytes, size)
        if i + 1 == args.warmup_frames:
            gc.collect()
            rss_start = rss_mb()
    events.close(args.frames / FPS)
    log.close()
    gc.collect()
    rss_end = rss_mb()
    n, size = folder_size(snap_dir)
    max_files, max_bytes = max(max_files, n), max(max_bytes, size)

    lines = []
    for f in sorted(work.glob("log.jsonl*")):
        for raw in f.read_text().splitlines():
            try:
                lines.append(json.loads(raw))
            except ValueError:
                failures.append(f"{f.name}: a line that is not JSON")
    counts = dict(events.counts)
    if max_table > settings.max_tracks:
        failures.append(f"track table reached {max_table} > {settings.max_tracks}")
    if max_files > args.snapshot_files or max_bytes > args.snapshot_mb * 2**20:
        failures.append(f"snapshots reached {max_files} files, {max_bytes} bytes")
    if rss_end - rss_start > args.rss_limit_mb:
        failures.append(f"RSS grew {rss_end - rss_start:.1f} MB after the warm-up")
    if counts.get("enter", 0) != counts.get("leave", 0):
        failures.append(f"{counts.get('enter', 0)} enters but {counts.get('leave', 0)} leaves")
    if tracker.tracks or events._seen or events._best:
        failures.append("tables not empty after close")
    result = {
        "frames": args.frames,
        "scene_minutes": round(args.frames / FPS / 60, 1),
        "scene": scene.stats,
        "events": counts,
        "tracks_confirmed": tracker.next_id - 1,
        "max_track_table": max_table,
        "max_tracks": settings.max_tracks,
        "refused_boxes": tracker.refused,
        "max_event_states": max_seen,
        "max_kept_frames": max_best,
        "rss_start_mb": round(rss_start, 1),
        "rss_end_mb": round(rss_end, 1),
        "rss_growth_mb": round(rss_end - rss_start, 2),
        "snapshots_written": snapshots.written,
        "snapshots_deleted": snapshots.deleted,
        "snapshot_files_max": max_files,
        "snapshot_mb_max": round(max_bytes / 2**20, 2),
        "snapshot_limits": [args.snapshot_files, args.snapshot_mb],
        "log_lines_on_disk": len(lines),
        "log_rotations": log.rotations,
        "failures": failures,
        "ok": not failures,
    }
    for f in failures:
        print(f"FAIL: {f}", file=sys.stderr)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
