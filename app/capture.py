"""The capture thread and its latest-frame slot.

Capture never waits for detection, drawing or logging: it puts each frame in a
slot of one, and a newer frame replaces one that was not taken yet (the drop is
counted). Every captured frame ends up either taken (``taken``) or dropped
(``dropped``), so ``captured == taken + dropped`` once capture has stopped
and the slot is drained.

A live source (a camera, a stream) that raises, hangs (no frame for
``hang_timeout_s``, in ``open()`` as in ``read()``) or returns garbage is closed,
reported as an event, and reopened from its factory after an exponential
backoff. A hung call cannot be interrupted in Python, so its reader thread is
left behind and whatever it returns later is thrown away (frames carry the
generation of the reader that made them); but no new reader starts until it has
returned, so two decodes or two opens of one device never overlap. A driver that
never returns keeps the outage on, the watchdog pings stop, and systemd restarts
the service: that is the cure for a wedged driver.

A finite source (files) is never reopened: its reads are waited for, however
slow (a file is not a camera outage), the files it skips are reported as
``source_skip`` events, and an error it cannot get past ends it with
``failure`` set. So does a ``PermanentSourceError`` from any source (a missing
module, a file that is not a video): retrying cannot mend those.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from app.sources import Frame, PermanentSourceError, Source, SourceTimeout, frame_problem, one_line

log = logging.getLogger("xnorcam.capture")


class LatestFrameSlot:
    """A slot of one frame. ``put`` never blocks (unless ``lossless``); ``take`` waits up to a timeout."""

    def __init__(self, lossless: bool = False) -> None:
        self._cond = threading.Condition()
        self._frame: Frame | None = None
        self.lossless = lossless
        self.captured = 0
        self.taken = 0
        self.dropped = 0
        self._closed = False

    def put(self, frame: Frame, stop: threading.Event | None = None) -> bool:
        """Store ``frame``; True when it replaced an untaken one (a counted drop).

        In lossless mode (file sources played with fps 0) the caller waits for
        the slot to empty instead, so every frame is processed.
        """
        with self._cond:
            if self.lossless:
                while self._frame is not None and not self._closed and not (stop and stop.is_set()):
                    self._cond.wait(0.05)
            self.captured += 1
            replaced = self._frame is not None
            if replaced:
                self.dropped += 1
            self._frame = frame
            self._cond.notify_all()
            return replaced

    def take(self, timeout: float | None = None) -> Frame | None:
        with self._cond:
            if self._frame is None and timeout:
                self._cond.wait_for(lambda: self._frame is not None or self._closed, timeout)
            frame, self._frame = self._frame, None
            if frame is not None:
                self.taken += 1
                self._cond.notify_all()
            return frame

    def drain(self) -> None:
        """Count an untaken frame as dropped (at shutdown) so the books balance."""
        with self._cond:
            if self._frame is not None:
                self._frame = None
                self.dropped += 1
            self._closed = True
            self._cond.notify_all()

    @property
    def pending(self) -> int:
        return 0 if self._frame is None else 1


@dataclass
class CaptureStats:
    captured: int
    taken: int
    dropped: int
    pending: int
    errors: int
    reopens: int
    invalid: int
    outage: bool
    ended: bool
    skipped: int = 0


class Capture:
    """Runs a source on a capture thread and keeps the newest frame in a slot.

    ``factory`` makes a fresh unopened ``Source`` for every (re)open.
    ``events`` is a deque of dicts (``{"event": "source_error", ...}``) for the
    pipeline to log: the capture thread never writes to the log itself.
    """

    def __init__(
        self,
        factory: Callable[[], Source],
        *,
        hang_timeout_s: float = 5.0,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
        lossless: bool = False,
        max_events: int = 1000,
        poll_s: float = 0.1,
        close_timeout_s: float = 5.0,
    ) -> None:
        self.factory = factory
        self.close_timeout_s = close_timeout_s
        self.hang_timeout_s = hang_timeout_s
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.slot = LatestFrameSlot(lossless=lossless)
        self.events: collections.deque[dict[str, Any]] = collections.deque(maxlen=max_events)
        self._poll_s = poll_s
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._seq = 0
        self._generation = 0
        self._source: Source | None = None
        self._last_progress = time.monotonic()
        self._in_read = False
        self._supervisor: threading.Thread | None = None
        self._left_behind: list[threading.Thread] = []  # a hung reader and its closer, until they return
        self.errors = 0
        self.reopens = 0
        self.invalid = 0
        self.skipped = 0
        self.outage = False
        self.ended = False
        #: (exit code, message) once a permanent error has ended the source, else None
        self.failure: tuple[int, str] | None = None
        self.last_frame_t: float | None = None

    # --- public ---------------------------------------------------------------

    def start(self) -> Capture:
        self._supervisor = threading.Thread(target=self._supervise, name="xnorcam-capture", daemon=True)
        self._supervisor.start()
        return self

    def take(self, timeout: float | None = None) -> Frame | None:
        return self.slot.take(timeout)

    def stop(self, timeout: float = 1.0) -> None:
        self._stop.set()
        with self._lock:
            self._generation += 1  # a read still in flight is discarded, not counted
        self.slot.drain()
        if self._supervisor is not None:
            self._supervisor.join(timeout)
        self.slot.drain()

    @property
    def healthy(self) -> bool:
        """A source is open and its reader is not stuck past the hang timeout."""
        with self._lock:
            if self._source is None or self.outage:
                return False
            return not (self._in_read and time.monotonic() - self._last_progress > self.hang_timeout_s)

    def stats(self) -> CaptureStats:
        s = self.slot
        return CaptureStats(s.captured, s.taken, s.dropped, s.pending, self.errors, self.reopens, self.invalid,
                            self.outage, self.ended, self.skipped)

    # --- the capture thread ---------------------------------------------------

    def _event(self, kind: str, **fields: Any) -> None:
        self.events.append({"event": kind, "mono_ms": round(time.monotonic() * 1000.0, 3), **fields})

    def _error(self, stage: str, message: str, retry_in_s: float) -> None:
        self.errors += 1
        self.outage = True
        log.warning("source %s: %s (retrying in %.3g s)", stage, message, retry_in_s)
        self._event("source_error", stage=stage, message=message, retry_in_s=round(retry_in_s, 3))

    def _fail(self, stage: str, message: str, code: int) -> None:
        """A permanent error: reported once (``permanent: true``, no retry), and the source ends."""
        self.errors += 1
        self.failure = (code, message)
        log.error("source %s: %s (permanent: not retried)", stage, message)
        self._event("source_error", stage=stage, message=message, permanent=True)
        self.ended = True

    def _supervise(self) -> None:
        backoff = self.backoff_initial_s
        opened_before = False
        while not self._stop.is_set():
            if opened_before:
                self.reopens += 1
            if not self._await_left_behind():
                if self._stop.is_set():
                    break
                self._error("open", f"the hung source has not returned or closed after {self.close_timeout_s:g} s",
                            backoff)
                if self._stop.wait(backoff):
                    break
                backoff = min(backoff * 2, self.backoff_max_s)
                continue
            opened_before = True
            source = None
            try:
                source = self.factory()
            except Exception as exc:  # contain: a camera that will not open is an outage, not a crash
                outcome, stage, message, code = "failed", "open", one_line(exc), _permanent_code(exc)
            else:
                outcome, stage, message, code = self._run_reader(source)
            if outcome in ("ended", "stopped"):
                if outcome == "ended":
                    self.ended = True  # not an outage: no event line
                    log.info("source ended")
                break
            if code is None and getattr(source, "finite", False):
                code = 65  # a file that failed fails again: reopening it would replay what was read
            if code is not None:
                self._fail(stage, message, code)
                break
            if outcome == "worked":
                backoff = self.backoff_initial_s  # it ran fine for a while: start the backoff over
            self._error(stage, message, backoff)
            if self._stop.wait(backoff):
                break
            backoff = min(backoff * 2, self.backoff_max_s)
        with self._lock:
            source, self._source = self._source, None
        self._close(source)

    def _await_left_behind(self) -> bool:
        """Wait, at most ``close_timeout_s``, for a hung reader and its closer to return; False if one still runs.

        Never two readers at once: a new open while the old call still runs
        overlaps two decodes (memory) or two opens of one device. With
        picamera2, the old camera's late clean-up deletes the camera manager's
        entry for that index, the new camera's, and the new camera then never
        gets a frame.
        """
        deadline = time.monotonic() + self.close_timeout_s
        while True:
            self._left_behind = [t for t in self._left_behind if t.is_alive()]
            if not self._left_behind:
                return True
            if time.monotonic() >= deadline or self._stop.is_set():
                return False
            self._left_behind[0].join(0.05)

    def _run_reader(self, source: Source) -> tuple[str, str, str, int | None]:
        """Open and read on a child thread until it ends, fails, hangs or we stop.

        Returns (outcome, stage, message, permanent exit code or None); outcome
        is 'ended', 'stopped', 'failed' (no good frame this time) or 'worked'
        (failed after good frames). A finite source is never declared hung.
        """
        with self._lock:
            self._generation += 1
            generation = self._generation
            self._last_progress = time.monotonic()
            self._in_read = True  # open() counts: a stream that never answers is hung
        result: dict[str, Any] = {}
        reader = threading.Thread(
            target=self._reader_main, args=(source, generation, result), name="xnorcam-reader", daemon=True
        )
        reader.start()
        finite = bool(getattr(source, "finite", False))
        while reader.is_alive():
            reader.join(self._poll_s)
            if self._stop.is_set():
                self._close(source)
                reader.join(0.5)
                return "stopped", "", "", None
            with self._lock:
                stalled = time.monotonic() - self._last_progress
                hung = not finite and reader.is_alive() and self._in_read and stalled > self.hang_timeout_s
                if hung:
                    self._generation += 1  # whatever the hung call returns is now stale
                    self._source = None
                    self._in_read = False
            if hung:
                self._left_behind = [reader]
                if result.get("opened"):
                    # Closing may unblock the read, or may block too (a wedged driver): do it aside.
                    closer = threading.Thread(target=self._close, args=(source,), name="xnorcam-close", daemon=True)
                    closer.start()
                    self._left_behind.append(closer)
                    stage, what = "hang", f"no frame for {stalled:.1f} s"
                else:
                    stage, what = "open", f"open() gave no answer for {stalled:.1f} s"
                return ("worked" if result.get("got_any") else "failed"), stage, what, None
        with self._lock:
            self._source = None
            self._in_read = False
        self._close(source)
        outcome = result.get("outcome", "failed")
        if outcome in ("ended", "stopped"):
            return outcome, "", "", None
        return (("worked" if result.get("got_any") else "failed"), result.get("stage", "read"),
                result.get("message", ""), result.get("code"))

    def _reader_main(self, source: Source, generation: int, result: dict[str, Any]) -> None:
        try:
            source.open()
        except Exception as exc:
            result.update(outcome="failed", stage="open", message=one_line(exc), code=_permanent_code(exc))
            return
        with self._lock:
            stale = generation != self._generation
            if not stale:
                self._source = source
                self._last_progress = time.monotonic()
        result["opened"] = True
        if stale:  # open() returned after we gave up on it: nobody else will close this one
            self._close(source)
            return
        self._read_loop(source, generation, result)

    def _report_skips(self, source: Source) -> None:
        for item, why in source.take_skips():
            self.skipped += 1
            self._event("source_skip", item=item, reason=why)

    def _read_loop(self, source: Source, generation: int, result: dict[str, Any]) -> None:
        while not self._stop.is_set():
            with self._lock:
                self._in_read = True
            try:
                pixels = source.read()
            except Exception as exc:
                with self._lock:
                    self._in_read = False
                self._report_skips(source)
                # A source that timed its own read out hung just as much as one the watchdog finds.
                stage = "hang" if isinstance(exc, SourceTimeout) else "read"
                result.update(outcome="failed", stage=stage, message=one_line(exc), code=_permanent_code(exc))
                return
            now = time.monotonic()
            with self._lock:
                self._in_read = False
                if generation != self._generation:
                    return  # abandoned after a hang: dropped silently, it was never a captured frame
                self._last_progress = now
            self._report_skips(source)
            if pixels is None:
                result["outcome"] = "ended"
                return
            problem = frame_problem(pixels)
            if problem is not None:
                self.invalid += 1
                result.update(outcome="failed", stage="garbage", message=problem)
                return
            if self.outage:
                self.outage = False
                self._event("source_recovered", errors=self.errors)
                log.info("source recovered after %d error(s)", self.errors)
            result["got_any"] = True
            with self._lock:
                seq = self._seq
                self._seq += 1
            self.last_frame_t = now
            self.slot.put(Frame(pixels, seq, now), self._stop)
            if self.slot.lossless:
                # Waiting for a slow consumer is not a hang of the source.
                with self._lock:
                    if generation == self._generation:
                        self._last_progress = time.monotonic()
        result["outcome"] = "stopped"

    @staticmethod
    def _close(source: Source | None) -> None:
        if source is None:
            return
        try:
            source.close()
        except Exception:
            log.debug("source close failed", exc_info=True)


def _permanent_code(exc: BaseException) -> int | None:
    """The exit code of an error no retry can mend, or None for one worth retrying."""
    if isinstance(exc, PermanentSourceError):
        return exc.exit_code
    if isinstance(exc, ImportError):  # the code is not there, and will not appear by waiting
        return 78
    return None
