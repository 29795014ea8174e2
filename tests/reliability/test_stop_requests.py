"""Stop requests that the main thread cannot see in time: a cold numba compile, a stdout pipe nobody reads, a
FIFO as the log or the recording, a call stuck in C. ``python -m app`` ends within the documented 2 s in each.

How the 2 s is checked without being timing-flaky: the app says, on its way out, how long after the signal
it stopped, as measured by its own stop thread (app/stop.py) from the moment the signal arrived; that is
held to 2 s. The test's own wall clock, which a loaded 2-core machine can stretch with process start and
reaping, is held to a generous 10 s: still far under the old behaviour (24 to 57 s for a cold compile,
forever for the others) and the unit's TimeoutStopSec (20 s).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from app.stop import STOP_BOUND_S, StopRequests
from tests.reliability.support import ROOT, child_env

WALL_BOUND_S = 10.0
START_TIMEOUT_S = 600  # a cold numba cache compiles for minutes on a slow machine


def start(args, env, stdout=subprocess.DEVNULL, runner=None):
    cmd = [sys.executable, str(runner)] if runner else [sys.executable, "-m", "app"]
    return subprocess.Popen([*cmd, *map(str, args)], cwd=ROOT, env=env, stdout=stdout, stderr=subprocess.PIPE,
                            text=True)


def wait_for(pred, timeout, proc=None, what=""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the app exited ({proc.returncode}) before {what}: {proc.stderr.read()[-2000:]}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def stop_and_time(proc, sig=signal.SIGTERM) -> tuple[float, str]:
    """Send ``sig``; the wall seconds until the process is gone (without reading its stdout) and its stderr."""
    t0 = time.monotonic()
    proc.send_signal(sig)
    try:
        proc.wait(timeout=WALL_BOUND_S + 20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"still running {WALL_BOUND_S + 20:g} s after {sig.name}") from None
    return time.monotonic() - t0, proc.stderr.read()


def self_reported_stop_s(err: str) -> float | None:
    m = re.search(r"stopped (\d+\.\d+) s after the signal", err)
    return float(m.group(1)) if m else None


def reap(proc):
    if proc.poll() is None:
        proc.kill()
    proc.wait()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_request_during_a_cold_compile_ends_the_app_at_once(tmp_path, model_path, notify_socket, sig):
    cache = tmp_path / "numba-cache"
    cache.mkdir()  # empty: every kernel compiles, for 20 s to minutes
    env = child_env(NUMBA_CACHE_DIR=str(cache), NOTIFY_SOCKET=notify_socket.path)
    proc = start(["--source", "demo", "--model", model_path, "--preview", "none", "--no-tracks"], env)
    try:
        wait_for(lambda: notify_socket.texts("STATUS=warming up"), START_TIMEOUT_S, proc, "the warm-up")
        time.sleep(1.0)  # inside the compile now
        assert proc.poll() is None
        wall, err = stop_and_time(proc, sig)
    finally:
        reap(proc)
    assert proc.returncode == 0, err
    assert f"{sig.name} while compiling the kernels" in err
    assert self_reported_stop_s(err) < STOP_BOUND_S
    assert wall < WALL_BOUND_S
    assert not notify_socket.times("READY=1")
    assert notify_socket.times("STOPPING=1")


def test_a_stdout_pipe_nobody_reads_does_not_hold_a_stop(tmp_path, model_path, notify_socket):
    """``--log - | sleep 40``: the pipe fills, the frame loop blocks in write(), which Python retries after
    every signal; the stop still comes within the bound."""
    env = child_env(NOTIFY_SOCKET=notify_socket.path)
    proc = start(["--source", "demo", "--fps", "0", "--model", model_path, "--preview", "none", "--no-tracks",
                  "--log", "-"], env, stdout=subprocess.PIPE)  # never read
    try:
        wait_for(lambda: notify_socket.times("READY=1"), START_TIMEOUT_S, proc, "READY")

        def stalled():  # the loop sends a status every second while it runs: none for 2 s means it is stuck
            statuses = [t for t, m in list(notify_socket.messages) if m.startswith("STATUS=")]
            return bool(statuses) and time.monotonic() - statuses[-1] > 2.0

        wait_for(stalled, 120, proc, "the pipe to fill")
        wall, err = stop_and_time(proc)
    finally:
        reap(proc)
        if proc.stdout:
            proc.stdout.close()
    assert proc.returncode == 0, err
    assert self_reported_stop_s(err) < STOP_BOUND_S
    assert "stuck while running the frame loop" in err
    assert wall < WALL_BOUND_S


def test_a_log_fifo_without_a_reader_neither_hangs_the_start_nor_a_stop(tmp_path, model_path, notify_socket):
    fifo = tmp_path / "log.fifo"
    os.mkfifo(fifo)
    env = child_env(NOTIFY_SOCKET=notify_socket.path)
    proc = start(["--source", "demo", "--model", model_path, "--preview", "none", "--no-tracks", "--log", fifo],
                 env)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while proc.poll() is None and time.monotonic() < deadline and not notify_socket.times("READY=1"):
            if notify_socket.texts("STATUS=warming up"):
                time.sleep(3.0)  # past the warm-up (the cache is warm by now): at the log's open, or READY
                break
            time.sleep(0.05)
        if proc.poll() is not None:  # refused at once, naming the FIFO: fine
            err = proc.stderr.read()
            assert proc.returncode == 78 and str(fifo) in err, err
            return
        wall, err = stop_and_time(proc)
    finally:
        reap(proc)
    assert proc.returncode == 0, err
    assert wall < WALL_BOUND_S
    reported = self_reported_stop_s(err)
    assert reported is None or reported < STOP_BOUND_S


@pytest.mark.parametrize("kind", ["fifo", "directory"])
@pytest.mark.parametrize("via", ["flag", "config"])
def test_a_recording_that_cannot_be_a_file_is_refused_at_start(tmp_path, kind, via):
    target = tmp_path / "rec.mp4"
    if kind == "fifo":
        os.mkfifo(target)
    else:
        target.mkdir()
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[preview]\nrecord = "{target}"\n' if via == "config" else "")
    args = ["--config", cfg, "--source", "demo", "--preview", "none", "--model", tmp_path / "never-read.xnc"]
    r = subprocess.run([sys.executable, "-m", "app", *map(str, args), *(["--record", target] if via == "flag" else [])],
                       cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == (2 if via == "flag" else 78), r.stderr
    assert f"is a {'FIFO' if kind == 'fifo' else 'directory'}" in r.stderr and "model" not in r.stderr


def test_a_recorder_whose_path_became_a_fifo_does_not_block(tmp_path, caplog):
    from app.sinks import Recorder

    target = tmp_path / "rec.mp4"
    rec = Recorder(str(target))
    os.mkfifo(target)  # made after the start-up check
    writer = threading.Thread(target=rec.write, args=(np.zeros((48, 64, 3), np.uint8),), daemon=True)
    writer.start()
    writer.join(10)
    assert not writer.is_alive(), "writing the first frame blocked on the FIFO"
    assert rec.frames == 0 and "is a FIFO" in caplog.text


# Blocks the frame loop inside a C call that Python restarts after every signal (PEP 475), from frame K on.
STUCK_RUNNER = textwrap.dedent(
    """
    import os, sys
    sys.path.insert(0, {root!r})
    import app.detector as d
    K = int(os.environ["STUCK_AT_FRAME"])
    orig = d.Detector.detect
    seen = [0]
    r, w = os.pipe()
    def detect(self, image):
        if image.shape[:2] != (self.input_size[1], self.input_size[0]):  # not the warm-up frame
            seen[0] += 1
            if seen[0] == K:
                print("STUCK", flush=True, file=sys.stderr)
                os.read(r, 1)  # nobody ever writes
        return orig(self, image)
    d.Detector.detect = detect
    from app.__main__ import main
    sys.exit(main(sys.argv[1:]))
    """
)


def test_a_main_thread_stuck_in_c_still_stops_within_the_bound(tmp_path, model_path):
    runner = tmp_path / "runner.py"
    runner.write_text(STUCK_RUNNER.format(root=str(ROOT)))
    log = tmp_path / "log.jsonl"
    proc = start(["--source", "demo", "--fps", "0", "--model", model_path, "--preview", "none", "--no-tracks",
                  "--log", log], child_env(STUCK_AT_FRAME="5"), runner=runner)
    try:
        wait_for(lambda: log.exists() and log.read_bytes().count(b"\n") >= 4, START_TIMEOUT_S, proc, "4 frames")
        time.sleep(0.5)
        wall, err = stop_and_time(proc)
    finally:
        reap(proc)
    assert proc.returncode == 0, err
    assert "STUCK" in err and "stuck while running the frame loop" in err
    assert 1.0 <= self_reported_stop_s(err) < STOP_BOUND_S  # the clean stop was given its grace first
    assert wall < WALL_BOUND_S
    assert log.read_bytes().endswith(b"\n")  # whole lines: the frames before were written whole


# --- the stop thread in this process, with the exit recorded instead of taken ------------------------------


class Exits:
    def __init__(self):
        self.at: list[float] = []
        self.called = threading.Event()

    def __call__(self, code):
        self.at.append(time.monotonic())
        self.called.set()


@pytest.fixture
def stopper():
    made = []

    def make(**kw):
        exits = Exits()
        s = StopRequests(threading.Event(), exit=exits, **kw).install()
        made.append(s)
        return s, exits

    yield make
    for s in made:
        s.uninstall()


def test_before_the_loop_runs_a_signal_exits_at_once(stopper):
    s, exits = stopper()
    s.phase = "compiling the kernels"
    t0 = time.monotonic()
    os.kill(os.getpid(), signal.SIGTERM)
    assert exits.called.wait(5)
    assert s.stop.is_set() and exits.at[0] - t0 < 1.0


def test_while_the_loop_runs_the_clean_stop_gets_its_grace_then_the_exit(stopper):
    s, exits = stopper(grace_s=0.3)
    s.running("running the frame loop")
    t0 = time.monotonic()
    os.kill(os.getpid(), signal.SIGTERM)
    assert s.stop.wait(2)
    assert exits.called.wait(5)
    assert 0.3 <= exits.at[0] - t0 < 2.0


def test_a_clean_stop_within_the_grace_is_not_cut_short(stopper):
    s, exits = stopper(grace_s=0.5)
    s.running("running the frame loop")
    os.kill(os.getpid(), signal.SIGTERM)
    assert s.stop.wait(2)
    s.uninstall()  # the run returned
    time.sleep(0.8)
    assert not exits.at


def test_a_second_signal_exits_at_once(stopper):
    s, exits = stopper(grace_s=30)
    s.running("running the frame loop")
    os.kill(os.getpid(), signal.SIGTERM)
    assert s.stop.wait(2)
    time.sleep(0.1)
    t0 = time.monotonic()
    os.kill(os.getpid(), signal.SIGINT)
    assert exits.called.wait(5) and exits.at[0] - t0 < 1.0


@pytest.mark.parametrize("exiting, rc", [(True, 0), (False, -signal.SIGTERM)])
def test_a_stop_request_after_the_run_ends_the_program_with_0(exiting, rc):
    """A second SIGTERM that lands after the clean stop finished (the run's handlers gone, the interpreter
    ending) exits 0, as during the run; a caller in one process gets its previous handlers back instead."""
    code = ("import os, signal, threading, time\n"
            "from app.stop import StopRequests\n"
            "s = StopRequests(threading.Event()).install()\n"
            f"s.uninstall(exiting={exiting})\n"
            "os.kill(os.getpid(), signal.SIGTERM)\n"
            "time.sleep(5)\n"
            "raise SystemExit(3)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == rc, r.stderr


def test_the_program_asks_for_the_exit_after_its_run():
    """The module run as a program ends its run with uninstall(exiting=True); main() called in one process not."""
    import ast

    tree = ast.parse((ROOT / "app" / "__main__.py").read_text())
    calls = {ast.unparse(n) for n in ast.walk(tree) if isinstance(n, ast.Call)}
    assert "main(as_program=True)" in calls and "stopper.uninstall(exiting=as_program)" in calls
