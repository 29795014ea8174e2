"""The tracker on scripted box sequences: a walk, a blink, a two-frame gap, crossing paths, occlusion, N of M."""

from __future__ import annotations

import numpy as np
import pytest

from app.tracker import Tracker, TrackerSettings

FPS = 10.0


def box(cx, cy, w=40.0, h=100.0, score=0.9, cls=0):
    return [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2, score, cls]


def arr(rows):
    return np.asarray(rows, np.float32).reshape(-1, 6)


def play(tracker, frames, fps=FPS, low=None):
    """Feed ``frames`` (lists of box rows) at ``fps``; returns the TrackFrames."""
    low = low or {}
    return [tracker.update(arr(rows), arr(low.get(i, [])), i / fps) for i, rows in enumerate(frames)]


def test_a_walk_is_confirmed_on_its_third_frame_and_ends_after_the_lost_time():
    tr = Tracker(TrackerSettings(confirm_hits=3, confirm_frames=5, lost_after_s=1.0))
    walk = [[box(50 + 8 * i, 120)] for i in range(30)]
    out = play(tr, walk + [[]] * 15)
    entered = [(i, t.id) for i, f in enumerate(out) for t in f.entered]
    ended = [(i, t.id) for i, f in enumerate(out) for t in f.ended]
    assert entered == [(2, 1)]
    # last seen at frame 29 (2.9 s); ended on the first frame at least 1 s later (frame 39)
    assert ended == [(39, 1)]
    track = out[39].ended[0]
    assert track.first_t == pytest.approx(0.0) and track.last_t == pytest.approx(2.9)
    assert [f.high_ids.tolist() for f in out[:4]] == [[0], [0], [1], [1]]
    assert all(f.live == [] for f in out[39:]) and tr.tracks == []


def test_a_box_that_blinks_for_one_frame_makes_no_track():
    tr = Tracker(TrackerSettings(confirm_hits=2, confirm_frames=3))
    out = play(tr, [[], [box(100, 100)], [], []])
    assert not any(f.entered or f.ended or f.live for f in out)
    assert len(tr.tracks) == 1 and tr.tracks[0].id == 0  # still tentative while its box is in the window
    tr.update(arr([]), None, 0.4)
    assert tr.tracks == []  # forgotten after M frames without it


def test_without_confirmation_the_blink_is_an_event():
    """N = M = 1: every box is a track at once (what confirmation removes)."""
    tr = Tracker(TrackerSettings(confirm_hits=1, confirm_frames=1, lost_after_s=0.3))
    out = play(tr, [[], [box(100, 100)], [], [], [], []])
    assert [t.id for f in out for t in f.entered] == [1]
    assert [t.id for f in out for t in f.ended] == [1]
    assert out[1].high_ids.tolist() == [1]


def test_an_id_survives_a_two_frame_gap():
    tr = Tracker(TrackerSettings(lost_after_s=1.0))
    frames = [[box(40 + 10 * i, 120)] for i in range(20)]
    frames[10] = frames[11] = []  # the detector misses the person twice while they keep walking
    out = play(tr, frames)
    assert [t.id for f in out for t in f.entered] == [1]
    assert not any(f.ended for f in out)
    assert out[12].high_ids.tolist() == [1] and out[19].high_ids.tolist() == [1]
    assert len(tr.tracks) == 1


def test_crossing_paths_keep_their_ids():
    """Two people walk towards each other and cross; each id follows its walker."""
    tr = Tracker(TrackerSettings(confirm_hits=3, confirm_frames=5))
    frames = []
    for i in range(40):
        a = box(40 + 6 * i, 120, score=0.9)  # walks right
        b = box(280 - 6 * i, 126, score=0.8)  # walks left, a little lower
        frames.append([a, b])
    out = play(tr, frames)
    ids_right = []
    for i, f in enumerate(out[3:], start=3):
        ids = f.high_ids.tolist()
        assert len(set(ids)) == 2 and 0 not in ids, (i, ids)
        ids_right.append(ids[0])  # row 0 is always the right-walker
    assert len(set(ids_right)) == 1
    assert [t.id for f in out for t in f.entered] == [1, 2]
    assert len(tr.tracks) == 2


def test_occlusion_at_the_crossing_keeps_both_ids():
    """The farther walker is hidden behind the nearer one for three frames at the crossing."""
    tr = Tracker(TrackerSettings(confirm_hits=3, confirm_frames=5))
    frames = []
    for i in range(40):
        front = box(40 + 6 * i, 130, w=50, h=120, score=0.9)
        back = box(280 - 6 * i, 120, w=36, h=90, score=0.7)
        frames.append([front] if 18 <= i <= 20 else [front, back])
    out = play(tr, frames)
    before = out[15].high_ids.tolist()
    after = out[25].high_ids.tolist()
    assert before == after and sorted(before) == [1, 2]
    assert [t.id for f in out for t in f.entered] == [1, 2]
    assert not any(f.ended for f in out)


def test_low_boxes_keep_a_confirmed_track_alive_but_start_none():
    s = TrackerSettings(lost_after_s=0.3)
    frames = [[box(100, 100)]] * 5 + [[]] * 10
    low = {i: [box(100, 100, score=0.1)] for i in range(5, 15)}
    out = play(Tracker(s), frames, low=low)
    assert [t.id for f in out for t in f.entered] == [1] and not any(f.ended for f in out)
    out = play(Tracker(s), frames)  # the same without the low boxes: the track ends
    assert [t.id for f in out for t in f.ended] == [1]
    out = play(Tracker(s), [[]] * 10, low={i: [box(100, 100, score=0.1)] for i in range(10)})
    assert not any(f.entered for f in out)


def test_confirmation_needs_n_of_the_last_m_frames():
    s = TrackerSettings(confirm_hits=3, confirm_frames=5)
    p = box(100, 100)
    out = play(Tracker(s), [[p], [], [p], [], [p], [p]])
    assert [i for i, f in enumerate(out) if f.entered] == [4]
    out = play(Tracker(s), [[p], [], [], [p], [], [], [p], [], []])
    assert not any(f.entered for f in out)
    # the window slides: hits at 0, 4, 5 are 3 in all but 2 in the last 5 at frame 5; 4, 5, 6 make it
    out = play(Tracker(s), [[p], [], [], [], [p], [p], [p]])
    assert [i for i, f in enumerate(out) if f.entered] == [6]


def test_classes_never_share_a_track():
    tr = Tracker(TrackerSettings(confirm_hits=1, confirm_frames=1))
    out = play(tr, [[box(100, 100, cls=0), box(101, 100, cls=1)]] * 3)
    assert sorted(t.cls for t in out[0].entered) == [0, 1]
    assert sorted(out[2].high_ids.tolist()) == [1, 2]
    # a box of another class where a track was starts its own track
    tr = Tracker(TrackerSettings(confirm_hits=1, confirm_frames=1, lost_after_s=0.0))
    out = play(tr, [[box(100, 100, cls=0)], [box(100, 100, cls=1)]])
    assert [(t.id, t.cls) for t in out[1].entered] == [(2, 1)] and [t.id for t in out[1].ended] == [1]


def test_the_table_is_bounded():
    tr = Tracker(TrackerSettings(max_tracks=8))
    crowd = [box(20 + 30 * (k % 10), 60 + 120 * (k // 10), w=20, h=50) for k in range(20)]
    play(tr, [crowd] * 4)
    assert len(tr.tracks) == 8 and tr.refused == 4 * 12


def test_best_score_and_box_are_kept():
    tr = Tracker(TrackerSettings(confirm_hits=1, confirm_frames=1, lost_after_s=0.0))
    out = play(tr, [[box(100, 100, score=s)] for s in (0.5, 0.9, 0.6)] + [[]])
    t = out[-1].ended[0]
    assert t.best_score == pytest.approx(0.9) and t.best_t == pytest.approx(0.1)
    assert t.best_box == pytest.approx(tuple(box(100, 100)[:4]))


def test_tick_ends_lost_tracks_and_close_ends_all():
    tr = Tracker(TrackerSettings(confirm_hits=1, confirm_frames=1, lost_after_s=2.0))
    play(tr, [[box(100, 100), box(200, 100)]])
    assert tr.tick(1.0) == []
    assert [t.id for t in tr.tick(2.5)] == [1, 2] and tr.tracks == []
    play(tr, [[box(100, 100)]])
    assert [t.id for t in tr.close()] == [3] and tr.tracks == []


@pytest.mark.parametrize("kw", [dict(confirm_hits=4, confirm_frames=3), dict(confirm_hits=0),
                                dict(lost_after_s=-1.0), dict(confirm_frames=40), dict(max_tracks=0)])
def test_settings_refuse_impossible_values(kw):
    with pytest.raises(ValueError):
        TrackerSettings(**kw)


def test_best_pairs_first_each_track_and_box_once():
    """Two tracks want the box between them: the closer one gets it; the other takes what is left."""
    tr = Tracker(TrackerSettings(confirm_hits=1, confirm_frames=1))
    tr.update(arr([box(100, 100), box(130, 100)]), None, 0.0)
    tr.update(arr([box(100, 100), box(130, 100)]), None, 0.1)  # both standing still
    out = tr.update(arr([box(126, 100), box(104, 100)]), None, 0.2)
    assert out.high_ids.tolist() == [2, 1]
    out = tr.update(arr([box(118, 100)]), None, 0.3)  # one box between two tracks: the closer (2) only
    assert out.high_ids.tolist() == [2] and [t.matched for t in tr.tracks] == [False, True]
    # two boxes on one track: it takes the better, the other starts a track of its own
    tr = Tracker(TrackerSettings(confirm_hits=1, confirm_frames=1))
    tr.update(arr([box(100, 100)]), None, 0.0)
    out = tr.update(arr([box(100, 100), box(112, 100, score=0.8)]), None, 0.1)
    assert out.high_ids.tolist() == [1, 2] and [t.hits for t in tr.tracks] == [2, 1]
