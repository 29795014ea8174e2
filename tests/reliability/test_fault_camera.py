"""Camera faults: a source that raises, hangs or returns garbage is logged, reopened with backoff, and the
watchdog stays honest (no pings while wedged), both in-process and through ``python -m app``."""

from __future__ import annotations

import time

import numpy as np

from app.capture import Capture
from app.pipeline import Pipeline
from app.service import Notifier
from app.sinks import JsonlLog
from tests.fakes.fake_source import FakeSource
from tests.reliability.logread import frames_and_events, read_log
from tests.reliability.support import run_app, run_pipeline


class ScriptedSource(FakeSource):
    """FakeSource plus the garbage it lacks: a 4-channel frame and an empty one."""

    def read(self):
        action = self.script.get(self.n)
        if action == "wrongshape":
            self.n += 1
            return np.zeros((24, 32, 4), np.uint8)
        if action == "empty":
            self.n += 1
            return np.zeros((0, 32), np.uint8)
        return super().read()


class BrokenOpen(FakeSource):
    def open(self):
        raise OSError("camera not detected")


SCRIPTS = [{5: "raise"}, {3: "garbage"}, {3: "wrongshape"}, {3: "empty"}, "open", "open", {4: "hang"}]
EXPECTED = [
    ("source_error", "read"), ("source_recovered", None),
    ("source_error", "garbage"), ("source_recovered", None),
    ("source_error", "garbage"), ("source_recovered", None),
    ("source_error", "garbage"),
    ("source_error", "open"), ("source_error", "open"), ("source_recovered", None),
    ("source_error", "hang"), ("source_recovered", None),
]


class StopWhen:
    """A null preview that counts the frames shown while ``counting()`` holds and stops the loop after ``n``."""

    needs_canvas = False
    stop_requested = False

    def __init__(self, counting, n):
        self.counting, self.n, self.counted = counting, n, 0

    def show(self, frame, canvas, detections, hud, marks=None):
        self.counted += bool(self.counting())
        self.stop_requested = self.counted >= self.n

    def close(self):
        pass


def test_raise_garbage_open_failure_and_hang_are_survived_and_logged(tmp_path, detector, notify_socket):
    made, opened_at = [], []

    def factory():
        opened_at.append(time.monotonic())
        script = SCRIPTS[len(made)] if len(made) < len(SCRIPTS) else {}
        made.append(BrokenOpen() if script == "open" else ScriptedSource(period=0.002, script=script))
        return made[-1]

    hang_s, backoff0, grace = 0.5, 0.05, 0.1
    cap = Capture(factory, hang_timeout_s=hang_s, backoff_initial_s=backoff0, backoff_max_s=0.4)
    log = JsonlLog(str(tmp_path / "log.jsonl"))
    notifier = Notifier(notify_socket.path, watchdog_period=0.08)
    preview = StopWhen(lambda: len(made) > len(SCRIPTS), 30)  # 30 frames once all faults are over
    p = Pipeline(cap, detector, log_sink=log, preview=preview, notifier=notifier, idle_grace_s=grace,
                 status_interval_s=0.05)
    stats = run_pipeline(cap, p, 30, log, notifier)
    time.sleep(0.1)  # let the receiver take the last datagrams

    assert stats.stopped_by == "preview closed", stats.summary()
    records, tail = read_log(log.path, allow_torn_tail=False)
    frames, events = frames_and_events(records)
    assert [(e["event"], e.get("stage")) for e in events] == EXPECTED
    garbage = [e["message"] for e in events if e.get("stage") == "garbage"]
    assert "float32" in garbage[0] and "(24, 32, 4)" in garbage[1] and "empty" in garbage[2]
    assert "camera unplugged" in events[0]["message"] and "camera not detected" in events[7]["message"]
    assert all(e["v"] == 1 and isinstance(e["mono_ms"], float) for e in events)

    # Reopened with backoff: the gaps between failed opens double.
    assert cap.reopens == len(SCRIPTS)
    gap_a, gap_b = opened_at[5] - opened_at[4], opened_at[6] - opened_at[5]
    assert gap_a >= 2 * backoff0 * 0.9 and gap_b >= 4 * backoff0 * 0.9 and gap_b > gap_a * 1.5

    # Continued: frames after the last recovery, every captured frame accounted for.
    last_recovery = events[-1]["mono_ms"]
    assert sum(f["mono_ms"] > last_recovery for f in frames) >= 29  # the first was captured just before
    seqs = [f["seq"] for f in frames]
    assert seqs == sorted(set(seqs))
    assert stats.captured == stats.processed + stats.dropped and stats.processed == len(frames)

    # The watchdog is honest: pings while frames flow, none while the camera is wedged or failing to open.
    pings = notify_socket.times("WATCHDOG=1")
    assert len(pings) >= 3
    t_hang_error, t_hang_recovered = events[10]["mono_ms"] / 1e3, events[11]["mono_ms"] / 1e3
    last_frame_before_hang = max(f["mono_ms"] for f in frames if f["mono_ms"] < events[10]["mono_ms"]) / 1e3
    assert t_hang_error - last_frame_before_hang >= hang_s * 0.9
    quiet_from = last_frame_before_hang + grace + 0.1
    assert not [t for t in pings if quiet_from < t < t_hang_recovered], "pinged while the camera hung"
    assert any(t >= t_hang_recovered for t in pings), "no pings after the camera came back"
    t_open_outage, t_open_recovered = events[6]["mono_ms"] / 1e3, events[9]["mono_ms"] / 1e3
    assert not [t for t in pings if t_open_outage + 0.05 < t < t_open_recovered], "pinged with no camera open"
    assert any("(source outage)" in s for s in notify_socket.texts("STATUS="))


def test_app_survives_camera_faults_and_keeps_the_watchdog_honest(tmp_path, model_path, fake_camera, notify_socket):
    make_env, marker = fake_camera
    cfg = tmp_path / "config.toml"
    cfg.write_text(
        '[source]\nspec = "picamera2"\nhang_timeout_s = 0.5\nbackoff_initial_s = 0.25\nbackoff_max_s = 0.5\n'
        "[watchdog]\nidle_grace_s = 0.1\nstatus_interval_s = 0.1\n"
    )
    log = tmp_path / "log.jsonl"
    env = make_env("20:raise,45:garbage,70:badshape,95:hang", NOTIFY_SOCKET=notify_socket.path, WATCHDOG_USEC="100000")
    r = run_app("--config", cfg, "--model", model_path, "--preview", "none", "--log", log, "--max-frames", 150,
                env=env, timeout=120)
    time.sleep(0.1)
    assert r.returncode == 0, r.stderr
    assert "stopped_by=max frames" in r.stderr
    records, _ = read_log(log, allow_torn_tail=False)
    frames, events = frames_and_events(records)
    assert [(e["event"], e.get("stage")) for e in events] == [
        ("source_error", "read"), ("source_recovered", None),
        ("source_error", "garbage"), ("source_recovered", None),
        ("source_error", "read"), ("source_recovered", None),
        ("source_error", "hang"), ("source_recovered", None),
    ]
    assert "device lost" in events[0]["message"] and "float32" in events[2]["message"]
    assert "lores buffer shape" in events[4]["message"] and "no frame" in events[6]["message"]
    # the sensor mode chosen before capture, the first open and four reopens
    assert marker.read_text().count("opened") == 6
    assert len(frames) == 150

    pings = notify_socket.times("WATCHDOG=1")
    ready = notify_socket.times("READY=1")
    assert len(ready) == 1 and pings and min(pings) > ready[0]
    assert notify_socket.times("STOPPING=1"), "no STOPPING=1 at exit"
    hang_error, hang_recovered = events[6]["mono_ms"] / 1e3, events[7]["mono_ms"] / 1e3
    last_frame = max(f["mono_ms"] for f in frames if f["mono_ms"] < events[6]["mono_ms"]) / 1e3
    assert hang_error - last_frame >= 0.45
    assert not [t for t in pings if last_frame + 0.1 + 0.1 < t < hang_recovered], "pinged while the camera hung"
    assert any(t > hang_recovered for t in pings)
    assert any("source outage" in s for s in notify_socket.texts("STATUS="))
