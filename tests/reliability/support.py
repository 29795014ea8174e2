"""Helpers of the reliability suite: running the app, the unit's exit codes, a notify socket, fuzz counters.

(Kept out of conftest.py: test modules import these, and conftest.py is loaded under another module name.)
"""

from __future__ import annotations

import collections
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "xnorcam.service"

FUZZ_EXAMPLES = int(os.environ.get("XNORCAM_FUZZ_EXAMPLES", "100"))

# fuzz test name -> Counter of outcomes; filled by the fuzz tests, printed at the end.
FUZZ_COUNTS: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
    env.update(extra)
    return env


def run_app(*args, env=None, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "app", *map(str, args)],
        cwd=ROOT, env=env or child_env(), capture_output=True, text=True, timeout=timeout,
    )


def unit_restart_prevent_codes() -> set[int]:
    codes: set[int] = set()
    for line in UNIT.read_text().splitlines():
        if line.strip().startswith("RestartPreventExitStatus="):
            codes.update(int(x) for x in line.split("=", 1)[1].split())
    return codes


class NotifySocket:
    """A real AF_UNIX datagram socket standing in for systemd's $NOTIFY_SOCKET; records (monotonic time, message)."""

    def __init__(self) -> None:
        # sun_path is limited to 108 bytes: pytest's tmp_path can be longer.
        self.dir = tempfile.mkdtemp(prefix="xn-notify-", dir="/tmp")
        self.path = os.path.join(self.dir, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.05)
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._recv, name="notify-recv", daemon=True)
        self._thread.start()

    def _recv(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            self.messages.append((time.monotonic(), data.decode("utf-8", "replace")))

    def times(self, key: str) -> list[float]:
        return [t for t, m in self.messages if key in m.splitlines()]

    def texts(self, prefix: str) -> list[str]:
        return [line for _, m in self.messages for line in m.splitlines() if line.startswith(prefix)]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(1)
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)


FAKE_PICAMERA2 = textwrap.dedent(
    """
    # FAKE picamera2 for tests/reliability (wraps tests/fakes/fake_picamera2.py), scripted by environment:
    #   FAKE_CAPTURE_SCRIPT  "N:action,..." for the N-th capture (counted across reopens):
    #                        raise | hang | garbage (float32 lores buffer) | badshape (1-D buffer)
    #   FAKE_PICAMERA2_MARKER  a file that gets one line per camera opened
    import os

    import numpy as np

    from tests.fakes.fake_picamera2 import STALL, make_module

    _m = make_module()
    Preview = _m.Preview
    state = _m.state
    _script = {}
    for _item in filter(None, os.environ.get("FAKE_CAPTURE_SCRIPT", "").split(",")):
        _n, _action = _item.split(":")
        _script[int(_n)] = _action


    def _on_capture(n):
        action = _script.get(n)
        if action == "raise":
            raise RuntimeError(f"fake camera: capture {n} failed (device lost)")
        if action == "hang":
            return STALL  # no more frames (a loose cable) until the camera is closed
        if action == "garbage":
            return np.zeros((360, 384), np.float32)
        if action == "badshape":
            return np.zeros((7,), np.uint8)
        return None


    state.on_capture = _on_capture


    class Picamera2(_m.Picamera2):
        def __init__(self, *args, **kwargs):
            with open(os.environ["FAKE_PICAMERA2_MARKER"], "a") as fh:
                fh.write("opened\\n")
            super().__init__(*args, **kwargs)
    """
)


def run_pipeline(capture, pipeline, timeout_s: float, *closers):
    """Run ``pipeline`` over ``capture`` until it stops itself or ``timeout_s`` passes; then stop the capture,
    refresh the counters and close ``closers`` (logs, notifiers), failures or not. Returns the pipeline's stats."""
    stop = threading.Event()
    timer = threading.Timer(timeout_s, stop.set)
    timer.start()
    capture.start()
    try:
        return pipeline.run(stop)
    finally:
        timer.cancel()
        capture.stop()
        pipeline.refresh_stats()
        for closer in closers:
            closer.close()
