"""Signals: SIGTERM (also mid-frame and mid-outage) stops ``python -m app`` cleanly with exit 0 within 2 s and a
whole log; SIGKILL leaves a log whose only possible damage is a torn final line, and a restart appends cleanly."""

from __future__ import annotations

import random
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from tests.reliability.logread import LogCorrupt, frames_and_events, parse_log, read_log
from tests.reliability.support import ROOT, child_env

# Runs the app with detect() wrapped so that SIGTERM arrives while frame K is being detected.
MID_FRAME_RUNNER = textwrap.dedent(
    """
    import os, signal, sys, time
    sys.path.insert(0, {root!r})
    import app.detector as d
    K = int(os.environ["SIGTERM_AT_FRAME"])
    orig = d.Detector.detect
    seen = [0]
    def detect(self, image):
        if image.shape[:2] != (self.input_size[1], self.input_size[0]):  # not the warm-up frame
            seen[0] += 1
            if seen[0] == K:
                print(f"SIGTERM-SENT {{time.monotonic()}}", file=sys.stderr, flush=True)
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)  # still inside this frame when the handler has run
        return orig(self, image)
    d.Detector.detect = detect
    from app.__main__ import main
    sys.exit(main(sys.argv[1:]))
    """
)


def processed_in_summary(stderr: str) -> int:
    m = re.search(r"stopped: processed=(\d+)", stderr)
    assert m, stderr
    return int(m.group(1))


def start_app(args, env=None, runner=None):
    cmd = [sys.executable, str(runner)] if runner else [sys.executable, "-m", "app"]
    return subprocess.Popen([*cmd, *map(str, args)], cwd=ROOT, env=env or child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for_lines(proc, log, n, timeout=90):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and log.read_bytes().count(b"\n") >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"the app exited early ({proc.returncode}): {proc.communicate()[1]}")
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"fewer than {n} log lines after {timeout} s")


def sigterm_and_wait(proc) -> tuple[str, float]:
    """SIGTERM ``proc`` and wait for it: its stderr and the seconds it took to exit."""
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=10)
    return err, time.monotonic() - t0


def test_sigterm_inside_a_frame_finishes_that_frame_and_exits_0(tmp_path, model_path, notify_socket):
    runner = tmp_path / "runner.py"
    runner.write_text(MID_FRAME_RUNNER.format(root=str(ROOT)))
    log = tmp_path / "log.jsonl"
    env = child_env(SIGTERM_AT_FRAME="25", NOTIFY_SOCKET=notify_socket.path)
    proc = start_app(["--source", "demo", "--fps", "0", "--model", model_path, "--preview", "none", "--log", log],
                     env=env, runner=runner)
    try:
        _, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    exited = time.monotonic()
    assert proc.returncode == 0, err
    sent = float(re.search(r"SIGTERM-SENT (\S+)", err).group(1))
    assert exited - sent < 2.0
    assert "stopped_by=signal" in err
    records, _ = read_log(log, allow_torn_tail=False)
    frames, events = frames_and_events(records)
    # The frame being detected when the signal came was finished and logged; no frame after it was started.
    assert len(frames) == 25 == processed_in_summary(err)
    assert not [e for e in events if e["event"].startswith("source_")]  # no outage; track events may come
    assert [f["seq"] for f in frames] == sorted({f["seq"] for f in frames})
    assert notify_socket.times("STOPPING=1"), "no STOPPING=1"


def test_sigterm_at_a_random_moment_exits_0_within_2s_with_a_whole_log(tmp_path, model_path):
    log = tmp_path / "log.jsonl"
    proc = start_app(["--source", "demo", "--fps", "0", "--model", model_path, "--preview", "none", "--log", log])
    try:
        wait_for_lines(proc, log, 10)
        time.sleep(random.uniform(0.0, 0.3))
        err, elapsed = sigterm_and_wait(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert elapsed < 2.0
    records, _ = read_log(log, allow_torn_tail=False)
    frames, _ = frames_and_events(records)
    assert len(frames) == processed_in_summary(err) >= 10


def test_sigterm_while_the_camera_hangs_exits_0_within_2s(tmp_path, model_path, fake_camera):
    make_env, _ = fake_camera
    cfg = tmp_path / "config.toml"
    cfg.write_text('[source]\nspec = "picamera2"\nhang_timeout_s = 60.0\n')
    log = tmp_path / "log.jsonl"
    proc = start_app(["--config", cfg, "--model", model_path, "--preview", "none", "--log", log],
                     env=make_env("12:hang"))
    try:
        # Capture 12 stalls. The fake camera is unpaced and the slot keeps only the newest frame, so on a busy
        # machine fewer than 12 are detected: wait for the log to stop growing, not for a number of lines.
        wait_for_lines(proc, log, 1)
        lines, still_since = -1, time.monotonic()
        while time.monotonic() - still_since < 1.0:
            n = log.read_bytes().count(b"\n")
            if n != lines:
                lines, still_since = n, time.monotonic()
            assert proc.poll() is None, proc.communicate()[1]
            time.sleep(0.05)
        # the capture thread is now stuck inside the driver call
        err, elapsed = sigterm_and_wait(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert elapsed < 2.0
    records, _ = read_log(log, allow_torn_tail=False)
    frames, _ = frames_and_events(records)
    assert 1 <= len(frames) == processed_in_summary(err) <= 12


def test_sigkill_leaves_a_readable_log_and_a_restart_appends_cleanly(tmp_path, model_path):
    log = tmp_path / "log.jsonl"
    args = ["--source", "demo", "--fps", "0", "--model", model_path, "--preview", "none", "--log", log]
    total = lines = 0  # frame lines, and all lines (track events too)
    for run in range(3):
        proc = start_app(args)
        try:
            wait_for_lines(proc, log, lines + 5)
            time.sleep(random.uniform(0.0, 0.2))
            proc.kill()
            proc.wait(10)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == -signal.SIGKILL
        records, tail = read_log(log)  # at most a torn final line
        frames, _ = frames_and_events(records)
        assert len(frames) > total, f"run {run} added no line"
        total, lines = len(frames), len(records)
    # A clean run after the kills: everything it and they wrote reads back.
    proc = start_app([*args, "--max-frames", "5"])
    _, err = proc.communicate(timeout=90)
    assert proc.returncode == 0, err
    records, _ = read_log(log, allow_torn_tail=False)
    frames, _ = frames_and_events(records)
    assert len(frames) == total + 5
    new = [f["seq"] for f in frames[-5:]]
    assert new == sorted(set(new)) and new[0] < frames[-6]["seq"]  # the new run counts from its own start


def test_reader_tolerates_exactly_one_torn_final_line():
    good = b'{"v":1,"seq":0}\n{"v":1,"seq":1}\n'
    assert parse_log(good) == ([{"v": 1, "seq": 0}, {"v": 1, "seq": 1}], b"")
    records, tail = parse_log(good + b'{"v":1,"se')
    assert len(records) == 2 and tail == b'{"v":1,"se'
    with pytest.raises(LogCorrupt):
        parse_log(b'{"v":1,"seq":0}\n{"v":1,"se\n{"v":1,"seq":2}\n')  # a torn line that is not the last
    with pytest.raises(LogCorrupt):
        parse_log(b'{"v":1,"se\n{"v":1,"seq":2')  # a torn middle line and a torn tail
    with pytest.raises(LogCorrupt):
        parse_log(good + b"\n")  # an empty line is not a record
    with pytest.raises(LogCorrupt):
        parse_log(b"[1,2]\n")


def test_restart_after_a_torn_final_line_leaves_a_log_every_reader_can_parse(tmp_path, model_path):
    log = tmp_path / "log.jsonl"
    args = ["--source", "demo", "--fps", "0", "--model", model_path, "--preview", "none", "--log", log, "--no-tracks"]
    proc = start_app([*args, "--max-frames", "5"])
    assert proc.wait(90) == 0
    log.write_bytes(log.read_bytes()[:-40])  # what a power cut in the middle of a line leaves
    records, tail = read_log(log)
    assert len(records) == 4 and tail
    proc = start_app([*args, "--max-frames", "5"])
    assert proc.wait(90) == 0
    records, tail = read_log(log)
    # The torn fragment is gone (it can never be completed); the 4 whole lines and the 5 new ones remain.
    assert len(frames_and_events(records)[0]) == 9 and not tail
