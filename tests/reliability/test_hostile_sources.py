"""Hostile sources through ``python -m app``: a finite source with bad files plays once and ends; a
decompression bomb is refused from its header without the memory its pixels would take; permanent source
errors exit 65 or 78 at once instead of retrying forever; a stream that accepts and never sends is an outage
with events, and SIGTERM still stops it."""

from __future__ import annotations

import importlib.util
import json
import signal
import socket
import subprocess
import sys
import threading
import time

import cv2
import numpy as np
import pytest

from tests.hostile_images import good_image, header_bomb, png_bomb
from tests.reliability.logread import frames_and_events, read_log
from tests.reliability.support import ROOT, child_env, run_app, unit_restart_prevent_codes

# A cold numba cache compiles for minutes on a slow machine; what is timed here starts after that.
APP_TIMEOUT_S = 600


def start_app(args, env=None):
    return subprocess.Popen([sys.executable, "-m", "app", *map(str, args)], cwd=ROOT, env=env or child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_folder_with_bad_files_plays_once_and_ends(tmp_path, model_path):
    """The reported case (a good JPEG and a 1x1 PNG, --fps 0, no --loop) and its relatives in one folder."""
    d = tmp_path / "images"
    d.mkdir()
    good_image(d / "a.jpg", 40, size=(240, 320))
    cv2.imwrite(str(d / "b.png"), np.zeros((1, 1, 3), np.uint8))
    header_bomb(d / "c.png", "png", 20000, 20000)  # more pixels than OpenCV allows at all
    png_bomb(d / "d.png", 6000, 6000)  # a real bomb, under OpenCV's limit and over ours
    good_image(d / "e.jpg", 80, size=(240, 320))
    (d / "f.jpg").write_bytes((d / "e.jpg").read_bytes()[:300])  # truncated
    good_image(d / "g.png", 120, size=(240, 320))
    log = tmp_path / "log.jsonl"
    r = run_app("--source", f"images:{d}", "--fps", "0", "--model", model_path, "--preview", "none",
                "--log", log, "--no-tracks", timeout=APP_TIMEOUT_S)
    assert r.returncode == 0, r.stderr
    assert "stopped_by=source ended" in r.stderr
    records, _ = read_log(log, allow_torn_tail=False)
    frames, events = frames_and_events(records)
    assert [f["seq"] for f in frames] == [0, 1, 2]  # every good image once, nothing replayed
    skips = [e for e in events if e["event"] == "source_skip"]
    assert [s["item"].rsplit("/", 1)[1] for s in skips] == ["b.png", "c.png", "d.png", "f.jpg"]
    assert "20000x20000" in skips[1]["reason"] and "6000x6000" in skips[2]["reason"]
    assert not [e for e in events if e["event"] == "source_error"]
    for name in ("b.png", "c.png", "d.png", "f.jpg"):
        assert r.stderr.count(f"skipping {d / name}") == 1


BOMB_CHILD = """
import resource, sys
sys.path.insert(0, {root!r})
from app.sources import ImagesSource, frames
got = len(list(frames(ImagesSource({folder!r}, fps=0))))
print(got, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


def _peak_rss_mb(folder) -> tuple[int, int]:
    r = subprocess.run([sys.executable, "-c", BOMB_CHILD.format(root=str(ROOT), folder=str(folder))],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    got, rss = map(int, r.stdout.split())
    return got, rss


def test_a_decompression_bomb_costs_no_memory(tmp_path):
    """A 8000x8000 PNG of a few tens of kB would take 192 MB as BGR: refused from its header, the peak RSS
    stays where a folder without it leaves it."""
    plain, bomb = tmp_path / "plain", tmp_path / "bomb"
    for d in (plain, bomb):
        d.mkdir()
        good_image(d / "a.png", 10, size=(240, 320))
    png_bomb(bomb / "b.png", 8000, 8000)
    assert (bomb / "b.png").stat().st_size < 200_000
    got_plain, rss_plain = _peak_rss_mb(plain)
    got_bomb, rss_bomb = _peak_rss_mb(bomb)
    assert got_plain == got_bomb == 1
    assert rss_bomb - rss_plain < 40, f"peak RSS {rss_bomb} MB with the bomb, {rss_plain} MB without"


def _bad_only_folder(tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    cv2.imwrite(str(d / "a.png"), np.zeros((1, 1, 3), np.uint8))
    header_bomb(d / "b.jpg", "jpeg")
    return f"images:{d}"


def _video(tmp_path, data: bytes):
    p = tmp_path / "clip.mp4"
    p.write_bytes(data)
    return f"opencv:{p}"


PERMANENT = {
    "empty video file": (lambda t: _video(t, b""), 65, "could not open"),
    "corrupt video file": (lambda t: _video(t, b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 40), 65,
                           "could not open"),
    "a folder of only bad images": (_bad_only_folder, 65, "no usable image files"),
}


@pytest.mark.parametrize("name", list(PERMANENT))
def test_a_permanent_source_error_exits_at_once_instead_of_retrying(name, tmp_path, model_path):
    make, code, words = PERMANENT[name]
    log = tmp_path / "log.jsonl"
    cfg = tmp_path / "c.toml"
    cfg.write_text("[source]\nbackoff_initial_s = 0.05\nbackoff_max_s = 0.1\n")
    r = run_app("--config", cfg, "--source", make(tmp_path), "--fps", "0", "--model", model_path,
                "--preview", "none", "--log", log, "--no-tracks", timeout=APP_TIMEOUT_S)
    assert r.returncode == code, r.stderr
    assert code in unit_restart_prevent_codes()
    assert "source refused" in r.stderr and words in r.stderr
    _, events = frames_and_events(read_log(log, allow_torn_tail=False)[0])
    errors = [e for e in events if e["event"] == "source_error"]
    assert len(errors) == 1 and errors[0]["permanent"] is True and words in errors[0]["message"]


@pytest.mark.skipif(importlib.util.find_spec("picamera2") is not None, reason="picamera2 is installed here")
def test_picamera2_without_the_module_exits_78_before_the_model_loads(tmp_path):
    r = run_app("--source", "picamera2", "--model", tmp_path / "never-read.xnc", "--preview", "none", timeout=120)
    assert r.returncode == 78, r.stderr
    assert "picamera2 module is not installed" in r.stderr and "python3-picamera2" in r.stderr
    assert "model file refused" not in r.stderr  # refused before the model is even looked at


class SilentServer:
    """Accepts TCP connections and never sends a byte (a camera's web server that has hung)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.accepted, self.conns = 0, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                c, _ = self.sock.accept()
            except OSError:
                continue
            self.accepted += 1
            self.conns.append(c)

    def close(self):
        self._stop.set()
        self._thread.join(2)
        for c in self.conns:
            c.close()
        self.sock.close()


@pytest.mark.parametrize("scheme", ["http", "rtsp"])
def test_a_stream_that_accepts_and_never_sends_is_an_outage_with_events(scheme, tmp_path, model_path):
    server = SilentServer()
    cfg = tmp_path / "c.toml"
    cfg.write_text("[source]\nhang_timeout_s = 1.0\nbackoff_initial_s = 0.2\nbackoff_max_s = 0.4\n")
    log = tmp_path / "log.jsonl"
    proc = start_app(["--config", cfg, "--source", f"opencv:{scheme}://127.0.0.1:{server.port}/stream",
                      "--model", model_path, "--preview", "none", "--log", log, "--no-tracks"])
    try:
        deadline = time.monotonic() + APP_TIMEOUT_S
        errors = []
        while time.monotonic() < deadline and len(errors) < 3 and proc.poll() is None:
            time.sleep(0.2)
            if log.exists():
                errors = [json.loads(x) for x in log.read_text().splitlines() if '"source_error"' in x]
        assert len(errors) >= 3, f"no outage events from a silent stream: {errors}"
        assert all(e["stage"] == "open" and "retry_in_s" in e and not e.get("permanent") for e in errors)
        assert server.accepted >= 3  # it did connect: each attempt gave up after the timeout and retried
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert time.monotonic() - t0 < 5.0  # the documented 2 s plus process teardown on a loaded machine
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        server.close()
