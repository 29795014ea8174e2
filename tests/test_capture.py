"""The capture thread: latest-frame slot, drop accounting, outages (raise, hang, garbage) and backoff."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from app.capture import Capture, LatestFrameSlot, frame_problem
from app.sources import Frame
from tests.fakes.fake_source import FakeSource


def run_until(pred, timeout=5.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.01)
    return False


def frame(seq):
    return Frame(np.zeros((2, 2), np.uint8), seq, float(seq))


def test_slot_keeps_newest_and_counts_drops():
    slot = LatestFrameSlot()
    assert slot.take(timeout=0.01) is None
    assert slot.put(frame(0)) is False
    assert slot.put(frame(1)) is True  # replaced frame 0
    assert slot.put(frame(2)) is True
    got = slot.take()
    assert got.seq == 2
    slot.put(frame(3))
    slot.drain()  # frame 3 never taken: counted as dropped at shutdown
    assert (slot.captured, slot.taken, slot.dropped) == (4, 1, 3)
    assert slot.captured == slot.taken + slot.dropped


def test_slot_take_waits_for_a_frame():
    slot = LatestFrameSlot()
    threading.Timer(0.05, slot.put, args=(frame(7),)).start()
    got = slot.take(timeout=2.0)
    assert got is not None and got.seq == 7


@pytest.mark.parametrize(
    "pixels, problem",
    [
        (np.zeros((4, 4), np.uint8), None),
        (np.zeros((4, 4, 3), np.uint8), None),
        (np.zeros((4, 4), np.float32), "dtype"),
        (np.zeros((4, 4, 4), np.uint8), "shape"),
        (np.zeros((0, 4), np.uint8), "empty"),
        (np.zeros((4,), np.uint8), "shape"),
        ("frame", "not an array"),
        (None, "not an array"),
    ],
)
def test_frame_problem(pixels, problem):
    got = frame_problem(pixels)
    assert (got is None) if problem is None else (problem in got)


def test_slow_consumer_drops_frames_counts_them_and_does_not_grow_memory():
    live: set[int] = set()
    cap = Capture(lambda: FakeSource(period=0.002, live=live)).start()
    taken = []
    max_live = 0
    try:
        for _ in range(15):
            f = cap.take(timeout=1.0)
            assert f is not None
            taken.append(f.seq)
            del f
            time.sleep(0.03)  # a slow detector
            max_live = max(max_live, len(live))
    finally:
        cap.stop()
    st = cap.stats()
    assert st.dropped > 15  # the camera ran ~10x faster than the consumer
    assert st.captured == st.taken + st.dropped
    assert st.taken == 15
    assert taken == sorted(taken) and len(set(taken)) == len(taken)
    assert taken[-1] - taken[0] > 15  # we saw the newest frames, not a backlog
    # only the frame in the slot and the one being read are alive: no queue builds up
    assert max_live <= 3


def test_capture_does_not_wait_for_the_consumer():
    cap = Capture(lambda: FakeSource(period=0.005)).start()
    try:
        time.sleep(0.5)  # nobody takes anything
    finally:
        cap.stop()
    assert cap.stats().captured > 40


def test_source_that_raises_is_reopened_and_reported():
    made = []

    def factory():
        made.append(FakeSource(script={3: "raise"} if not made else {}))
        return made[-1]

    cap = Capture(factory, backoff_initial_s=0.01, backoff_max_s=0.05).start()
    try:
        assert run_until(lambda: len(made) >= 2 and made[-1].n > 5)
    finally:
        cap.stop()
    errors = [e for e in cap.events if e["event"] == "source_error"]
    assert errors and errors[0]["stage"] == "read" and "camera unplugged" in errors[0]["message"]
    assert any(e["event"] == "source_recovered" for e in cap.events)
    assert made[0].closed.is_set()
    assert cap.reopens >= 1


def test_hung_source_is_abandoned_and_reopened():
    made = []

    def factory():
        made.append(FakeSource(script={2: "hang"} if not made else {}))
        return made[-1]

    cap = Capture(factory, hang_timeout_s=0.2, backoff_initial_s=0.01).start()
    seqs = []
    try:
        assert run_until(lambda: len(made) >= 2 and made[-1].n > 3, timeout=5)
        for _ in range(3):
            f = cap.take(timeout=1.0)
            assert f is not None
            seqs.append(f.seq)
    finally:
        cap.stop()
    hangs = [e for e in cap.events if e["event"] == "source_error" and e["stage"] == "hang"]
    assert len(hangs) == 1 and "no frame for" in hangs[0]["message"]
    assert seqs == sorted(seqs)
    st = cap.stats()
    # the frame the hung read returned after close was stale: never captured
    assert st.captured == st.taken + st.dropped


def test_garbage_frames_never_reach_the_slot():
    cap = Capture(
        lambda: FakeSource(script={1: "garbage", 4: "garbage"}), backoff_initial_s=0.01
    ).start()
    got = []
    try:
        for _ in range(6):
            f = cap.take(timeout=1.0)
            assert f is not None
            got.append(f)
    finally:
        cap.stop()
    assert all(f.pixels.dtype == np.uint8 for f in got)
    assert cap.invalid >= 1
    assert any(e["event"] == "source_error" and e["stage"] == "garbage" and "dtype" in e["message"] for e in cap.events)


def test_open_failures_back_off_exponentially():
    attempts = []

    def factory():
        attempts.append(time.monotonic())
        if len(attempts) <= 4:
            raise RuntimeError("Camera __init__ sequence did not complete.")
        return FakeSource()

    cap = Capture(factory, backoff_initial_s=0.02, backoff_max_s=0.08).start()
    try:
        assert cap.take(timeout=3.0) is not None
    finally:
        cap.stop()
    retry = [e["retry_in_s"] for e in cap.events if e["event"] == "source_error"]
    assert retry[:4] == [0.02, 0.04, 0.08, 0.08]
    gaps = np.diff(attempts[:5])
    assert gaps[2] >= 0.07  # waited the doubled delay
    assert not cap.healthy or cap.stats().captured >= 1


def test_finite_source_ends():
    cap = Capture(lambda: FakeSource(limit=3)).start()
    try:
        assert run_until(lambda: cap.ended)
    finally:
        cap.stop()
    assert not any(e["event"] == "source_error" for e in cap.events)
    assert cap.stats().captured == 3


def test_lossless_mode_delivers_every_frame():
    cap = Capture(lambda: FakeSource(limit=12, period=0.0), lossless=True).start()
    seqs = []
    try:
        while len(seqs) < 12:
            f = cap.take(timeout=2.0)
            assert f is not None
            seqs.append(f.seq)
            time.sleep(0.01)
    finally:
        cap.stop()
    assert seqs == list(range(12))
    assert cap.stats().dropped == 0


def test_stop_is_prompt_even_with_a_hung_source():
    cap = Capture(lambda: FakeSource(script={0: "hang"}), hang_timeout_s=60).start()
    time.sleep(0.1)
    t0 = time.monotonic()
    cap.stop()
    assert time.monotonic() - t0 < 1.5
