"""Stop requests (SIGTERM, SIGINT) honoured within ``STOP_BOUND_S`` whatever the main thread is doing.

A Python signal handler runs only when the main thread gets back to Python
bytecode. While that thread sits in C (numba compiling, a ``write`` to a pipe
nobody reads, which Python retries after each signal, a codec opening a FIFO)
the handler waits, and systemd's stop timeout ends in SIGKILL. So the handler
is not what acts: ``signal.set_wakeup_fd`` makes the C-level handler write
the signal number to a pipe at once, and a thread of our own, blocked on that
pipe, wakes up whatever the main thread is doing. It sets the stop event the
loop checks, then:

- before the loop runs (``immediate``: loading the model, compiling the
  kernels), exits at once: there is nothing to save yet (numba writes its cache
  files whole, through a rename);
- once it runs, gives the clean stop ``grace_s`` (the loop finishes its
  frame, every track leaves, the log and the recording are closed) and, should
  the main thread still be stuck, says where and exits 0 itself;
- a second signal exits at once.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable

#: the documented bound: a stop request ends the process within this many seconds
STOP_BOUND_S = 2.0
#: what the clean stop gets before the process exits without it (teardown fits in what is left)
STOP_GRACE_S = 1.5

SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _say(text: str) -> None:
    """One line on stderr from a thread that must not block: if stderr is a full pipe, the line is lost."""
    writer = threading.Thread(target=lambda: os.write(2, text.encode("utf-8", "replace")), daemon=True)
    writer.start()
    writer.join(0.1)


class StopRequests:
    """Turns SIGTERM/SIGINT into ``stop.set()`` and, when the main thread does not get there, an exit.

    ``phase`` names what the main thread is doing, for the line said on a
    forced exit. ``before_exit`` is called (best effort) just before a forced
    exit: the systemd STOPPING=1.
    """

    def __init__(self, stop: threading.Event, grace_s: float = STOP_GRACE_S,
                 exit: Callable[[int], None] = os._exit) -> None:
        self.stop = stop
        self.grace_s = grace_s
        self.immediate = True
        self.phase = "starting"
        self.signalled_at: float | None = None
        self.signal_name = ""
        self.before_exit: Callable[[], object] | None = None
        self._exit = exit
        self._finished = threading.Event()
        self._fds: tuple[int, int] | None = None
        self._previous: dict[int, object] = {}
        self._previous_fd = -1
        self._thread: threading.Thread | None = None

    def install(self) -> StopRequests:
        """From the main thread: route SIGTERM and SIGINT here."""
        r, w = os.pipe()
        os.set_blocking(w, False)
        self._fds = (r, w)
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        self._previous_fd = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        self._thread = threading.Thread(target=self._watch, name="xnorcam-stop", daemon=True)
        self._thread.start()
        return self

    def uninstall(self, exiting: bool = False) -> None:
        """The run is over: no forced exit any more; the previous handlers back (for callers in one process).

        ``exiting``: the process ends next (the program, not a caller in one process). A stop request in that
        last moment (a second SIGTERM 50 ms after the first, once the clean stop is already done) then exits
        0 at once, as during the run, instead of meeting the default action and dying by the signal."""
        self._finished.set()
        if self._fds is None:
            return
        try:
            signal.set_wakeup_fd(self._previous_fd)
            for sig, handler in self._previous.items():
                signal.signal(sig, (lambda _s, _f: self._exit(0)) if exiting else handler)
        except ValueError:  # not the main thread: leave them
            pass
        r, w = self._fds
        self._fds = None
        os.close(w)  # the watcher reads EOF and ends
        if self._thread is not None:
            self._thread.join(1.0)
        os.close(r)

    def running(self, phase: str) -> None:
        """The loop runs from here: a stop request now gets the clean stop first."""
        self.phase = phase
        self.immediate = False

    def _on_signal(self, signum: int, _frame: object) -> None:
        # Runs only when the main thread reaches bytecode; the watcher has normally acted already.
        self.stop.set()

    def _watch(self) -> None:
        assert self._fds is not None
        r = self._fds[0]
        while True:
            try:
                data = os.read(r, 64)
            except OSError:
                return
            if not data:
                return
            sigs = [b for b in data if b in (int(s) for s in SIGNALS)]
            if not sigs or self._finished.is_set():
                continue
            self.stop.set()
            if self.signalled_at is not None or len(sigs) > 1:
                self._force("a second stop request")
                return
            self.signalled_at = time.monotonic()
            self.signal_name = signal.Signals(sigs[0]).name
            if self.immediate:
                self._force(f"{self.signal_name} while {self.phase}: nothing to save yet", quiet=True)
                return
            threading.Thread(target=self._deadline, name="xnorcam-stop-deadline", daemon=True).start()

    def _deadline(self) -> None:
        if self._finished.wait(self.grace_s):
            return
        self._force(f"{self.signal_name}: the clean stop did not finish within {self.grace_s:g} s "
                    f"(the main thread is stuck while {self.phase})")

    def _force(self, why: str, quiet: bool = False) -> None:
        if self._finished.is_set():
            return
        took = time.monotonic() - self.signalled_at if self.signalled_at is not None else 0.0
        if self.before_exit is not None:
            try:
                self.before_exit()
            except Exception:
                pass
        _say(f"xnorcam: {'INFO' if quiet else 'WARNING'} xnorcam.stop: stopped {took:.2f} s after the signal, "
             f"without the clean stop: {why}\n")
        try:
            sys.stderr.flush()
        except Exception:
            pass
        self._exit(0)
