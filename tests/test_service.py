"""sd_notify against a real AF_UNIX datagram socket, as systemd provides it."""

from __future__ import annotations

import os
import socket
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from app.service import Notifier


@pytest.fixture()
def receiver():
    """A bound datagram socket standing in for systemd's notify socket."""
    # AF_UNIX paths are limited to ~108 bytes; pytest's tmp_path can be longer.
    directory = Path(tempfile.mkdtemp(prefix="xn-notify-"))
    path = directory / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(1.0)
    yield sock, str(path)
    sock.close()
    path.unlink(missing_ok=True)
    directory.rmdir()


def drain(sock: socket.socket) -> list[str]:
    """Every datagram waiting now, without blocking."""
    out = []
    sock.setblocking(False)
    try:
        while True:
            out.append(sock.recv(4096).decode())
    except BlockingIOError:
        pass
    finally:
        sock.settimeout(1.0)
    return out


def test_ready_watchdog_status_arrive_in_order(receiver):
    sock, path = receiver
    n = Notifier.from_env({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "4000000"})
    assert n.enabled and n.watchdog_enabled
    assert n.ready() and n.watchdog() and n.status("running: 3.1 fps")
    got = [sock.recv(4096).decode() for _ in range(3)]
    assert got == ["READY=1", "WATCHDOG=1", "STATUS=running: 3.1 fps"]
    assert n.sent == 3 and n.send_failures == 0


def test_extend_timeout_and_stopping(receiver):
    sock, path = receiver
    n = Notifier.from_env({"NOTIFY_SOCKET": path})
    n.extend_timeout(90)
    n.extend_timeout(0.25)
    n.stopping()
    assert [sock.recv(4096).decode() for _ in range(3)] == [
        "EXTEND_TIMEOUT_USEC=90000000",
        "EXTEND_TIMEOUT_USEC=250000",
        "STOPPING=1",
    ]


def test_status_is_one_line(receiver):
    sock, path = receiver
    n = Notifier.from_env({"NOTIFY_SOCKET": path})
    n.status("line one\nREADY=1\n")
    assert sock.recv(4096).decode() == "STATUS=line one READY=1"


def test_abstract_socket():
    name = f"xnorcam-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(1.0)
    try:
        n = Notifier.from_env({"NOTIFY_SOCKET": "@" + name})
        assert n.ready()
        assert sock.recv(4096) == b"READY=1"
    finally:
        sock.close()


def test_noop_without_notify_socket(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    n = Notifier.from_env()
    assert not n.enabled and not n.watchdog_enabled
    assert n.ready() is False
    assert n.watchdog() is False
    assert n.status("x") is False
    assert n.extend_timeout(10) is False
    assert n.stopping() is False
    assert n.sent == 0 and n.send_failures == 0


def test_unsupported_address_is_noop():
    n = Notifier.from_env({"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not n.enabled and n.ready() is False


def test_failed_send_is_counted_not_raised():
    missing = f"/tmp/xn-no-such-dir-{uuid.uuid4().hex}/notify.sock"
    n = Notifier.from_env({"NOTIFY_SOCKET": missing, "WATCHDOG_USEC": "1000000"})
    assert n.ready() is False
    assert n.watchdog() is False
    assert n.status("still running") is False
    assert n.send_failures == 3 and n.sent == 0


def test_a_full_queue_never_blocks(receiver):
    """Nobody reads the socket: sends fail (counted) instead of blocking the loop."""
    import threading

    _, path = receiver
    n = Notifier.from_env({"NOTIFY_SOCKET": path})
    worker = threading.Thread(target=lambda: [n.status(f"frame {i}") for i in range(200)], daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive(), "Notifier blocked on a full socket queue"
    assert n.sent >= 1 and n.send_failures >= 1 and n.sent + n.send_failures == 200


def test_watchdog_for_another_pid_is_ignored(receiver):
    _, path = receiver
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid() + 1)}
    assert not Notifier.from_env(env).watchdog_enabled
    env["WATCHDOG_PID"] = str(os.getpid())
    assert Notifier.from_env(env).watchdog_enabled


@pytest.mark.parametrize("usec", ["", "0", "-5", "soon"])
def test_watchdog_disabled_by_bad_or_missing_usec(receiver, usec):
    sock, path = receiver
    n = Notifier.from_env({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": usec})
    assert not n.watchdog_enabled and n.watchdog_interval == 0
    assert n.watchdog() is False
    assert drain(sock) == []


def test_watchdog_rate_limited_to_quarter_period(receiver):
    sock, path = receiver
    now = [100.0]
    n = Notifier(path, watchdog_period=2.0, clock=lambda: now[0])
    assert n.watchdog_interval == pytest.approx(0.5)
    sent_at = []
    for _ in range(300):  # 3 s of a 100 fps loop
        if n.watchdog():
            sent_at.append(now[0])
        now[0] += 0.01
    pings = drain(sock)
    assert pings == ["WATCHDOG=1"] * len(sent_at)
    assert 6 <= len(sent_at) <= 7
    gaps = [b - a for a, b in zip(sent_at, sent_at[1:], strict=False)]
    assert min(gaps) >= 0.5 - 1e-9
    assert max(gaps) < 0.5 + 0.02


def test_stalled_loop_stops_the_pings(receiver):
    """The notifier never pings on its own: a stuck loop must look stuck."""
    sock, path = receiver
    n = Notifier.from_env({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"})  # ping every 50 ms

    def loop(seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            n.watchdog()
            time.sleep(0.002)

    loop(0.3)
    before = drain(sock)
    assert 3 <= len(before) <= 8, before
    time.sleep(0.4)  # the stall: eight watchdog intervals without a call
    assert drain(sock) == []
    n.watchdog()  # the loop recovers: the first call pings at once
    assert drain(sock) == ["WATCHDOG=1"]


APP_MAIN = Path(__file__).resolve().parents[1] / "app" / "__main__.py"


@pytest.mark.skipif(not APP_MAIN.exists(), reason="app/__main__.py not written yet")
def test_app_under_a_fake_systemd(receiver, rand_model_file):
    """`python -m app` as systemd runs it: READY only after the warm-up, then pings, then STOPPING."""
    import subprocess
    import sys
    import threading

    sock, path = receiver
    env = dict(os.environ, NOTIFY_SOCKET=path, WATCHDOG_USEC="400000")
    env.pop("WATCHDOG_PID", None)
    env.pop("DISPLAY", None)
    cmd = [sys.executable, "-m", "app", "--source", "demo", "--preview", "none", "--log", ""]
    cmd += ["--model", str(rand_model_file), "--max-frames", "15"]
    # Read as systemd does, while the app runs: the socket queue is short.
    messages: list[str] = []
    done = threading.Event()

    def read() -> None:
        sock.settimeout(0.1)
        while not done.is_set():
            try:
                messages.append(sock.recv(4096).decode())
            except TimeoutError:
                pass

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        result = subprocess.run(
            cmd, cwd=APP_MAIN.parents[1], env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL
        )
    finally:
        time.sleep(0.3)
        done.set()
        reader.join()
    assert result.returncode == 0, result.stderr
    assert messages.count("READY=1") == 1, messages
    ready = messages.index("READY=1")
    before, after = messages[:ready], messages[ready + 1 :]
    assert any(m.startswith("EXTEND_TIMEOUT_USEC=") for m in before), messages
    assert "STATUS=warming up" in before, messages
    assert "WATCHDOG=1" not in before  # the watchdog belongs to the running loop
    assert after.count("WATCHDOG=1") >= 2, messages
    assert messages[-1] == "STOPPING=1", messages
