"""Track events on a clip of real frames (tests/clip.py, tests/fixtures/clip/) against its labels.

Four people come into view and leave. Through the real Detector (the shipped
model), the detection filter and the tracker with the default settings, the
events must match the labels: four enters and four leaves, in the labelled
order, each track's duration within one second of the labelled one. In-process
the frame times are the clip's own (10 fps); the CLI run plays the clip in real
time through ``python -m app`` with zones, a counting line and snapshots.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import cv2
import pytest

from app.config import TrackerConfig
from app.detector import DEFAULT_MODEL, Detector
from app.events import Events
from app.pipeline import filter_for
from app.sources import Frame
from app.tracker import Tracker, TrackerSettings
from tests import clip

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not DEFAULT_MODEL.exists(), reason="needs the shipped model models/person.xnc")


def default_tracker() -> Tracker:
    c = TrackerConfig()
    return Tracker(TrackerSettings(confirm_hits=c.confirm_hits, confirm_frames=c.confirm_frames,
                                   lost_after_s=c.lost_after_s, match_iou=c.match_iou, max_tracks=c.max_tracks))


def seconds(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def check_against_labels(events: list[dict], people: list[clip.Person], start_wall: float) -> None:
    kinds = [e["event"] for e in events if e["event"] in ("enter", "leave")]
    assert kinds.count("enter") == kinds.count("leave") == len(people), [(e["event"], e["track"]) for e in events]
    leaves = sorted((e for e in events if e["event"] == "leave"), key=lambda e: seconds(e["first_seen"]))
    enters = [e for e in events if e["event"] == "enter"]
    assert [e["track"] for e in enters] == [e["track"] for e in leaves]  # the same people, in the labelled order
    for leave, person in zip(leaves, people, strict=True):
        assert leave["reason"] == "lost"
        assert abs(leave["duration_s"] - person.duration_s) <= 1.0, (leave, person)
        assert abs(seconds(leave["first_seen"]) - start_wall - person.enter_s) <= 1.0, (leave, person)


def test_the_labels_say_four_people():
    people = clip.labelled_people()
    assert len(people) == 4 and [p.still[:2] for p in people] == ["02", "02", "04", "06"]
    assert len({round(p.duration_s, 1) for p in people}) == 2  # the slow stretch: two durations


def test_clip_events_match_the_labels():
    det = Detector()
    keep = filter_for(det, (), {}, TrackerConfig().low_score)
    out: list[dict] = []
    ev = Events(default_tracker(), out.append, det.class_names, wall_clock=lambda: 1000.0, mono_clock=lambda: 0.0)
    n = 0
    for i, px in clip.frames():
        high, low = keep.split(det.detect(px))
        ev.frame(Frame(px, i, i / clip.FPS), high, low)
        n = i + 1
    ev.close(n / clip.FPS)
    check_against_labels(out, clip.labelled_people(), 1000.0)
    times = [e["mono_ms"] for e in out]
    assert times == sorted(times)  # written as they happen
    # each leave comes lost_after_s after its person was last seen
    for e in out:
        if e["event"] == "leave":
            lost = e["mono_ms"] / 1000 - (seconds(e["last_seen"]) - 1000.0)
            assert TrackerConfig().lost_after_s - 1e-6 <= lost <= TrackerConfig().lost_after_s + 1.5 / clip.FPS


def test_without_confirmation_the_clip_has_false_events():
    """What confirmation removes: with the boxes of a low threshold (0.15, which lets the detector's passing
    guesses through), every box a track at once makes more enters than people; confirmed, only the people."""
    det = Detector(score_threshold=0.15)
    keep = filter_for(det, (), {}, TrackerConfig().low_score)
    enters = []
    for tracker in (Tracker(TrackerSettings(confirm_hits=1, confirm_frames=1)), default_tracker()):
        out: list[dict] = []
        ev = Events(tracker, out.append, det.class_names)
        for i, px in clip.frames():
            ev.frame(Frame(px, i, i / clip.FPS), *keep.split(det.detect(px)))
        enters.append(sum(e["event"] == "enter" for e in out))
    people = len(clip.labelled_people())
    assert enters[0] > people + 3 and enters[1] <= people + 1, enters


@pytest.mark.slow
def test_the_cli_plays_the_clip_into_events_zones_crossings_and_snapshots(tmp_path):
    frames = tmp_path / "frames"
    frames.mkdir()
    for i, px in clip.frames():
        cv2.imwrite(str(frames / f"{i:04d}.png"), px)  # lossless: the detector sees the clip's pixels
    log, snaps = tmp_path / "events.jsonl", tmp_path / "snapshots"
    env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
    r = subprocess.run(
        [sys.executable, "-m", "app", "--source", f"images:{frames}", "--fps", f"{clip.FPS:g}", "--preview", "none",
         "--log", log, "--only-events", "--snapshots", snaps, "--zone", "left=0,0 0.5,0 0.5,1 0,1",
         "--line", "0.5,0 0.5,1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    events = [json.loads(x) for x in log.read_text().splitlines()]
    assert all("event" in e and e["v"] == 1 for e in events)  # --only-events: no frame lines
    track_events = [e for e in events if e["event"] in ("enter", "leave")]
    people = clip.labelled_people()
    start = seconds(track_events[0]["first_seen"]) - people[0].enter_s
    check_against_labels(track_events, people, start)
    # the window pans right, so everyone walks right to left across the middle: one "in" each
    crosses = [e for e in events if e["event"] == "cross"]
    assert [(e["direction"], e["in"]) for e in crosses] == [("in", k) for k in range(1, len(people) + 1)]
    # people enter at the right edge and leave at the left: zone "left" at leave, not at enter
    assert all(e["zones"] == [] for e in events if e["event"] == "enter")
    assert all(e["zones"] == ["left"] for e in events if e["event"] == "leave")
    shots = [e["snapshot"] for e in track_events]
    assert all(s and Path(s).parent == snaps and Path(s).is_file() for s in shots)
    assert sorted(p.name for p in snaps.iterdir()) == sorted(Path(s).name for s in shots)
    img = cv2.imread(shots[-1])
    assert img.shape == (clip.HEIGHT, clip.WIDTH, 3)
