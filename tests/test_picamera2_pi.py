"""The camera path on a Pi, against the FAKE picamera2 that behaves like the real one where it is unkind
(tests/fakes/fake_picamera2.py): no HDMI, a lores larger than main, the sensor mode, a camera that appears
late, the overlay's cost, no camera or only a USB one, the reopen race, a desktop holding the display; and
what must stay right (YUV420 lores, the Y plane cropped from the padded stride, the RGBA overlay, the
displayed stream, the buffer count, the order of closing)."""

from __future__ import annotations

import logging
import sys
import threading
import time

import numpy as np
import pytest

from app import sinks, sources
from app.capture import Capture
from app.config import ConfigError, SourceConfig, load
from app.overlay import class_colour
from app.pipeline import Pipeline
from app.preprocess import letterbox
from app.sinks import DrmPreview, choose_preview_mode
from app.sources import Frame, Picamera2Source, SourceError, make_factory
from tests.fakes import fake_picamera2
from tests.fakes.fake_detector import FakeDetector

NAMES = ["person"]
BOX = [[40.0, 30.0, 120.0, 200.0, 0.9, 0.0]]


@pytest.fixture
def fake_cam(monkeypatch):
    module = fake_picamera2.make_module()
    monkeypatch.setitem(sys.modules, "picamera2", module)
    monkeypatch.setattr(sources, "_MODES", {}, raising=False)
    return module


def frames_within(capture: Capture, n: int, timeout_s: float) -> list:
    got, deadline = [], time.monotonic() + timeout_s
    while len(got) < n and time.monotonic() < deadline:
        f = capture.take(timeout=0.05)
        if f is not None:
            got.append(f)
    return got


def drm_sysfs(tmp_path, **connectors) -> str:
    root = tmp_path / "drm"
    root.mkdir(exist_ok=True)
    for name, status in connectors.items():
        d = root / f"card1-{name.replace('_', '-')}"
        d.mkdir()
        (d / "status").write_text(status + "\n")
    return str(root)


# --- 1. no HDMI attached ---------------------------------------------------------------------------


def test_auto_asks_for_drm_only_with_a_display_connected(tmp_path, caplog):
    nothing = drm_sysfs(tmp_path, HDMI_A_1="disconnected", Writeback_1="unknown")
    mode, why = choose_preview_mode("auto", "picamera2", {}, drm_root=nothing)
    assert mode == "none" and "no display connected" in why
    assert choose_preview_mode("auto", "picamera2", {}, drm_root=str(tmp_path / "no-sysfs"))[0] == "none"
    caplog.set_level(logging.INFO)
    assert sinks.make_preview("auto", "picamera2", NAMES, {}, drm_root=nothing).name == "none"
    assert "no display connected" in caplog.text


def test_drm_with_nothing_plugged_in_times_out_and_reopens_headless(fake_cam, caplog):
    # kms++ reserves no connector, start_preview succeeds, the first frame's render raises in picamera2's
    # preview thread and kills it: a capture without a timeout would wait for ever.
    fake_cam.state.display = "none"
    drm = DrmPreview(NAMES)
    cap = Capture(make_factory("picamera2", SourceConfig(hang_timeout_s=0.4), drm),
                  hang_timeout_s=1.4, backoff_initial_s=0.01).start()
    try:
        got = frames_within(cap, 5, 15.0)
    finally:
        cap.stop(2.0)
    assert len(got) == 5, "no frame: the capture waited for ever behind the dead DRM preview thread"
    first, later = fake_cam.state.opened[0], fake_cam.state.opened[1]
    assert first.preview_history[0][0] == fake_picamera2.Preview.DRM and isinstance(first.loop_died, RuntimeError)
    assert drm.failed and not drm.wanted and caplog.text.count("DRM preview unavailable") == 1
    assert later.preview_history[0][0] == fake_picamera2.Preview.NULL  # headless from then on
    assert later.camera_configuration()["display"] is None
    # The timed-out capture was cancelled before the camera was closed.
    assert first.calls[-5:-1] == ["cancel_all_and_flush", "stop_preview", "stop", "close"]
    assert first.closed and not first._jobs


def test_bookworms_first_picamera2_is_bounded_too(monkeypatch):
    # picamera2 0.3.12: capture_array(wait=5.0) waits for ever, no sensor=, no cancel_all_and_flush.
    module = fake_picamera2.make_module(version=(0, 3, 12))
    monkeypatch.setitem(sys.modules, "picamera2", module)
    monkeypatch.setattr(sources, "_MODES", {}, raising=False)
    module.state.display = "none"
    drm = DrmPreview(NAMES)
    cap = Capture(make_factory("picamera2", SourceConfig(hang_timeout_s=0.4, fps=15.0), drm),
                  hang_timeout_s=1.4, backoff_initial_s=0.01).start()
    try:
        got = frames_within(cap, 5, 15.0)
    finally:
        cap.stop(2.0)
    assert len(got) == 5 and drm.failed
    later = module.state.opened[-1]
    assert later.camera_configuration()["raw"]["size"] == (1640, 1232) and later.mode["size"] == (1640, 1232)


# --- 2. lores larger than main ---------------------------------------------------------------------


def test_a_detection_size_larger_than_the_preview_is_refused(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[source]\nspec = "picamera2"\nwidth = 800\nheight = 600\n')
    with pytest.raises(ConfigError, match="may not exceed its main stream"):
        load(str(cfg))
    cfg.write_text('[source]\nwidth = 640\nheight = 600\npreview_width = 640\npreview_height = 480\n')  # auto
    with pytest.raises(ConfigError, match="source.width x source.height = 640x600"):
        load(str(cfg))
    cfg.write_text('[source]\nspec = "demo"\nwidth = 800\nheight = 600\n')  # the demo has no main stream
    assert load(str(cfg)).source.width == 800


def test_the_fake_refuses_lores_larger_than_main_like_picamera2(fake_cam):
    cam = fake_cam.Picamera2(0)
    config = cam.create_preview_configuration(main={"size": (320, 240)}, lores={"size": (640, 480)})
    with pytest.raises(RuntimeError, match="may not exceed main"):
        cam.configure(config)
    cam.close()


# --- 3. field of view and frame rate ------------------------------------------------------------------


def test_camera_module_2_gets_its_full_field_of_view_at_the_configured_rate(fake_cam, caplog):
    caplog.set_level(logging.INFO)
    with Picamera2Source(preview_size=(640, 480), fps=15.0) as src:
        cam = fake_cam.state.opened[-1]
        cfg = cam.camera_configuration()
        # picamera2 alone would pick the 640x480 mode: a binned centre crop, 39 % of the width, ~100 fps.
        assert cam.mode["size"] == (1640, 1232) and cam.mode["crop_limits"] == (0, 0, 3280, 2464)
        assert cfg["sensor"] == {"output_size": (1640, 1232), "bit_depth": 10}
        assert cfg["controls"]["FrameRate"] == 15.0
        assert "AfMode" not in cfg["controls"]
        assert src.read().shape == (240, 320)
    assert "sensor mode 1640x1232 (100 % of the sensor's width" in caplog.text and "15 fps" in caplog.text


def test_camera_module_3_full_view_and_continuous_autofocus(monkeypatch):
    module = fake_picamera2.make_module(sensor="imx708")
    monkeypatch.setitem(sys.modules, "picamera2", module)
    monkeypatch.setattr(sources, "_MODES", {}, raising=False)
    with Picamera2Source(preview_size=(640, 480), fps=10.0):
        cam = module.state.opened[-1]
        assert cam.mode["size"] == (2304, 1296)  # not the 1536x864 crop
        assert cam.camera_configuration()["controls"]["AfMode"] == 2
        assert cam.camera_configuration()["controls"]["FrameRate"] == 10.0


def test_the_sensor_modes_are_read_once_before_capture_starts(fake_cam):
    factory = make_factory("picamera2", SourceConfig(fps=15.0))
    factory().prepare()  # what python -m app does before the capture thread (and its hang clock) starts
    assert fake_cam.state.sensor_mode_queries == 1 and fake_cam.state.opened[-1].closed
    for _ in range(2):
        with factory() as src:
            assert src.mode["size"] == (1640, 1232)
    assert fake_cam.state.sensor_mode_queries == 1 and fake_cam.state.pipes_open == 0


def test_full_view_mode_choice():
    modes = [dict(m) for m in fake_picamera2.IMX219_MODES]
    assert sources.full_view_mode(modes, (640, 480), 15)["size"] == (1640, 1232)
    assert sources.full_view_mode(modes, (2000, 1500), 15)["size"] == (3280, 2464)
    assert sources.full_view_mode(modes, (4000, 3000), 15)["size"] == (3280, 2464)  # the largest full view
    assert sources.full_view_mode(modes, (640, 480), 30)["size"] == (1640, 1232)
    assert sources.full_view_mode([{"format": "MJPEG"}], (640, 480), 15) is None


# --- 4. boot race ------------------------------------------------------------------------------------


def test_auto_waits_for_a_camera_that_appears_late():
    answers = iter([False, False, True])
    assert sources.resolve_spec("auto", probe=lambda: next(answers), wait_s=10.0, importable=lambda: True) == \
        "picamera2"
    assert sources.resolve_spec("auto", probe=lambda: False, wait_s=0.3, importable=lambda: True) == "demo"
    t0 = time.monotonic()
    assert sources.resolve_spec("auto", probe=lambda: False, wait_s=30.0, importable=lambda: False) == "demo"
    assert time.monotonic() - t0 < 1.0  # not a Pi (no picamera2): no wait


def test_the_unit_starts_after_udev_settled_and_allows_drm_by_number():
    from tests.test_systemd_unit import UNIT, settings

    unit = settings(UNIT.read_text())
    assert "systemd-udev-settle.service" in unit["Wants"][0].split()
    assert "systemd-udev-settle.service" in unit["After"][0].split()
    allowed = {v.split()[0] for v in unit["DeviceAllow"]}
    assert {"/dev/char/226:0", "/dev/char/226:1", "/dev/char/226:128", "char-drm", "char-video4linux"} <= allowed


def test_status_says_the_demo_stands_in_for_the_camera():
    class Notes:
        def __init__(self):
            self.texts = []

        def status(self, text):
            self.texts.append(text)

        def __getattr__(self, name):
            return lambda *a, **k: None

    notes = Notes()
    cap = Capture(lambda: sources.DemoSource(64, 48, fps=0)).start()
    p = Pipeline(cap, FakeDetector(BOX), notifier=notes, max_frames=3, status_interval_s=0.0,
                 status_note="no Pi camera found in 15 s: running the demo, not the camera")
    try:
        p.run(threading.Event())
    finally:
        cap.stop()
    assert notes.texts and all(t.startswith("no Pi camera found") for t in notes.texts)


def test_a_service_that_falls_back_to_the_demo_says_so(fake_cam, monkeypatch, rand_model_file, caplog, tmp_path):
    from app import __main__ as main
    from tests.reliability.support import NotifySocket

    monkeypatch.setattr(sources, "CAMERA_WAIT_S", 0.3)
    fake_cam.state.cameras = 0  # picamera2 installed, no camera listed (yet)
    import signal

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}  # main() sets its own
    notify = NotifySocket()
    monkeypatch.setenv("NOTIFY_SOCKET", notify.path)
    cfg = tmp_path / "c.toml"
    cfg.write_text("[watchdog]\nstatus_interval_s = 0.05\n")
    try:
        rc = main.main(["--config", str(cfg), "--source", "auto", "--model", str(rand_model_file), "--preview",
                        "none", "--max-frames", "5", "--no-tracks"])
        time.sleep(0.1)
        texts = notify.texts("STATUS=")
    finally:
        notify.close()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert rc == 0
    assert "no Pi camera found in 0.3 s: running the demo" in caplog.text
    frame_status = [t for t in texts if "fps=" in t]
    assert frame_status and all("no Pi camera found" in t for t in frame_status), texts


def test_no_camera_is_one_clear_error(fake_cam, monkeypatch):
    from app import __main__ as main

    monkeypatch.setattr(sources, "CAMERA_WAIT_S", 0.2)
    fake_cam.state.cameras = 0
    fake_cam.state.usb_cameras = 1
    problem = main._no_camera_problem()
    assert "lists no Pi camera after 0.2 s" in problem and "opencv:<index>" in problem
    fake_cam.state.cameras = 1
    assert main._no_camera_problem() == ""


# --- 5. the overlay's cost ------------------------------------------------------------------------------


def test_the_overlay_is_set_when_the_drawing_changes_and_the_hud_twice_a_second(fake_cam):
    # Each set_overlay allocates a DRM buffer and waits for the display's refresh under the lock the
    # camera loop renders with: once a frame, that is up to 17 ms a frame.
    drm = DrmPreview(NAMES)
    cap = Capture(make_factory("picamera2", SourceConfig(), drm)).start()
    p = Pipeline(cap, FakeDetector(BOX), preview=drm, max_frames=40)
    t0 = time.monotonic()
    try:
        stats = p.run(threading.Event())
    finally:
        cap.stop()
    elapsed = time.monotonic() - t0
    st = fake_cam.state
    assert stats.processed == 40
    # The same box every frame: the first overlay, then a HUD refresh every 0.5 s.
    assert 1 <= st.overlay_buffers <= 2 + elapsed / 0.5, (st.overlay_buffers, elapsed)
    assert drm.overlays_set == st.overlay_buffers and drm.overlays_skipped == 40 - drm.overlays_set


def test_the_overlay_follows_moving_boxes_at_once(fake_cam):
    drm = DrmPreview(NAMES, hud_refresh_s=3600)
    with Picamera2Source(drm=drm) as src:
        cam = fake_cam.state.opened[-1]
        for i in range(6):
            box = np.array([[10 + (i // 2) * 5, 10, 60, 80, 0.9, 0]], np.float32)  # moves every other frame
            drm.show(Frame(src.read(), i, 0.0), None, box, None)
        assert len(cam.overlays) == 3
        drm.show(Frame(src.read(), 6, 0.0), None, np.zeros((0, 6), np.float32), None)
        assert len(cam.overlays) == 4  # the box went away: cleared at once


# --- 6. no camera, or only a USB camera --------------------------------------------------------------------


def test_no_camera_raises_a_clear_error_and_leaks_nothing(fake_cam):
    fake_cam.state.cameras = 0
    for _ in range(3):
        with pytest.raises(SourceError, match="no Pi camera number 0"):
            Picamera2Source().open()
    assert fake_cam.state.pipes_open == 0  # picamera2 would have leaked a pipe on each try


def test_a_usb_webcam_is_not_the_pi_camera(fake_cam):
    fake_cam.state.cameras = 0
    fake_cam.state.usb_cameras = 1
    assert sources.picamera2_available() is False  # auto goes to the demo; the webcam is opencv:0
    with pytest.raises(SourceError, match="1 USB webcam.*opencv:<index>"):
        Picamera2Source().open()
    fake_cam.state.cameras = 1  # both: the Pi camera is number 0, the webcam is listed last
    assert sources.picamera2_available() is True
    with Picamera2Source() as src:
        assert "/usb" not in fake_cam.state.opened[-1].info["Id"] and src.read().shape == (240, 320)


# --- 7. the reopen race ----------------------------------------------------------------------------------


def test_a_hung_camera_is_closed_before_the_next_one_opens(fake_cam, tmp_path):
    # picamera2's close releases the camera, then deletes its index from the camera manager: a camera
    # reopened in between loses its entry to that clean-up and never gets a frame.
    st = fake_cam.state
    st.close_delay_s = 0.6
    st.on_capture = lambda n: fake_picamera2.STALL if n == 3 else None
    cap = Capture(make_factory("picamera2", SourceConfig(hang_timeout_s=0.3)), hang_timeout_s=0.3,
                  backoff_initial_s=0.01, backoff_max_s=0.05).start()
    try:
        got = frames_within(cap, 25, 20.0)
        errors = list(cap.events)
    finally:
        cap.stop(2.0)
    assert len(got) == 25
    assert [e["event"] for e in errors if e["event"] == "source_error"] == ["source_error"], errors
    assert errors[0]["stage"] == "hang"


# --- 9. a desktop holds the display ---------------------------------------------------------------------


def test_a_desktop_holding_the_display_is_said_and_drm_not_asked(tmp_path, caplog, monkeypatch):
    hdmi = drm_sysfs(tmp_path, HDMI_A_1="connected")
    monkeypatch.setattr(sinks, "cv2_has_gui", lambda: False)
    caplog.set_level(logging.INFO)
    mode, _ = choose_preview_mode("auto", "picamera2", {"WAYLAND_DISPLAY": "wayland-0"}, drm_root=hdmi, web=True)
    assert mode == "browser" and "a desktop holds the display" in caplog.text
    caplog.clear()
    assert choose_preview_mode("drm", "picamera2", {"DISPLAY": ":0"}, drm_root=hdmi)[0] == "drm"
    assert "a desktop holds the display" in caplog.text and "WARNING" in caplog.text


def test_a_desktop_holding_the_drm_master_is_found_without_display_variables(tmp_path, caplog):
    # A service has no $DISPLAY: the kernel says who is the card's DRM master.
    import errno

    hdmi = drm_sysfs(tmp_path, HDMI_A_1="connected")
    mode, why = choose_preview_mode("auto", "picamera2", {}, drm_root=hdmi, taken=lambda connector: True)
    assert mode == "none" and "card1's DRM master" in why
    assert choose_preview_mode("auto", "picamera2", {}, drm_root=hdmi, taken=lambda c: None)[0] == "drm"  # unknown
    opened = []

    def opener(path, flags):
        opened.append(path)
        return __import__("os").open("/dev/null", flags)

    def refused(fd, request, arg):
        assert request == sinks.DRM_IOCTL_AUTH_MAGIC and arg == b"\0\0\0\0"
        raise OSError(errno.EACCES, "Permission denied")

    def master(fd, request, arg):
        raise OSError(errno.EINVAL, "Invalid argument")  # no client with magic 0: we are the master

    assert sinks.display_taken("card1-HDMI-A-1", "/dev/dri", opener, refused) is True
    assert sinks.display_taken("card1-HDMI-A-1", "/dev/dri", opener, master) is False
    assert opened == ["/dev/dri/card1", "/dev/dri/card1"]
    assert sinks.display_taken("card1-HDMI-A-1", str(tmp_path / "no-dri")) is None


# --- the letterbox is skipped: the camera delivers the network's size ------------------------------------


def test_lores_is_the_network_input_at_the_preview_aspect(fake_cam):
    with Picamera2Source(320, 240, (640, 480), network_size=(192, 192)) as src:
        cfg = fake_cam.state.opened[-1].camera_configuration()["lores"]
        assert cfg["size"] == (192, 144) and cfg["stride"] == 192  # a multiple of 64: no padding on the VC4
        y = src.read()
    assert y.shape == (144, 192)
    x, lb = letterbox(y, 192, 192, 1)
    assert (lb.scale, lb.pad_x, lb.pad_y) == (1.0, 0, 24)  # no resize: only the bars
    np.testing.assert_array_equal(x[24:168, :, 0], y)


@pytest.mark.parametrize("network, main, most, want", [
    ((192, 192), (640, 480), (320, 240), (192, 144)),
    ((192, 192), (1280, 720), (320, 240), (192, 108)),
    ((256, 160), (640, 480), (320, 240), (212, 160)),
    ((192, 192), (160, 120), (320, 240), (160, 120)),  # never larger than main
    ((192, 192), (640, 480), (128, 96), (128, 96)),  # nor than the configured size
    (None, (640, 480), (321, 241), (320, 240)),  # even
])
def test_lores_size(network, main, most, want):
    got = sources.lores_size(network, main, most)
    assert got == want and got[0] <= main[0] and got[1] <= main[1] and got[0] % 2 == 0 == got[1] % 2


# --- what must stay right ---------------------------------------------------------------------------------


def test_what_must_stay_right(fake_cam):
    drm = DrmPreview(NAMES)
    with Picamera2Source(200, 150, (800, 600), drm=drm) as src:
        cam = fake_cam.state.opened[-1]
        cfg = cam.camera_configuration()
        assert cfg["lores"]["format"] == "YUV420"  # the VC4 needs a YUV lores
        assert cfg["lores"]["stride"] == 256 and cfg["display"] == "main" and cfg["buffer_count"] == 4
        y = src.read()
        assert y.shape == (150, 200) and not (y == fake_picamera2.PAD_VALUE).any()
        drm.show(Frame(y, 0, 0.0), None, np.array([[20, 20, 100, 120, 0.9, 0]], np.float32), None)
        ov = cam.overlays[-1]
        assert tuple(ov[70, 20]) == (*class_colour(0), 255)  # RGBA byte order, as the AB24 buffer wants
    assert cam.calls[cam.calls.index("cancel_all_and_flush"):][:4] == \
        ["cancel_all_and_flush", "stop_preview", "stop", "close"]
