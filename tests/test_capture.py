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


# --- finite sources are never reopened; permanent errors end; never two readers at once ----------------------


class FiniteFake(FakeSource):
    """A FAKE file source: finite, so a failure must end it, never replay it from the start."""

    finite = True

    def __init__(self, fail_open=False, slow=None, **kw):
        super().__init__(**kw)
        self.fail_open, self.slow = fail_open, slow

    def open(self):
        if self.fail_open:
            raise OSError("not a video")

    def read(self):
        if self.slow is not None and self.n == self.slow[0]:
            self.n += 1
            time.sleep(self.slow[1])  # a slow decode, longer than the hang timeout: not an outage of a file
            return np.full(self.shape, 99, np.uint8)
        return super().read()


@pytest.mark.parametrize("how", ["raise", "garbage", "open"])
def test_a_finite_source_that_fails_ends_and_is_never_reopened(how):
    made = []

    def factory():
        made.append(FiniteFake(fail_open=how == "open", script={3: how} if how != "open" else {}, limit=10))
        return made[-1]

    cap = Capture(factory, hang_timeout_s=0.2, backoff_initial_s=0.01, lossless=True).start()
    got = []
    try:
        assert run_until(lambda: (f := cap.take(0.01)) is not None and got.append(f) or cap.ended, timeout=5)
    finally:
        cap.stop()
    assert len(made) == 1 and cap.reopens == 0
    assert cap.failure is not None and cap.failure[0] == 65
    errors = [e for e in cap.events if e["event"] == "source_error"]
    assert len(errors) == 1 and errors[0]["permanent"] is True and "retry_in_s" not in errors[0]
    assert len(got) == (0 if how == "open" else 3)


def test_a_slow_read_of_a_finite_source_is_waited_for_not_declared_hung():
    made = []

    def factory():
        made.append(FiniteFake(slow=(2, 0.6), limit=5, period=0.0))
        return made[-1]

    cap = Capture(factory, hang_timeout_s=0.2, backoff_initial_s=0.01, lossless=True).start()
    seen = []
    try:
        assert run_until(lambda: (f := cap.take(0.01)) is not None and seen.append(int(f.pixels[0, 0])) or cap.ended)
    finally:
        cap.stop()
    assert seen == [0, 1, 99, 3, 4] and len(made) == 1 and cap.failure is None
    assert not [e for e in cap.events if e["event"] == "source_error"]


def test_an_images_folder_with_bad_files_plays_once_through_the_capture(tmp_path):
    from app.sources import ImagesSource
    from tests.hostile_images import good_image, header_bomb

    good_image(tmp_path / "a.jpg", 10)
    cv2 = pytest.importorskip("cv2")
    cv2.imwrite(str(tmp_path / "b.png"), np.zeros((1, 1, 3), np.uint8))  # the reported case
    header_bomb(tmp_path / "c.png", "png", 20000, 20000)
    good_image(tmp_path / "d.jpg", 20)
    made = []

    def factory():
        made.append(ImagesSource(str(tmp_path), fps=0))
        return made[-1]

    cap = Capture(factory, backoff_initial_s=0.01, lossless=True).start()
    seen = []
    try:
        assert run_until(lambda: (f := cap.take(0.01)) is not None and seen.append(f.seq) or cap.ended, timeout=10)
        while (f := cap.take(0.05)) is not None:
            seen.append(f.seq)
    finally:
        cap.stop()
    assert seen == [0, 1] and len(made) == 1 and cap.failure is None
    skips = [e for e in cap.events if e["event"] == "source_skip"]
    assert [s["item"] for s in skips] == [str(tmp_path / "b.png"), str(tmp_path / "c.png")]
    assert not [e for e in cap.events if e["event"] == "source_error"]
    assert cap.stats().skipped == 2


class Concurrency:
    """Counts the sources inside open() or read() at once, across every source a capture makes."""

    def __init__(self):
        self.lock, self.now, self.peak = threading.Lock(), 0, 0

    def __enter__(self):
        with self.lock:
            self.now += 1
            self.peak = max(self.peak, self.now)

    def __exit__(self, *exc):
        with self.lock:
            self.now -= 1


class StubbornHang(FakeSource):
    """A read (or open) that hangs and ignores close(): it returns by itself after ``hang_s``, like a long
    decode or a driver call that times out on its own."""

    def __init__(self, counter, hang_at=None, hang_open=False, hang_s=1.0, **kw):
        super().__init__(**kw)
        self.counter, self.hang_at, self.hang_open, self.hang_s = counter, hang_at, hang_open, hang_s
        self.returned_at = None
        self.opened_at = None

    def open(self):
        with self.counter:
            self.opened_at = time.monotonic()
            if self.hang_open:
                time.sleep(self.hang_s)
                self.returned_at = time.monotonic()

    def read(self):
        with self.counter:
            if self.n == self.hang_at:
                self.n += 1
                time.sleep(self.hang_s)
                self.returned_at = time.monotonic()
                return np.zeros(self.shape, np.uint8)
            return super().read()


@pytest.mark.parametrize("where", ["read", "open"])
def test_no_second_reader_starts_while_a_hung_one_is_still_running(where):
    counter, made = Concurrency(), []

    def factory():
        first = not made
        made.append(StubbornHang(counter, hang_at=2 if first and where == "read" else None,
                                 hang_open=first and where == "open"))
        return made[-1]

    cap = Capture(factory, hang_timeout_s=0.2, backoff_initial_s=0.01).start()
    try:
        assert run_until(lambda: len(made) >= 2 and made[-1].n > 3, timeout=10)
    finally:
        cap.stop()
    assert counter.peak == 1, "a new source was opened while the hung call was still running"
    assert made[1].opened_at >= made[0].returned_at
    errors = [e for e in cap.events if e["event"] == "source_error"]
    assert [e["stage"] for e in errors] == ["hang" if where == "read" else "open"]
    assert any(e["event"] == "source_recovered" for e in cap.events)


def test_an_open_that_never_answers_is_reported_and_stop_is_prompt():
    release = threading.Event()

    class SilentOpen(FakeSource):
        def open(self):
            release.wait(30)  # a server that accepted the connection and says nothing

    cap = Capture(SilentOpen, hang_timeout_s=0.2, backoff_initial_s=0.01).start()
    try:
        assert run_until(lambda: any(e["event"] == "source_error" for e in cap.events), timeout=5)
        t0 = time.monotonic()
        cap.stop()
        assert time.monotonic() - t0 < 1.5
    finally:
        release.set()
        cap.stop()
    e = next(e for e in cap.events if e["event"] == "source_error")
    assert e["stage"] == "open" and "no answer" in e["message"] and e["retry_in_s"] == 0.01


@pytest.mark.parametrize("how, code", [("import in open", 78), ("import in factory", 78),
                                       ("permanent open", 65), ("permanent read", 65), ("config", 78)])
def test_permanent_errors_end_the_source_with_their_exit_code(how, code):
    from app.sources import PermanentSourceError

    made = []

    class Broken(FakeSource):
        def open(self):
            if how == "import in open":
                raise ModuleNotFoundError("No module named 'picamera2'")
            if how == "permanent open":
                raise PermanentSourceError("opencv:x.mp4: not a video")
            if how == "config":
                raise PermanentSourceError("no such camera", 78)

        def read(self):
            if how == "permanent read":
                raise PermanentSourceError("the file went bad")
            return super().read()

    def factory():
        made.append(1)
        if how == "import in factory":
            raise ImportError("cannot import name 'Picamera2'")
        return Broken()

    cap = Capture(factory, backoff_initial_s=0.01).start()
    try:
        assert run_until(lambda: cap.ended, timeout=5)
    finally:
        cap.stop()
    assert len(made) == 1 and cap.failure is not None and cap.failure[0] == code
    errors = [e for e in cap.events if e["event"] == "source_error"]
    assert len(errors) == 1 and errors[0]["permanent"] is True
