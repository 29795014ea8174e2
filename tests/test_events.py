"""Events from tracks: enter/update/cross/leave lines, zones, the counting line, snapshots and their retention."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
from datetime import datetime
from pathlib import Path

import cv2
import numpy as np
import pytest

from app.events import EVENT_KINDS, Events, NullEvents
from app.snapshots import NAME_RE, NullSnapshots, SnapshotStore
from app.sources import Frame
from app.tracker import Tracker, TrackerSettings

FPS = 10.0
W, H = 320, 240
ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
COMMON = {"event", "mono_ms", "track", "label", "first_seen", "last_seen", "score", "box"}


def box(cx, cy, w=40.0, h=100.0, score=0.9, cls=0):
    return [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2, score, cls]


def arr(rows):
    return np.asarray(rows, np.float32).reshape(-1, 6)


def make(settings=None, **kw):
    out = []
    ev = Events(Tracker(settings or TrackerSettings(confirm_hits=3, confirm_frames=5, lost_after_s=1.0)), out.append, ["person", "dog"],
                wall_clock=lambda: 1_800_000_000.0, mono_clock=lambda: 0.0, **kw)
    return ev, out


def play(ev, frames, start=0, low=None):
    """Frames (lists of box rows) at FPS; each frame's pixels are filled with its index (mod 256)."""
    low = low or {}
    ids = []
    for i, rows in enumerate(frames, start=start):
        px = np.full((H, W), i % 256, np.uint8)
        ids.append(ev.frame(Frame(px, i, i / FPS), arr(rows), arr(low.get(i, []))))
    return ids


def seconds(iso):
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def test_a_walk_makes_enter_then_leave_with_its_duration():
    ev, out = make()
    play(ev, [[box(40 + 5 * i, 120)] for i in range(30)] + [[]] * 15)
    assert [e["event"] for e in out] == ["enter", "leave"]
    enter, leave = out
    assert set(enter) == COMMON and set(leave) == COMMON | {"duration_s", "reason"}
    assert enter["track"] == leave["track"] == 1 and enter["label"] == "person"
    assert enter["mono_ms"] == pytest.approx(200.0)  # confirmed on the third frame
    assert leave["mono_ms"] == pytest.approx(3900.0)  # 1 s after the last sighting, on a frame
    assert leave["duration_s"] == pytest.approx(2.9) and leave["reason"] == "lost"
    assert ISO.match(leave["first_seen"]) and ISO.match(leave["last_seen"])
    assert seconds(leave["last_seen"]) - seconds(leave["first_seen"]) == pytest.approx(2.9, abs=2e-3)
    assert seconds(leave["first_seen"]) == pytest.approx(1_800_000_000.0, abs=2e-3)
    assert leave["score"] == pytest.approx(0.9) and len(leave["box"]) == 4
    assert ev.counts == {"enter": 1, "leave": 1}


def test_single_frame_false_boxes_make_events_only_without_confirmation():
    blips = [[box(60 + 97 * (i % 3), 120)] if i % 4 == 0 else [] for i in range(40)]
    ev, out = make()
    play(ev, blips)
    assert out == []
    ev, out = make(TrackerSettings(confirm_hits=1, confirm_frames=1, lost_after_s=0.5))
    play(ev, blips + [[]] * 10)
    assert [e["event"] for e in out].count("enter") == 10 == [e["event"] for e in out].count("leave")


def test_updates_come_at_most_every_period():
    ev, out = make(update_every_s=1.0)
    play(ev, [[box(100, 120)]] * 36)
    kinds = [e["event"] for e in out]
    assert kinds == ["enter", "update", "update", "update"]
    assert [e["mono_ms"] for e in out[1:]] == pytest.approx([1200.0, 2200.0, 3200.0])


def test_close_ends_live_tracks_and_tick_ends_lost_ones():
    ev, out = make()
    play(ev, [[box(100, 120), box(250, 120)]] * 5)
    ev.tick(0.4 + 0.5)
    assert [e["event"] for e in out] == ["enter", "enter"]
    ev.tick(0.4 + 1.01)
    assert [(e["event"], e["track"], e["reason"]) for e in out[2:]] == [("leave", 1, "lost"), ("leave", 2, "lost")]
    play(ev, [[box(100, 120)]] * 5, start=20)
    ev.close(2.5)
    assert (out[-1]["event"], out[-1]["track"], out[-1]["reason"]) == ("leave", 3, "stop")


ZONES = {"door": ((0.0, 0.5), (0.3, 0.5), (0.3, 1.0), (0.0, 1.0)), "all": ((0, 0), (1, 0), (1, 1), (0, 1))}


def test_events_name_the_zones_of_the_feet():
    ev, out = make(zones=ZONES)
    # feet at y = 150 of 240 (0.62; the box's middle is at 0.42), x = 40 (0.125): in both zones; then walks
    # right, out of the door zone
    play(ev, [[box(40 + 10 * i, 100)] for i in range(20)] + [[]] * 12)
    assert out[0]["zones"] == ["door", "all"] and out[-1]["zones"] == ["all"]


def test_feet_cut_off_by_the_frame_edge_are_in_a_zone_drawn_to_that_edge():
    """A person close to the camera has no feet in view: the box ends on the frame's bottom (or right) edge."""
    ev, out = make(zones=ZONES)
    play(ev, [[[10.0, 120.0, 60.0, float(H), 0.9, 0]]] * 8 + [[]] * 12)  # y2 = 240, the bottom row's edge
    assert out[0]["zones"] == ["door", "all"] and out[-1]["zones"] == ["door", "all"]
    ev, out = make(zones=ZONES)
    play(ev, [[[250.0, 20.0, float(W) + 80, 200.0, 0.9, 0]]] * 8 + [[]] * 12)  # clipped wider than the frame
    assert out[0]["zones"] == ["all"]


def test_only_in_zones_holds_events_until_the_track_is_inside():
    ev, out = make(zones=ZONES, only_in_zones=["door"])
    # walks from the right (outside the door zone) into it, then stays
    play(ev, [[box(300 - 15 * i, 120)] for i in range(18)] + [[box(45, 120)]] * 5 + [[]] * 12)
    assert [e["event"] for e in out] == ["enter", "leave"]
    assert out[0]["zones"] == ["door", "all"] and out[0]["mono_ms"] > 1000.0
    ev, out = make(zones=ZONES, only_in_zones=["door"])
    play(ev, [[box(250, 120)]] * 20 + [[]] * 12)  # never in the door zone: no events at all
    assert out == []


LINE = ((0.5, 0.0), (0.5, 1.0))  # top to bottom: "in" is right to left


def test_the_counting_line_reports_crossings_and_their_direction():
    ev, out = make(line=LINE)
    walk = [[box(260 - 10 * i, 120)] for i in range(20)] + [[box(70 + 10 * i, 120)] for i in range(20)]
    play(ev, walk + [[]] * 12)
    crosses = [e for e in out if e["event"] == "cross"]
    assert [(e["direction"], e["in"], e["out"]) for e in crosses] == [("in", 1, 0), ("out", 1, 1)]
    assert set(crosses[0]) == COMMON | {"direction", "in", "out"}
    assert [e["event"] for e in out] == ["enter", "cross", "cross", "leave"]


def test_jitter_on_the_line_and_passing_beyond_its_end_count_nothing():
    ev, out = make(line=LINE)
    play(ev, [[box(160 + (1.5 if i % 2 else -1.5), 120)] for i in range(30)])  # feet wobble on the line
    assert [e["event"] for e in out] == ["enter"]
    ev, out = make(line=((0.5, 0.0), (0.5, 0.3)))  # a short line at the top; the feet pass below its end
    play(ev, [[box(260 - 10 * i, 120)] for i in range(20)])
    assert [e["event"] for e in out] == ["enter"]


def test_snapshots_of_the_best_frame_on_enter_and_leave(tmp_path):
    store = SnapshotStore(str(tmp_path / "snaps"), max_files=10)
    ev, out = make(snapshots=store)
    scores = [0.5, 0.6, 0.95, 0.7, 0.6, 0.99, 0.8, 0.7]
    play(ev, [[box(100, 120, score=s)] for s in scores] + [[]] * 12)
    enter, leave = out
    assert enter["snapshot"].endswith("-track1-enter.jpg") and leave["snapshot"].endswith("-track1-leave.jpg")
    for event, best_frame in ((enter, 2), (leave, 5)):
        name = os.path.basename(event["snapshot"])
        assert NAME_RE.match(name) and os.path.exists(event["snapshot"])
        img = cv2.imread(event["snapshot"], cv2.IMREAD_UNCHANGED)
        assert img.shape[:2] == (H, W)
        assert abs(int(np.median(img)) - best_frame) <= 2  # the best frame's pixels, not the latest
        x1, y1, x2, y2 = (int(v) for v in event["box"])
        assert np.abs(img[y1:y2, x1].astype(int) - best_frame).max() > 50  # its box is drawn
    assert store.written == 2 and store.failures == 0


def test_snapshot_retention_keeps_the_newest_by_count_and_by_size(tmp_path):
    d = tmp_path / "snaps"
    d.mkdir()
    (d / "notes.txt").write_text("not ours")
    (d / "20260101T000000.000Z-track1-enter.jpg").write_bytes(b"x" * 1000)  # from an earlier run
    store = SnapshotStore(str(d), max_files=3, max_bytes=10**9)
    img = np.random.default_rng(0).integers(0, 255, (60, 80, 3), np.uint8)
    names = [f"20270101T00000{i}.000Z-track{i}-enter.jpg" for i in range(5)]
    for n in names:
        assert store.save(n, img) is not None
    assert sorted(p.name for p in d.iterdir()) == sorted(names[2:] + ["notes.txt"])
    assert store.deleted == 3 and store.files == 3
    size = os.path.getsize(d / names[4])
    small = SnapshotStore(str(d), max_files=100, max_bytes=2 * size + size // 2)  # by size: two fit
    assert small.files == 2 and sorted(p.name for p in d.iterdir()) == sorted(names[3:] + ["notes.txt"])
    with pytest.raises(ValueError):
        store.save("../escape.jpg", img)


def test_a_full_disk_costs_the_snapshots_not_the_events(tmp_path, caplog):
    store = SnapshotStore(str(tmp_path / "snaps"))
    real = store._write
    full = {"on": True}

    def disk(path, data):
        if full["on"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)

    store._write = disk
    ev, out = make(snapshots=store)
    with caplog.at_level(logging.WARNING, logger="xnorcam.snapshots"):
        play(ev, [[box(60, 120)]] * 5 + [[]] * 12 + [[box(200, 120)]] * 5 + [[]] * 12)
        full["on"] = False
        play(ev, [[box(100, 120)]] * 5, start=50)
    assert [e["event"] for e in out] == ["enter", "leave", "enter", "leave", "enter"]
    assert [e["snapshot"] for e in out[:4]] == [None] * 4 and out[4]["snapshot"].endswith("-track3-enter.jpg")
    assert store.failures == 4 and "ENOSPC" in store.last_error
    warnings = [r.getMessage() for r in caplog.records]
    assert sum("write failed" in m for m in warnings) == 1 and sum("writing again" in m for m in warnings) == 1
    assert [p.name for p in (tmp_path / "snaps").iterdir()] == [os.path.basename(out[4]["snapshot"])]  # no .tmp


def test_best_frames_are_let_go_with_their_tracks(tmp_path):
    ev, _ = make(snapshots=SnapshotStore(str(tmp_path / "s")))
    play(ev, [[box(20 + 60 * (i % 5), 120)] if i % 3 == 0 else [] for i in range(60)])  # blips only
    play(ev, [[]] * 10, start=60)
    assert ev._best == {} and ev.tracker.tracks == []


def test_the_null_roles_do_nothing():
    n = NullEvents()
    assert n.frame(Frame(np.zeros((4, 4), np.uint8), 0, 0.0), arr([box(1, 1)]), None) is None
    n.tick(1.0)
    n.close(2.0)
    assert n.counts == {} and n.marks_base is None and NullSnapshots().save("x", np.zeros((2, 2), np.uint8)) is None
    assert set(EVENT_KINDS) == {"enter", "update", "cross", "leave"}


# --- the documented schema -------------------------------------------------------------------------

EXAMPLES = Path(__file__).resolve().parent / "fixtures" / "events"
README = Path(__file__).resolve().parents[1] / "README.md"


def check_event_line(e: dict, zones: bool, snapshots: bool) -> None:
    """The schema (version 1) of a track event line, as README.md documents it."""
    extra = {"enter": set(), "update": set(), "cross": {"direction", "in", "out"}, "leave": {"duration_s", "reason"}}
    keys = {"v", "time"} | COMMON | extra[e["event"]]
    keys |= {"zones"} if zones else set()
    keys |= {"snapshot"} if snapshots and e["event"] in ("enter", "leave") else set()
    assert set(e) == keys, set(e) ^ keys
    assert e["v"] == 1 and ISO.match(e["time"]) and ISO.match(e["first_seen"]) and ISO.match(e["last_seen"])
    assert seconds(e["first_seen"]) <= seconds(e["last_seen"])
    assert isinstance(e["mono_ms"], float) and isinstance(e["track"], int) and e["track"] >= 1
    assert isinstance(e["label"], str) and 0 < e["score"] <= 1
    x1, y1, x2, y2 = e["box"]
    assert x1 <= x2 and y1 <= y2
    if zones:
        assert isinstance(e["zones"], list) and all(isinstance(z, str) for z in e["zones"])
    if e["event"] == "cross":
        assert e["direction"] in ("in", "out") and e[e["direction"]] >= 1
    if e["event"] == "leave":
        assert e["reason"] in ("lost", "stop") and e["duration_s"] >= 0
        assert e["duration_s"] == pytest.approx(seconds(e["last_seen"]) - seconds(e["first_seen"]), abs=2e-3)
    if "snapshot" in e:
        assert e["snapshot"] is None or NAME_RE.match(os.path.basename(e["snapshot"]))


def test_events_written_by_the_app_follow_the_schema(tmp_path):

    from app.sinks import JsonlLog

    log = JsonlLog(str(tmp_path / "log.jsonl"))
    ev = Events(Tracker(TrackerSettings(confirm_hits=3, confirm_frames=5, lost_after_s=1.0)), log.event, ["person"],
                zones=ZONES, line=LINE, update_every_s=1.0, snapshots=SnapshotStore(str(tmp_path / "s")))
    walk = [[box(260 - 10 * i, 120)] for i in range(20)] + [[box(70 + 10 * i, 120)] for i in range(20)]
    play(ev, walk + [[]] * 12)
    log.close()
    lines = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert {e["event"] for e in lines} == set(EVENT_KINDS)
    for e in lines:
        check_event_line(e, zones=True, snapshots=True)


def test_the_readme_example_is_real_and_follows_the_schema():

    lines = (EXAMPLES / "example.jsonl").read_text().splitlines()
    events = [json.loads(x) for x in lines]
    assert [e["event"] for e in events] == ["enter", "update", "cross", "leave"]
    for e in events:
        check_event_line(e, zones=True, snapshots=True)
    readme = README.read_text()
    for line in lines:
        assert line in readme, f"README.md does not show the example line {line[:60]}..."
    assert "tests/fixtures/events/snapshot-example.jpg" in readme
    shot = cv2.imread(str(EXAMPLES / "snapshot-example.jpg"))
    assert shot.shape == (240, 320, 3) and os.path.basename(events[-1]["snapshot"]) == "20261204T171116.813Z-track2-leave.jpg"
