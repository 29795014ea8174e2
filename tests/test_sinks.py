"""Sinks: the JSON Lines log (schema, rotation, write failures), previews and the recorder."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from app import sinks
from app.config import ConfigError, SourceConfig
from app.sinks import (
    DrmPreview,
    JsonlLog,
    LogRefused,
    NullLog,
    NullPreview,
    Recorder,
    choose_preview_mode,
    frame_record,
    make_preview,
    open_log,
)
from app.sources import Frame, Picamera2Source, make_factory
from tests.fakes import fake_picamera2

NAMES = ["person"]
DETS = np.array([[10.04, 20.0, 110.0, 200.55, 0.91234, 0]], np.float32)


def record(seq=0, dets=DETS):
    f = Frame(np.zeros((240, 320), np.uint8), seq, 12.3456789)
    return frame_record(f, dets, NAMES, fps=7.891, latency_ms=123.456, dropped=4)


def lines_of(path):
    with open(path, "rb") as fh:
        return fh.read().decode().splitlines()


def check_schema(obj):
    assert obj["v"] == 1
    assert obj["time"].endswith("Z") and "T" in obj["time"]
    assert isinstance(obj["mono_ms"], float)
    assert isinstance(obj["seq"], int) and isinstance(obj["width"], int) and isinstance(obj["height"], int)
    for d in obj["detections"]:
        assert set(d) == {"label", "score", "box"} and len(d["box"]) == 4
    assert isinstance(obj["fps"], float) and isinstance(obj["latency_ms"], float)


def test_frame_record_schema():
    r = record(seq=5)
    check_schema(r)
    assert r["seq"] == 5 and (r["width"], r["height"]) == (320, 240)
    assert r["mono_ms"] == pytest.approx(12345.679, abs=1e-3)
    assert r["detections"] == [{"label": "person", "score": 0.9123, "box": [10.0, 20.0, 110.0, 200.6]}]
    assert r["fps"] == 7.89 and r["latency_ms"] == 123.46 and r["dropped"] == 4


def test_log_writes_whole_parseable_lines(tmp_path):
    path = tmp_path / "sub" / "log.jsonl"
    log = JsonlLog(str(path))
    for i in range(5):
        assert log.write(record(i))
    log.event({"event": "source_error", "stage": "read", "message": "x", "retry_in_s": 0.5})
    log.close()
    lines = lines_of(path)
    assert len(lines) == 6
    objs = [json.loads(line) for line in lines]
    for o in objs[:5]:
        check_schema(o)
    assert [o["seq"] for o in objs[:5]] == list(range(5))
    assert objs[5]["event"] == "source_error" and objs[5]["v"] == 1 and objs[5]["time"].endswith("Z")


def test_log_each_line_is_one_write(tmp_path):
    log = JsonlLog(str(tmp_path / "a.jsonl"))
    calls = []
    real = log._write

    def spy(fd, data):
        calls.append(data)
        return real(fd, data)

    log._write = spy
    log.write(record())
    assert len(calls) == 1 and calls[0].endswith(b"\n") and calls[0].count(b"\n") == 1


def test_only_detections(tmp_path):
    log = open_log(str(tmp_path / "d.jsonl"), only_detections=True)
    log.write(record(0, np.zeros((0, 6), np.float32)))
    log.write(record(1))
    log.close()
    assert [json.loads(x)["seq"] for x in lines_of(tmp_path / "d.jsonl")] == [1]


def test_unencodable_record_is_a_counted_failure(tmp_path, caplog):
    path = tmp_path / "nan.jsonl"
    log = JsonlLog(str(path))
    assert not log.write(record(0, np.array([[1, 2, 3, 4, np.nan, 0]], np.float32)))
    assert log.write(record(1))
    log.close()
    assert log.failures == 1 and "unencodable" in caplog.text
    assert [json.loads(x)["seq"] for x in lines_of(path)] == [1]


def test_rotation_keeps_n_files_of_bounded_size(tmp_path):
    path = tmp_path / "r.jsonl"
    one = len(json.dumps(record(), separators=(",", ":"))) + 1
    log = JsonlLog(str(path), max_bytes=3 * one + 10, files=3)
    for i in range(20):
        assert log.write(record(i))
    log.close()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["r.jsonl", "r.jsonl.1", "r.jsonl.2"]
    seqs = []
    for name in ["r.jsonl.2", "r.jsonl.1", "r.jsonl"]:
        assert os.path.getsize(tmp_path / name) <= 3 * one + 10
        seqs += [json.loads(x)["seq"] for x in lines_of(tmp_path / name)]
    assert seqs == list(range(seqs[0], 20))  # newest files, in order, nothing torn
    assert log.rotations >= 5


def test_single_file_rotation_truncates(tmp_path):
    path = tmp_path / "one.jsonl"
    log = JsonlLog(str(path), max_bytes=600, files=1)
    for i in range(30):
        log.write(record(i))
    log.close()
    assert [p.name for p in tmp_path.iterdir()] == ["one.jsonl"]
    assert os.path.getsize(path) <= 600
    assert json.loads(lines_of(path)[-1])["seq"] == 29


def test_stdout(capfd):
    log = open_log("-")
    log.write(record(3))
    log.close()
    out = capfd.readouterr().out.splitlines()
    assert json.loads(out[-1])["seq"] == 3
    assert isinstance(open_log(""), NullLog)


def test_enospc_is_counted_and_writing_resumes(tmp_path):
    path = tmp_path / "full.jsonl"
    log = JsonlLog(str(path))
    real = log._write
    state = {"fail": 0}

    def flaky(fd, data):
        if state["fail"] > 0:
            state["fail"] -= 1
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data)

    log._write = flaky
    log.write(record(0))
    state["fail"] = 3
    assert [log.write(record(i)) for i in (1, 2, 3)] == [False, False, False]
    assert log.write(record(4))
    log.close()
    assert log.failures == 3 and "ENOSPC" in log.last_error
    assert [json.loads(x)["seq"] for x in lines_of(path)] == [0, 4]


def test_short_write_is_cut_back_to_the_last_good_line(tmp_path):
    path = tmp_path / "short.jsonl"
    log = JsonlLog(str(path))
    real = log._write
    log.write(record(0))
    log._write = lambda fd, data: real(fd, data[: len(data) // 2])
    assert log.write(record(1)) is False
    log._write = real
    assert log.write(record(2))
    log.close()
    assert [json.loads(x)["seq"] for x in lines_of(path)] == [0, 2]


def test_short_write_that_cannot_be_cut_starts_a_fresh_line(tmp_path, monkeypatch):
    path = tmp_path / "fresh.jsonl"
    log = JsonlLog(str(path))
    real = log._write
    log.write(record(0))
    log._write = lambda fd, data: real(fd, data[:10])

    def no_truncate(fd, size):
        raise OSError(errno.EPERM, "nope")

    monkeypatch.setattr(sinks.os, "ftruncate", no_truncate)
    log.write(record(1))
    log._write = real
    log.write(record(2))
    log.close()
    lines = lines_of(path)
    assert len(lines) == 3
    assert json.loads(lines[0])["seq"] == 0 and json.loads(lines[2])["seq"] == 2
    with pytest.raises(json.JSONDecodeError):
        json.loads(lines[1])  # the torn fragment stands alone; the next line is whole


def test_eio_reopens_and_erofs_open_failures_are_counted(tmp_path, monkeypatch):
    path = tmp_path / "eio.jsonl"
    log = JsonlLog(str(path))
    real = log._write

    def eio(fd, data):
        raise OSError(errno.EIO, "Input/output error")

    log._write = eio
    assert not log.write(record(0))
    assert log._fd is None  # will reopen
    real_open = os.open
    monkeypatch.setattr(sinks.os, "open", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EROFS, "Read-only file system")))
    log._write = real
    assert not log.write(record(1))
    assert "EROFS" in log.last_error
    monkeypatch.setattr(sinks.os, "open", real_open)
    assert log.write(record(2))
    log.close()
    assert log.failures == 2
    assert [json.loads(x)["seq"] for x in lines_of(path)] == [2]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux /dev/full")
def test_dev_full_never_raises():
    log = JsonlLog("/dev/full")
    assert [log.write(record(i)) for i in range(3)] == [False] * 3
    assert log.failures == 3 and "ENOSPC" in log.last_error
    log.close()


def test_torn_last_line_from_a_crash_is_cut_off_on_open(tmp_path, caplog):
    path = tmp_path / "crash.jsonl"
    path.write_bytes(b'{"v":1,"seq":0}\n{"v":1,"se')
    log = JsonlLog(str(path))
    log.write(record(1))
    log.close()
    lines = lines_of(path)
    assert lines[0] == '{"v":1,"seq":0}' and json.loads(lines[1])["seq"] == 1 and len(lines) == 2
    assert "torn last line" in caplog.text
    only_torn = tmp_path / "torn.jsonl"
    only_torn.write_bytes(b'{"v":1,"s')
    log = JsonlLog(str(only_torn))
    log.write(record(2))
    log.close()
    assert [json.loads(x)["seq"] for x in lines_of(only_torn)] == [2]


def test_torn_last_line_that_cannot_be_cut_is_not_glued_onto(tmp_path, monkeypatch):
    path = tmp_path / "crash.jsonl"
    path.write_bytes(b'{"v":1,"seq":0}\n{"v":1,"se')

    def no_truncate(fd, size):
        raise OSError(errno.EPERM, "nope")

    monkeypatch.setattr(sinks.os, "ftruncate", no_truncate)
    log = JsonlLog(str(path))
    log.write(record(1))
    log.close()
    lines = lines_of(path)
    assert lines[-2] == '{"v":1,"se' and json.loads(lines[-1])["seq"] == 1


# --- previews ---------------------------------------------------------------------------------


def mode_of(*args, **kwargs) -> str:
    return choose_preview_mode(*args, **kwargs)[0]


def drm_sysfs(tmp_path, **connectors):
    """A /sys/class/drm with connectors' status files: drm_sysfs(tmp_path, HDMI_A_1="connected")."""
    root = tmp_path / "drm"
    root.mkdir(exist_ok=True)
    (root / "card1").mkdir(exist_ok=True)  # the card itself has no status file
    for name, status in connectors.items():
        d = root / f"card1-{name.replace('_', '-')}"
        d.mkdir(exist_ok=True)
        (d / "status").write_text(status + "\n")
    return str(root)


def test_choose_preview_mode(caplog, monkeypatch, tmp_path):
    hdmi = drm_sysfs(tmp_path, HDMI_A_1="connected", Writeback_1="unknown")
    assert mode_of("auto", "picamera2", {}, drm_root=hdmi, taken=lambda c: False) == "drm"
    assert mode_of("none", "picamera2", {}) == "none"
    mode, why = choose_preview_mode("auto", "demo", {})
    assert mode == "none" and "no display" in why and "--web 127.0.0.1:8080" in why
    assert "the picture is on the web preview" in choose_preview_mode("auto", "demo", {}, web=True)[1]
    monkeypatch.setattr(sinks, "cv2_has_gui", lambda: True)
    assert mode_of("auto", "demo", {"DISPLAY": ":0"}) == "window"
    assert mode_of("auto", "demo", {"WAYLAND_DISPLAY": "wayland-0"}, web=True) == "window"
    monkeypatch.setattr(sinks, "cv2_has_gui", lambda: False)
    mode, why = choose_preview_mode("auto", "demo", {"DISPLAY": ":0"})
    assert mode == "none" and "opencv-python-headless" in why and "pip install opencv-python" in why
    assert mode_of("auto", "demo", {"DISPLAY": ":0"}, web=True) == "browser"
    assert mode_of("browser", "demo", {}, web=True) == "browser"
    caplog.clear()
    assert mode_of("window", "demo", {"DISPLAY": ":0"}) == "none"
    assert caplog.text.count("no GUI support") == 1
    assert mode_of("drm", "images:x", {}) == "none"
    assert "needs the picamera2 source" in caplog.text


def test_a_preview_that_cannot_work_is_refused_naming_the_fix(monkeypatch):
    monkeypatch.setattr(sinks, "cv2_has_gui", lambda: False)
    with pytest.raises(ConfigError) as e:
        sinks.check_preview_mode("window", "demo", web=False)
    text = str(e.value)
    assert "\n" not in text and "opencv-python-headless" in text and "--web 127.0.0.1:8080" in text
    assert "pip install opencv-python" in text
    with pytest.raises(ConfigError, match="--web 127.0.0.1:8080"):
        sinks.check_preview_mode("browser", "demo", web=False)
    for mode in ("auto", "none", "drm"):
        sinks.check_preview_mode(mode, "demo", web=False)
    sinks.check_preview_mode("browser", "demo", web=True)
    monkeypatch.setattr(sinks, "cv2_has_gui", lambda: True)
    sinks.check_preview_mode("window", "demo", web=False)


def test_auto_says_once_what_it_chose_and_why(caplog, monkeypatch):
    caplog.set_level("INFO")
    monkeypatch.setattr(sinks, "cv2_has_gui", lambda: False)
    p = make_preview("auto", "demo", NAMES, {"DISPLAY": ":0"}, web_url="http://127.0.0.1:8080/")
    assert p.name == "browser" and p.url == "http://127.0.0.1:8080/"
    lines = [r for r in caplog.records if r.message.startswith("preview:")]
    assert len(lines) == 1 and lines[0].levelname == "INFO"
    assert "browser" in lines[0].message and "opencv-python-headless" in lines[0].message
    caplog.clear()
    make_preview("none", "demo", NAMES, {"DISPLAY": ":0"})
    assert not [r for r in caplog.records if r.message.startswith("preview:")]  # only auto is explained


def test_browser_preview_opens_the_page_once(caplog):
    import threading

    opened = []
    done = threading.Event()

    def opener(url):
        opened.append(url)
        done.set()
        return True

    p = sinks.BrowserPreview("http://127.0.0.1:9/", opener=opener)
    p.open()
    assert done.wait(5) and opened == ["http://127.0.0.1:9/"]
    p.show(None, None, np.zeros((0, 6), np.float32), None)
    p.close()
    done.clear()
    q = sinks.BrowserPreview("http://127.0.0.1:9/", opener=lambda url: done.set() or False)
    q.open()
    assert done.wait(5)
    deadline = time.monotonic() + 5
    while "open http://127.0.0.1:9/ yourself" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.01)
    assert "open http://127.0.0.1:9/ yourself" in caplog.text


def test_headless_opencv_is_detected():
    # The dev venv and CI use opencv-python-headless: no highgui.
    import cv2 as _cv2

    has_gui = "GUI:                           NONE" not in _cv2.getBuildInformation()
    assert sinks.cv2_has_gui() == has_gui


def test_make_preview_resolves_the_mode_and_names_what_it_made(monkeypatch, tmp_path):
    hdmi = drm_sysfs(tmp_path, HDMI_A_1="connected")
    assert make_preview("auto", "picamera2", NAMES, {}, drm_root=hdmi, taken=lambda c: False).name == "drm"
    assert isinstance(make_preview("drm", "picamera2", NAMES, {}, drm_root=hdmi, taken=lambda c: False),
                      DrmPreview)
    assert make_preview("drm", "demo", NAMES, {}).name == "none"  # DRM is picamera2's own preview
    assert make_preview("none", "picamera2", NAMES, {}).name == "none"
    monkeypatch.setattr(sinks, "cv2_has_gui", lambda: False)
    assert make_preview("auto", "demo", NAMES, {"DISPLAY": ":0"}).name == "none"
    assert make_preview("auto", "demo", NAMES, {"DISPLAY": ":0"}, web_url="http://x/").name == "browser"
    assert make_preview("auto", "demo", NAMES, {}, web_url="http://x/").name == "none"


def test_window_that_cannot_open_falls_back_to_null(monkeypatch, caplog):
    if sinks.cv2_has_gui():
        pytest.skip("this OpenCV has GUI support")
    # Claim GUI support so the window is really tried: headless OpenCV refuses namedWindow.
    monkeypatch.setattr(sinks, "cv2_has_gui", lambda: True)
    p = make_preview("window", "demo", NAMES, {"DISPLAY": ":0"})
    assert isinstance(p, NullPreview) and p.name == "none" and "unavailable" in caplog.text


@pytest.fixture
def fake_cam(monkeypatch):
    module = fake_picamera2.make_module()
    monkeypatch.setitem(sys.modules, "picamera2", module)
    return module


def test_drm_preview_shows_the_camera_and_sets_an_rgba_overlay_of_the_drawings(fake_cam):
    preview = DrmPreview(NAMES)
    src = Picamera2Source(preview_size=(800, 600), drm=preview)
    src.open()
    try:
        cam = fake_cam.state.opened[-1]
        assert preview.camera is cam
        assert cam.preview == (fake_picamera2.Preview.DRM, {"x": 0, "y": 0, "width": 800, "height": 600})
        assert cam.camera_configuration()["display"] == "main"
        frame = Frame(src.read(), 0, 0.0)
        preview.show(frame, None, DETS, None)
        ov = cam.overlays[-1]
        assert ov.shape == (240, 320, 4)  # drawn at the detection frame's size; picamera2 scales it
        assert ov[100, 10, 3] == 255  # left edge of the box
        assert ov[100, 60, 3] == 0  # inside: transparent
        preview.close()
        assert cam.overlays[-1] is None  # cleared on exit
    finally:
        src.close()
    assert preview.camera is None


def test_drm_preview_draws_nothing_once_the_camera_closed(fake_cam):
    preview = DrmPreview(NAMES)
    src = Picamera2Source(drm=preview)
    src.open()
    frame = Frame(src.read(), 0, 0.0)
    src.close()
    preview.show(frame, None, DETS, None)
    preview.close()
    assert fake_cam.state.overlays == [] and preview.failures == 0


def test_drm_failure_warns_once_and_every_camera_runs_headless(fake_cam, caplog):
    fake_cam.state.drm_ok = False
    preview = make_preview("drm", "picamera2", NAMES, {})
    factory = make_factory("picamera2", SourceConfig(), preview)
    for i in range(3):  # reopens after errors must not warn again, nor try DRM again
        with factory() as src:
            cam = fake_cam.state.opened[-1]
            assert src.read().shape == (240, 320)
            preview.show(Frame(src.read(), i, 0.0), None, DETS, None)
            assert cam.preview[0] == fake_picamera2.Preview.NULL
            assert cam.camera_configuration()["display"] == ("main" if i == 0 else None)
    assert preview.failed and not preview.wanted and preview.camera is None
    assert caplog.text.count("DRM preview unavailable") == 1
    assert fake_cam.state.overlays == []


def test_drm_preview_follows_a_reopened_camera(fake_cam):
    # A camera closed late (after a hang) must not take the newer one off the screen.
    class Cam:
        def __init__(self):
            self.overlays = []

        def start_preview(self, *a, **k):
            pass

        def set_overlay(self, rgba):
            self.overlays.append(rgba)

    preview = DrmPreview(NAMES)
    old_cam, new_cam = Cam(), Cam()
    assert preview.attach(old_cam, (640, 480)) and preview.attach(new_cam, (640, 480))
    preview.detach(old_cam)
    assert preview.camera is new_cam
    preview.show(Frame(np.zeros((240, 320), np.uint8), 0, 0.0), None, DETS, None)
    preview.detach(new_cam)
    assert old_cam.overlays == [] and len(new_cam.overlays) == 1
    assert preview.camera is None


def test_drm_preview_survives_overlay_errors(fake_cam, caplog):
    class Unplugged:
        def start_preview(self, *a, **k):
            pass

        def set_overlay(self, rgba):
            raise RuntimeError("display unplugged")

    p = DrmPreview(NAMES)
    assert p.attach(Unplugged(), (640, 480))
    for i in range(3):
        p.show(Frame(np.zeros((48, 64), np.uint8), i, 0.0), None, DETS, None)
    assert p.failures == 3 and caplog.text.count("DRM overlay failed") == 1


def test_recorder_writes_a_readable_video(tmp_path):
    path = tmp_path / "out" / "rec.mp4"
    rec = Recorder(str(path), fps=10)
    for i in range(6):
        rec.write(np.full((48, 64, 3), 30 * i, np.uint8))
    rec.close()
    cap = cv2.VideoCapture(str(path))
    n = 0
    while cap.read()[0]:
        n += 1
    cap.release()
    assert n == 6 and rec.frames == 6


def test_recorder_that_cannot_open_says_so_once_and_continues(tmp_path, caplog):
    events = []
    rec = Recorder(str(tmp_path / "x.mp4"), fourcc="ZZZZ", on_event=events.append)
    rec.write(np.zeros((48, 64, 3), np.uint8))
    rec.write(np.zeros((48, 64, 3), np.uint8))
    rec.close()
    assert rec.frames == 0 and caplog.text.count("not recording") == 1
    assert [e["event"] for e in events] == ["record_error"] and "VideoWriter" in events[0]["message"]


@pytest.mark.parametrize("make", ["file for its directory", "directory for the file"])
def test_recorder_whose_path_broke_after_the_start_logs_a_record_error_event(tmp_path, caplog, make):
    path = tmp_path / "d" / "x.mp4"
    events = []
    rec = Recorder(str(path), on_event=events.append)
    if make == "file for its directory":
        (tmp_path / "d").write_text("")
    else:
        path.mkdir(parents=True)
    for _ in range(3):
        rec.write(np.zeros((48, 64, 3), np.uint8))
    assert rec.frames == 0 and len(events) == 1 and events[0]["path"] == str(path)
    assert "ERROR" in caplog.text and caplog.text.count("not recording") == 1


# --- only this program's logs are appended to or repaired ----------------------------------------------------

NOT_LOGS = {
    "notes.json, no final newline": b'{"a": 1}\n{"b": 2}',
    "notes.json, final newline": b'{"a": 1}\n{"b": 2}\n',
    "a one-line token": b"s3cr3t-token-value",
    "a token with a newline": b"s3cr3t-token-value\n",
    "JSON lines of another schema": b'{"v":2,"time":"x"}\n{"v":2,"time":"y"}\n',
    "a JSON line that is not an object": b'[1,2]\n',
    "binary": bytes(range(256)) * 4,
    "a NUL run": b"\x00" * 100,
    "text with a JSON-looking start": b'{"v":1,"x":1}\nthen prose',
}


@pytest.mark.parametrize("name", sorted(NOT_LOGS))
def test_a_file_that_is_not_our_log_is_refused_and_left_whole(tmp_path, name):
    path = tmp_path / "f"
    path.write_bytes(NOT_LOGS[name])
    with pytest.raises(LogRefused, match="not a log of this program"):
        JsonlLog(str(path))
    assert path.read_bytes() == NOT_LOGS[name]


def test_a_model_file_given_as_the_log_is_refused_and_left_whole(tmp_path, rand_model_file):
    before = rand_model_file.read_bytes()
    with pytest.raises(LogRefused):
        JsonlLog(str(rand_model_file))
    assert rand_model_file.read_bytes() == before


@pytest.mark.parametrize("kind", ["directory", "fifo", "socket"])
def test_a_path_that_is_no_file_is_refused_without_blocking(tmp_path, kind):
    import socket

    path = tmp_path / "x"
    if kind == "directory":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)  # opening it for writing would block until a reader came
    else:
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(path))
    with pytest.raises(LogRefused, match="not a regular file"):
        JsonlLog(str(path))


@pytest.mark.parametrize("content", [b"", b'{"v":1,"seq":0}\n', b'{"v":1,"seq":0}\n{"v":1,"s', b'{"v":1,"se',
                                     b'{"v":1,"seq":0}\n' * 20000])
def test_our_logs_and_empty_files_are_still_opened(tmp_path, content):
    path = tmp_path / "x.jsonl"
    path.write_bytes(content)
    log = JsonlLog(str(path))
    assert log.write(record(7))
    log.close()
    assert json.loads(path.read_bytes().splitlines()[-1])["seq"] == 7


def test_a_file_replaced_by_something_else_is_not_written_into(tmp_path):
    path = tmp_path / "x.jsonl"
    log = JsonlLog(str(path))
    log.write(record(0))
    os.replace(path, tmp_path / "x.jsonl.old")
    path.write_bytes(b"someone's notes")  # at the log's path now: not ours
    assert not log.write(record(1))
    assert path.read_bytes() == b"someone's notes" and log.failures == 1
    log.close()


def test_stdout_closed_is_refused():
    import subprocess
    import sys

    code = ("from app.sinks import JsonlLog, LogRefused\n"
            "try:\n    JsonlLog('-')\nexcept LogRefused as e:\n    raise SystemExit(f'refused: {e}')\n")
    r = subprocess.run([sys.executable, "-c", code], preexec_fn=lambda: os.close(1), stderr=subprocess.PIPE, text=True,
                       cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert r.stderr.strip().startswith("refused: log '-' is stdout, and stdout is closed"), r.stderr


@pytest.mark.parametrize("path", ["a\0b", "\0"])
def test_a_nul_in_the_path_is_refused_not_raised(path):
    with pytest.raises(LogRefused):
        JsonlLog(path)


# --- rotation never renames over a numbered file that is not this program's log --------------------------------


def our_lines(n, start=0):
    return b"".join(b'{"v":1,"time":"t","seq":%d,"detections":[]}\n' % i for i in range(start, start + n))


def make_foreign(path: Path, kind: str) -> bytes | None:
    """Put something that is not our log at ``path``; the bytes it must keep (None: not a file)."""
    if kind in NOT_LOGS:
        path.write_bytes(NOT_LOGS[kind])
        return NOT_LOGS[kind]
    if kind == "a directory":
        path.mkdir()
        (path / "keep").write_text("x")
    elif kind == "a FIFO":
        os.mkfifo(path)
    elif kind == "a link to our own old log":
        (path.parent / "elsewhere.jsonl").write_bytes(our_lines(3))
        path.symlink_to(path.parent / "elsewhere.jsonl")
    elif kind == "a dangling link":
        path.symlink_to(path.parent / "nowhere")
    return None


FOREIGN = sorted(NOT_LOGS) + ["a directory", "a FIFO", "a link to our own old log", "a dangling link"]


def foreign_intact(path: Path, kind: str, kept: bytes | None) -> bool:
    if kept is not None:
        return path.read_bytes() == kept
    if kind == "a directory":
        return (path / "keep").read_text() == "x"
    if kind == "a FIFO":
        return path.is_fifo()
    return path.is_symlink()


@pytest.mark.parametrize("slot", [1, 2, 4])
@pytest.mark.parametrize("kind", FOREIGN)
def test_a_numbered_file_that_is_not_our_log_is_refused_at_start(tmp_path, kind, slot):
    path = tmp_path / "notes"
    path.write_bytes(our_lines(2))
    other = tmp_path / f"notes.{slot}"
    kept = make_foreign(other, kind)
    with pytest.raises(sinks.LogRefused, match=rf"rename over .*notes\.{slot}, which is not a log of this program"):
        JsonlLog(str(path), max_bytes=1000, files=5)
    assert foreign_intact(other, kind, kept) and path.read_bytes() == our_lines(2)
    JsonlLog(str(path), max_bytes=1000, files=slot).close()  # fewer files never reach it: accepted
    JsonlLog(str(path), max_bytes=0, files=5).close()  # no rotation: accepted


@pytest.mark.parametrize("kind", ["an empty file", "our own rotated log", "our rotated log, torn last line"])
def test_our_own_rotated_logs_and_empty_files_are_rotated_as_before(tmp_path, kind):
    path = tmp_path / "d.jsonl"
    old = {"an empty file": b"", "our own rotated log": our_lines(3, 100),
           "our rotated log, torn last line": our_lines(3, 100) + b'{"v":1,"ti'}[kind]
    (tmp_path / "d.jsonl.1").write_bytes(old)
    one = len(our_lines(1))
    log = JsonlLog(str(path), max_bytes=3 * one, files=3)
    for i in range(7):
        assert log.write({"time": "t", "seq": i, "detections": []} | {"v": 1})
    log.close()
    assert log.rotations == 2 and sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl", "d.jsonl.1", "d.jsonl.2"]


@pytest.mark.parametrize("slot", [1, 2])
@pytest.mark.parametrize("kind", ["a one-line token", "notes.json, final newline", "a directory", "a FIFO",
                                  "a link to our own old log"])
def test_a_numbered_file_made_after_the_start_is_never_renamed_over(tmp_path, caplog, kind, slot):
    """It appeared while the app ran: the rotation chain ends before it (the oldest of ours before it is
    dropped instead), or, in slot 1, the log is emptied as with log.files = 1; said once."""
    path = tmp_path / "d.jsonl"
    one = len(our_lines(1))  # seq 0; seq 10..29 are a byte longer: 3 lines to a file either way
    log = JsonlLog(str(path), max_bytes=3 * one + 3, files=4)
    other = tmp_path / f"d.jsonl.{slot}"
    kept = make_foreign(other, kind)
    for i in range(30):
        assert log.write({"v": 1, "time": "t", "seq": i, "detections": []})
    log.close()
    assert foreign_intact(other, kind, kept)
    assert caplog.text.count("is not a log of this program") == 1
    assert not (tmp_path / f"d.jsonl.{slot + 1}").exists() or slot == 1 and not (tmp_path / "d.jsonl.3").exists()
    assert os.path.getsize(path) <= 3 * one + 3
    if slot == 2:
        assert [json.loads(x)["seq"] for x in lines_of(tmp_path / "d.jsonl.1")] == [24, 25, 26]
    assert [json.loads(x)["seq"] for x in lines_of(path)] == [27, 28, 29]


def test_the_app_refuses_a_log_whose_rotation_would_clobber_notes(tmp_path):
    path = tmp_path / "notes"
    (tmp_path / "notes.1").write_text("my notes, line one\nline two\n")
    r = subprocess.run([sys.executable, "-m", "app", "--source", "demo", "--preview", "none", "--log", str(path),
                        "--model", str(tmp_path / "never-read.xnc")], cwd=Path(__file__).resolve().parents[1],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 78 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "notes.1, which is not a log of this program" in r.stderr and "Traceback" not in r.stderr
    assert (tmp_path / "notes.1").read_text() == "my notes, line one\nline two\n" and not path.exists()


# --- a recording only replaces an earlier recording, and only under a video file name --------------------------


@pytest.mark.parametrize("name,data", [
    ("notes.mp4", b"my notes\nline two"),
    ("token.mkv", b"s3cr3t"),
    ("picture.avi", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40),
    ("model.mov", b"XNORCAM\x00" + b"\x01" * 40),
    ("riff-wave.avi", b"RIFF\x00\x00\x00\x00WAVEfmt "),
])
def test_an_existing_file_that_is_not_a_video_is_never_overwritten(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data)
    problem = sinks.record_path_problem(str(path))
    assert problem and "exists and is not a video" in problem
    assert path.read_bytes() == data


@pytest.mark.parametrize("name", ["person.xnc", "notes.txt", "recording", "clip.mp4.bak", "x.jpg"])
def test_a_recording_needs_a_video_file_name(tmp_path, name):
    path = tmp_path / name
    problem = sinks.record_path_problem(str(path))
    assert problem and "not a video file name" in problem and not path.exists()


@pytest.mark.parametrize("suffix", list(sinks.RECORD_SUFFIXES) + [".MP4"])
def test_an_earlier_recording_or_an_empty_file_may_be_replaced(tmp_path, suffix):
    empty = tmp_path / f"empty{suffix}"
    empty.write_bytes(b"")
    assert sinks.record_path_problem(str(empty)) is None and empty.exists()
    earlier = tmp_path / f"earlier{suffix}"
    rec = Recorder(str(earlier))
    for _ in range(3):
        rec.write(np.zeros((48, 64, 3), np.uint8))
    rec.close()
    assert rec.frames == 3 and sinks.record_path_problem(str(earlier)) is None
    fresh = tmp_path / f"fresh{suffix}"
    assert sinks.record_path_problem(str(fresh)) is None and not fresh.exists()  # tried, and removed again


def test_the_app_refuses_to_record_over_the_model(tmp_path):
    """--log and --record swapped: the model file is a refusal (exit 2, one line), not a record_error later."""
    model = tmp_path / "person.xnc"
    data = (Path(__file__).resolve().parents[1] / "models" / "person.xnc").read_bytes()
    model.write_bytes(data)
    r = subprocess.run([sys.executable, "-m", "app", "--source", "demo", "--preview", "none", "--record", str(model),
                        "--max-frames", "2"], cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "not a video file name" in r.stderr and model.read_bytes() == data


def _frames_in(path) -> int:
    cap = cv2.VideoCapture(str(path))
    n = 0
    while cap.read()[0]:
        n += 1
    cap.release()
    return n


def _record(path, frames, value=0, **kw):
    rec = Recorder(str(path), **kw)
    for _ in range(frames):
        rec.write(np.full((48, 64, 3), value, np.uint8))
    rec.close()
    return rec


def test_a_restart_keeps_the_earlier_recordings_and_only_files_of_them(tmp_path):
    path = tmp_path / "rec.mp4"
    for n in (3, 4, 5, 6):  # four runs, one after another
        _record(path, n, files=3)
    # The newest in rec.mp4, the two before in .1 and .2; the first run's, the oldest, went.
    assert [_frames_in(p) for p in (path, tmp_path / "rec.1.mp4", tmp_path / "rec.2.mp4")] == [6, 5, 4]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rec.1.mp4", "rec.2.mp4", "rec.mp4"]


def test_one_file_means_the_earlier_recording_is_replaced(tmp_path):
    path = tmp_path / "rec.mp4"
    _record(path, 3, files=1)
    _record(path, 5, files=1)
    assert _frames_in(path) == 5 and [p.name for p in tmp_path.iterdir()] == ["rec.mp4"]


def test_a_long_recording_is_split_at_its_size_and_every_part_plays(tmp_path):
    path = tmp_path / "rec.mp4"
    rng = np.random.default_rng(0)
    rec = Recorder(str(path), max_mb=0.05, files=4)  # noise compresses badly: a few frames each
    for _ in range(200):
        rec.write(rng.integers(0, 256, (120, 160, 3), np.uint8))
    rec.close()
    parts = [path] + [tmp_path / f"rec.{i}.mp4" for i in (1, 2, 3)]
    counts = [_frames_in(p) for p in parts]
    assert rec.segments > 4 and all(c > 0 for c in counts)  # more parts than kept: the oldest went
    assert sum(counts) < rec.frames == 200
    # Each finished part stopped at the first size check past the limit: at most one check's frames over it.
    for p in parts[1:]:
        assert 0.05 * 2**20 <= p.stat().st_size
        assert _frames_in(p) % Recorder.SIZE_CHECK_EVERY == 0
    assert len(list(tmp_path.iterdir())) == 4


def test_never_split_when_the_size_limit_is_off(tmp_path):
    path = tmp_path / "rec.mp4"
    rng = np.random.default_rng(0)
    rec = Recorder(str(path), max_mb=0, files=3)
    for _ in range(64):
        rec.write(rng.integers(0, 256, (120, 160, 3), np.uint8))
    rec.close()
    assert rec.segments == 1 and _frames_in(path) == 64 and path.stat().st_size > 0.05 * 2**20


@pytest.mark.parametrize("foreign", ["text", "directory", "link"])
def test_rotation_never_renames_over_a_file_that_is_not_a_recording(tmp_path, foreign, caplog):
    path = tmp_path / "rec.mp4"
    _record(path, 3, files=3)
    slot = tmp_path / "rec.2.mp4"
    if foreign == "text":
        slot.write_text("my notes\n")
    elif foreign == "directory":
        slot.mkdir()
    else:
        (tmp_path / "target.mp4").write_bytes(b"")
        slot.symlink_to(tmp_path / "target.mp4")
    # Refused at start, naming the file and the way out.
    problem = sinks.record_path_problem(str(path), files=3)
    assert problem and "rec.2.mp4" in problem and "preview.record_files = 2" in problem
    assert sinks.record_path_problem(str(path), files=2) is None
    # Put there after the start: the chain ends before it, with one warning, and it is untouched.
    _record(path, 4, files=3)
    _record(path, 5, files=3)
    assert _frames_in(path) == 5 and _frames_in(tmp_path / "rec.1.mp4") == 4
    assert caplog.text.count("is not a recording") == 2  # one per run (each run's recorder warns once)
    if foreign == "text":
        assert slot.read_text() == "my notes\n"
    elif foreign == "directory":
        assert slot.is_dir() and not any(slot.iterdir())
    else:
        assert slot.is_symlink() and (tmp_path / "target.mp4").read_bytes() == b""


def test_the_app_keeps_the_earlier_recording_across_runs(tmp_path):
    """Through the command line and the config: two runs, both recordings there afterwards."""
    path = tmp_path / "rec.mp4"
    for n in (3, 5):
        r = subprocess.run([sys.executable, "-m", "app", "--source", "demo", "--preview", "none", "--record",
                            str(path), "--max-frames", str(n)], cwd=Path(__file__).resolve().parents[1],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
    assert _frames_in(path) == 5 and _frames_in(tmp_path / "rec.1.mp4") == 3
