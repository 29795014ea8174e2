"""A FAKE of the part of picamera2 (0.3.x) that app/sources.py and app/sinks.py use.

picamera2 only installs on a Raspberry Pi (it needs libcamera), so tests put
this in ``sys.modules["picamera2"]``. It does what the real library does where
that is unkind to the caller; each behaviour names the picamera2 file and
function it follows (picamera2/picamera2.py unless said otherwise), or the
kms++ / libcamera source under it:

- The event loop. Frames are completed requests; a preview thread
  (previews/null_preview.py ``NullPreview.thread_func``) runs
  ``Picamera2.process_requests``, which executes the queued jobs, then renders
  the display request (``display.render_request``), and only then signals the
  jobs. A ``capture_array`` is such a job (``dispatch_functions`` /
  ``job.py Job.get_result``): ``wait=None`` waits for ever, a number raises
  ``TimeoutError`` when no frame completes it in time. When a render raises,
  the exception leaves ``handle_request`` and the preview thread dies: no job is
  signalled again.
- The camera manager (``CameraManager``): ``Picamera2.__init__`` adds the
  camera under its libcamera index before opening it; ``close`` releases the
  camera and then ``CameraManager.cleanup`` deletes that index, whoever holds
  it now, stopping the manager's thread when none is left. A camera whose
  entry was deleted gets no more frames. ``state.close_delay_s`` widens the
  window between ``release`` and ``cleanup``.
- ``global_camera_info`` (``Picamera2.global_camera_info``) lists every camera
  libcamera sees, USB webcams too (their ``Id`` contains ``/usb``), sorted with
  USB cameras last. ``Picamera2(n)`` opens a pipe first and then indexes that
  list: with too few cameras it raises IndexError and the pipe leaks
  (``state.pipes_open`` counts them). A camera still held by an unclosed
  Picamera2 cannot be opened again (``_open_camera``: ``camera.acquire``).
- Configuration (``create_preview_configuration``, ``align_stream``,
  ``check_camera_config``, ``configure_``): sizes are rounded down to even;
  ``lores`` larger than ``main`` raises "lores stream dimensions may not exceed
  main stream"; lores must be YUV on the VC4 (``Platform.VC4``); ``sensor``
  takes only ``output_size`` and ``bit_depth``; a USB camera (no
  ``ColorFilterArrangement``) offers one stream, so a lores stream fails
  (libcamera ``PipelineHandlerUVC::generateConfiguration`` makes one stream).
  The sensor mode is the one ``_make_libcamera_config``'s ``score_mode`` picks
  for ``sensor.output_size``, else for the raw size, which defaults to the main
  size. The default controls let the frame rate run as fast as the mode allows.
- A YUV420 stream's array (request.py ``_make_array_shared``) is
  (height*3/2, stride) uint8: Y rows, then U and V; the VC4 ISP pads the
  stride to a multiple of 64 bytes, so columns past the width are junk.
- ``sensor_modes`` lists the modes with ``size``, ``fps``, ``crop_limits``,
  ``bit_depth`` and ``format`` (here a Camera Module 2's imx219, or 3's imx708).
- The DRM preview (previews/drm_preview.py): ``DrmManager.add`` opens the card
  (``pykms.Card()`` raises only when there is no card: ``state.display =
  "nocard"``) and reserves a connector and CRTC, which kms++
  (``ResourceManager::reserve_connector``) returns as None when nothing is
  plugged in (``"none"``); ``render_drm`` then raises "Failed to reserve DRM
  plane" at the first frame, in the preview thread. With a desktop holding the
  DRM master (``"desktop"``) ``commit_sync``'s error is ignored: no picture, no
  error. ``commit_sync`` blocks until the next vertical blank
  (``state.vblank_s``). ``set_overlay`` needs ``buffer_count >= 2`` and a
  reserved overlay plane (so a rendered frame), allocates a new dumb buffer
  each call and commits under the preview's lock, the one ``render_request``
  holds. The null preview's ``set_overlay`` does nothing.
- ``stop`` with the event loop running is itself a job for the loop
  (``Picamera2.stop``); ``stop_preview`` joins the preview thread and detaches
  it; ``close`` stops the preview first. ``cancel_all_and_flush`` cancels the
  pending jobs.
"""

from __future__ import annotations

import concurrent.futures
import enum
import threading
import time
import types

import numpy as np

PAD_VALUE = 0xEE  # what sits in the stride padding: never a real Y value in our pattern
_UNSET = object()
STALL = object()  # on_capture's answer for "this camera delivers no more frames" (a loose cable)

# picamera2's sensor_modes for a Camera Module 2 (imx219) and 3 (imx708), as rpicam-hello --list-cameras shows them.
IMX219_MODES = (
    {"format": "SRGGB10_CSI2P", "bit_depth": 10, "size": (640, 480), "fps": 103.33, "crop_limits": (1000, 752, 1280, 960)},
    {"format": "SRGGB10_CSI2P", "bit_depth": 10, "size": (1640, 1232), "fps": 41.85, "crop_limits": (0, 0, 3280, 2464)},
    {"format": "SRGGB10_CSI2P", "bit_depth": 10, "size": (1920, 1080), "fps": 47.57, "crop_limits": (680, 692, 1920, 1080)},
    {"format": "SRGGB10_CSI2P", "bit_depth": 10, "size": (3280, 2464), "fps": 21.19, "crop_limits": (0, 0, 3280, 2464)},
)
IMX708_MODES = (
    {"format": "SRGGB10_CSI2P", "bit_depth": 10, "size": (1536, 864), "fps": 120.13, "crop_limits": (768, 432, 3072, 1728)},
    {"format": "SRGGB10_CSI2P", "bit_depth": 10, "size": (2304, 1296), "fps": 56.03, "crop_limits": (0, 0, 4608, 2592)},
    {"format": "SRGGB10_CSI2P", "bit_depth": 10, "size": (4608, 2592), "fps": 14.35, "crop_limits": (0, 0, 4608, 2592)},
)
SENSORS = {
    "imx219": {"modes": IMX219_MODES, "pixel_array": (3280, 2464), "af": False, "address": "imx219@10"},
    "imx708": {"modes": IMX708_MODES, "pixel_array": (4608, 2592), "af": True, "address": "imx708@1a"},
}


class Preview(enum.Enum):
    NULL = 0
    DRM = 1
    QT = 2
    QTGL = 3


class FakeState:
    """Knobs and records shared by every fake camera of one fake module."""

    def __init__(self, cameras: int = 1, drm_ok: bool = True, sensor: str = "imx219") -> None:
        self.cameras = cameras  # CSI cameras
        self.usb_cameras = 0  # USB webcams libcamera also lists
        self.sensor = sensor
        # "hdmi": a monitor; "none": nothing plugged in; "desktop": a desktop holds the DRM master;
        # "nocard": no DRM device at all (pykms.Card() raises)
        self.display = "hdmi" if drm_ok else "nocard"
        self.frame_period_s = 0.003
        self.vblank_s = 1 / 60
        self.close_delay_s = 0.0
        self.sensor_mode_queries = 0
        self.opened: list[FakePicamera2] = []
        self.overlays: list[np.ndarray | None] = []
        self.overlay_buffers = 0  # DRM dumb buffers allocated by set_overlay
        self.commits = 0
        self.commit_wait_s = 0.0  # time spent blocked in commit_sync waiting for the vertical blank
        self.failed_commits = 0  # commits the kernel refused (and picamera2 ignored)
        self.render_lock_wait_s = 0.0  # time the camera loop waited for the DRM lock set_overlay held
        self.captures = 0
        self.pipes_open = 0
        self.acquired: set[int] = set()
        self.manager = FakeCameraManager()
        self.lock = threading.Lock()
        # failure injection: a callable(capture_index) that may raise, return STALL or a replacement array
        self.on_capture = None
        self.fail_open = 0  # the next N constructions raise
        self.stalled = False  # frames stop until a camera is closed

    @property
    def drm_ok(self) -> bool:
        return self.display == "hdmi"

    @drm_ok.setter
    def drm_ok(self, ok: bool) -> None:
        self.display = "hdmi" if ok else "nocard"

    def stall(self) -> None:
        """The camera stops delivering frames (a loose cable) until a camera is closed."""
        self.stalled = True

    def camera_info(self) -> list[dict]:
        """What ``Picamera2.global_camera_info`` returns: CSI cameras first, USB cameras last."""
        sensor = SENSORS[self.sensor]
        cams = [{"Model": self.sensor, "Location": 2, "Rotation": 180,
                 "Id": f"/base/soc/i2c0mux/i2c@{i}/{sensor['address']}"} for i in range(self.cameras)]
        cams += [{"Model": "UVC Camera (046d:0825)", "Id": f"/base/soc/usb@7e980000/usb-port@1/usb-port@{i + 1}-1.{i}"}
                 for i in range(self.usb_cameras)]
        for num, cam in enumerate(cams):
            cam["Num"] = num
        # picamera2.py global_camera_info: sorted by ("/usb" not in Id, Id), reversed: USB to the back.
        return sorted(cams, key=lambda c: ("/usb" not in c["Id"], c["Id"]), reverse=True)


class FakeCameraManager:
    """picamera2.py ``CameraManager``: index -> camera, and whether its request thread runs."""

    def __init__(self) -> None:
        self.cameras: dict[int, FakePicamera2] = {}
        self.running = False
        self._lock = threading.Lock()

    def add(self, index: int, camera: FakePicamera2) -> None:
        with self._lock:
            self.cameras[index] = camera
            self.running = True

    def cleanup(self, index: int) -> None:
        with self._lock:
            del self.cameras[index]  # whoever holds the index now
            if not self.cameras:
                self.running = False

    def delivers_to(self, camera: FakePicamera2) -> bool:
        with self._lock:
            return self.running and self.cameras.get(camera.camera_idx) is camera


def _yuv420(width: int, height: int, stride: int, n: int) -> np.ndarray:
    arr = np.full((height * 3 // 2, stride), PAD_VALUE, dtype=np.uint8)
    y = (np.arange(width, dtype=np.int32)[None, :] + np.arange(height, dtype=np.int32)[:, None] + n) % 200
    arr[:height, :width] = y.astype(np.uint8)
    arr[height:, :stride] = 128
    return arr


def make_module(cameras: int = 1, drm_ok: bool = True, sensor: str = "imx219",
                version: tuple[int, int, int] = (0, 3, 36)) -> types.ModuleType:
    """A module object to install as ``sys.modules["picamera2"]``; its ``state`` holds the knobs.

    ``version`` older than (0, 3, 17): ``capture_array(wait=<number>)`` waits for ever (``dispatch_functions``
    then only tested ``wait`` for truth); older than (0, 3, 13): ``create_preview_configuration`` has no
    ``sensor``; older than (0, 3, 20): no ``cancel_all_and_flush``. Raspberry Pi OS Bookworm shipped 0.3.12.
    """
    state = FakeState(cameras, drm_ok, sensor)
    module = types.ModuleType("picamera2")
    module.__doc__ = "FAKE picamera2 for tests (tests/fakes/fake_picamera2.py)"
    module.state = state
    module.Preview = Preview
    state.version = version

    class Picamera2(FakePicamera2):
        _state = state

        if version < (0, 3, 13):
            def create_preview_configuration(self, main=None, lores=None, raw=_UNSET, transform=None,
                                             colour_space=None, buffer_count=4, controls=None, display="main",
                                             encode="main", queue=True):
                return FakePicamera2.create_preview_configuration(
                    self, main, lores, raw, transform, colour_space, buffer_count, controls, display, encode, queue,
                    sensor=None)

        if version < (0, 3, 20):
            cancel_all_and_flush = property(doc="not in picamera2 before 0.3.20")  # AttributeError on access

    module.Picamera2 = Picamera2
    return module


class _Job:
    """job.py ``Job``: functions returning (done, result), a Future the caller waits on."""

    def __init__(self, function, signal_function=None) -> None:
        self.function = function
        self.signal_function = signal_function
        self.future: concurrent.futures.Future = concurrent.futures.Future()
        self.future.set_running_or_notify_cancel()
        self.done = False
        self.result = None

    def execute(self) -> bool:
        try:
            done, result = self.function()
            if done:
                self.done, self.result = True, result
        except Exception as exc:
            self.future.set_exception(exc)
            self.done = True
        return self.done

    def signal(self) -> None:
        if not self.future.done():
            self.future.set_result(self.result)
        if self.signal_function:
            self.signal_function(self)

    def cancel(self) -> None:
        if not self.future.done():
            self.future.set_exception(concurrent.futures.CancelledError())


class _FakeDrm:
    """previews/drm_preview.py ``DrmPreview`` over kms++: a plane reserved at the first frame, blocking commits."""

    def __init__(self, camera: FakePicamera2, x=0, y=0, width=640, height=480, transform=None) -> None:
        st = camera._state
        if st.display == "nocard":  # DrmManager.add: pykms.Card() cannot open a card
            raise RuntimeError("Failed to open card: No such file or directory")
        # DrmManager.add: reserve_connector() / reserve_crtc(None) return None when nothing is plugged in
        self.crtc = None if st.display == "none" else "crtc"
        self.camera = camera
        self.plane = None
        self.overlay_plane = None
        self.overlay_fb = None
        self.lock = threading.Lock()  # DrmPreview.lock: held by render_request and by set_overlay's commit

    def render(self, request: int | None) -> None:
        if self.plane is None:
            if self.crtc is None:  # reserve_overlay_plane / reserve_plane(None, ...) -> None
                raise RuntimeError("Failed to reserve DRM plane")
            self.plane = "plane"
            self.overlay_plane = "overlay plane"
        self.commit_sync()

    def commit_sync(self) -> None:
        st = self.camera._state
        # drmModeAtomicCommit without NONBLOCK returns after the next vertical blank
        now = time.monotonic()
        wait = st.vblank_s - (now % st.vblank_s)
        time.sleep(wait)
        with st.lock:
            st.commits += 1
            st.commit_wait_s += wait
            if st.display == "desktop":
                st.failed_commits += 1  # EACCES: not the DRM master; picamera2 ignores the return value

    def set_overlay(self, overlay) -> None:
        st = self.camera._state
        if self.camera.camera_config["buffer_count"] < 2:
            raise RuntimeError("Need at least buffer_count=2 to set overlay")
        if self.overlay_plane is None:
            raise RuntimeError("Overlays not supported on this device")
        if overlay is not None:
            overlay = np.ascontiguousarray(overlay).copy()  # written into a new pykms.DumbFramebuffer
            with st.lock:
                st.overlay_buffers += 1
        self.overlay_fb = overlay
        with self.lock:
            self.render(None)


class FakePicamera2:
    _state: FakeState

    @classmethod
    def global_camera_info(cls) -> list[dict]:
        return cls._state.camera_info()

    def __init__(self, camera_num: int = 0, tuning=None) -> None:
        st = self._state
        st.pipes_open += 1  # os.pipe2 before anything can fail; only close() closes it
        self._preview = None
        self.is_open = False
        info = self.global_camera_info()[camera_num]  # IndexError without that many cameras
        self.camera_idx = info["Num"]
        self.info = info
        st.manager.add(self.camera_idx, self)
        self.camera_config = None
        self.started = False
        self.closed = False
        self.frames = 0
        self.overlays: list[np.ndarray | None] = []  # this camera's; state.overlays has every camera's
        self.preview_history: list[tuple] = []
        self.calls: list[str] = []  # the lifecycle methods called, in order
        self.lock = threading.Lock()  # Picamera2.lock: the job list
        self._jobs: list[_Job] = []
        self._loop: threading.Thread | None = None
        self._abort = threading.Event()
        self._frame_ready = False
        self.loop_died: BaseException | None = None
        self.sensor_modes_ = None
        usb = "/usb" in info["Id"]
        sensor = SENSORS[st.sensor]
        self.camera_properties = {"Model": info["Model"]}
        self.camera_controls = {"FrameDurationLimits": (33333, 1000000, 33333), "ExposureTime": (1, 1000000, 20000)}
        if not usb:
            self.camera_properties.update(ColorFilterArrangement=0, PixelArraySize=sensor["pixel_array"])
            self.camera_controls["NoiseReductionMode"] = (0, 4, 0)
            if sensor["af"]:
                self.camera_controls["AfMode"] = (0, 2, 0)
        if st.fail_open > 0:
            st.fail_open -= 1
            raise RuntimeError("Camera __init__ sequence did not complete.")
        if self.camera_idx in st.acquired:  # _open_camera: camera.acquire() fails while another holds it
            raise RuntimeError("Camera __init__ sequence did not complete.")
        st.acquired.add(self.camera_idx)
        self.is_open = True
        st.opened.append(self)

    # --- configuration -------------------------------------------------------------------

    def _is_rpi_camera(self) -> bool:
        return "ColorFilterArrangement" in self.camera_properties

    @property
    def sensor_modes(self) -> list[dict]:
        if not self._is_rpi_camera():
            return [{"format": "MJPEG"}]
        if self.sensor_modes_ is None:
            # picamera2 configures the camera once per mode to read its fps and crop: slow
            self._state.sensor_mode_queries += 1
            self.sensor_modes_ = [dict(m) for m in SENSORS[self._state.sensor]["modes"]]
        return self.sensor_modes_

    def create_preview_configuration(self, main=None, lores=None, raw=_UNSET, transform=None, colour_space=None,
                                     buffer_count=4, controls=None, display="main", encode="main", queue=True,
                                     sensor=_UNSET, use_case="preview"):
        # picamera2's defaults are main={}, raw={}, controls={}, sensor={}: a raw stream is made unless raw=None
        main, controls = main or {}, controls or {}
        raw = {} if raw is _UNSET else raw
        sensor = {} if sensor is _UNSET else sensor
        if not self.is_open:
            raise RuntimeError("Camera not opened")
        if not self._is_rpi_camera():
            raw = None
            sensor = None

        def stream(defaults, updates):
            if updates is None:
                return None
            out = dict(defaults)
            for key, value in updates.items():
                if key not in ("format", "size", "stride", "preserve_ar"):
                    raise ValueError(f"Bad key {key!r}: valid stream configuration keys are "
                                     "('format', 'size', 'stride', 'preserve_ar')")
                out[key] = value
            w, h = out["size"]  # align_stream(optimal=False): even sizes
            out["size"] = (w - w % 2, h - h % 2)
            return out

        main = stream({"format": "XBGR8888", "size": (640, 480), "preserve_ar": True}, main)
        lores = stream({"format": "YUV420", "size": main["size"], "preserve_ar": False}, lores)
        raw = None if raw is None else {"format": "SRGGB10_CSI2P", "size": main["size"], **raw}
        if "NoiseReductionMode" in self.camera_controls and "FrameDurationLimits" in self.camera_controls:
            # "Let the framerate vary from 12fps to as fast as possible."
            controls = {"NoiseReductionMode": 1, "FrameDurationLimits": (100, 83333)} | dict(controls)
        if display is not None and display not in ("main", "lores", "raw"):
            raise RuntimeError(f"Display stream {display} was not defined")
        return {"use_case": use_case, "transform": transform, "colour_space": colour_space,
                "buffer_count": buffer_count, "queue": queue, "main": main, "lores": lores, "raw": raw,
                "controls": dict(controls), "sensor": sensor, "display": display, "encode": encode}

    def configure(self, config=None) -> None:
        self.calls.append("configure")
        if self.started:
            raise RuntimeError("Camera must be stopped before configuring")
        config = {k: (dict(v) if isinstance(v, dict) else v) for k, v in config.items()}
        # check_camera_config
        sensor_cfg = config.get("sensor")
        if sensor_cfg:
            bad = set(sensor_cfg) - {"bit_depth", "output_size"}
            if bad:
                raise RuntimeError(f"Unexpected keys {bad} in sensor configuration")
        for name in ("main", "lores"):
            s = config.get(name)
            if s is not None and (s["size"][0] % 2 or s["size"][1] % 2):
                raise RuntimeError("width and height should be even")
        if config["lores"] is not None:
            (mw, mh), (lw, lh) = config["main"]["size"], config["lores"]["size"]
            if lw > mw or lh > mh:
                raise RuntimeError("lores stream dimensions may not exceed main stream")
            if config["lores"]["format"] not in ("YUV420", "YVU420"):
                raise RuntimeError("lores stream must be YUV")  # Platform.VC4: the Zero's ISP
            if not self._is_rpi_camera():
                # The UVC pipeline handler makes one stream; _update_camera_config then indexes the second.
                raise IndexError("list index out of range")
        if self._is_rpi_camera():
            if sensor_cfg and sensor_cfg.get("output_size") is not None:
                want = tuple(sensor_cfg["output_size"])
                depth = sensor_cfg.get("bit_depth", 10)
            else:
                want = tuple((config.get("raw") or config["main"])["size"])
                depth = 10
            mode = min(SENSORS[self._state.sensor]["modes"], key=lambda m: _score_mode(m, depth, want))
            config["sensor"] = {"bit_depth": mode["bit_depth"], "output_size": mode["size"]}
            self.mode = mode
        for name in ("main", "lores"):
            s = config.get(name)
            if s is None:
                continue
            w, _ = s["size"]
            bpp = 4 if s["format"].endswith("8888") else 1
            s["stride"] = -(-w * bpp // 64) * 64  # the VC4 ISP's bytes-per-line alignment
        self.camera_config = config
        self.display_stream_name = config["display"]

    def camera_configuration(self) -> dict:
        return self.camera_config

    # --- the event loop ------------------------------------------------------------------

    @property
    def preview(self):
        """(Preview kind, its keyword arguments) of the running preview, or None."""
        return None if self._preview is None else self._preview[:2]

    def start_preview(self, preview=None, **kwargs) -> None:
        self.calls.append("start_preview")
        if self._preview is not None:
            raise RuntimeError("An event loop is already running")
        if preview is None or preview is False:
            preview = Preview.NULL
        drm = _FakeDrm(self, **kwargs) if preview == Preview.DRM else None  # may raise (no card)
        self._preview = (preview, dict(kwargs), drm)
        self.preview_history.append((preview, dict(kwargs)))
        self._abort.clear()
        self._loop = threading.Thread(target=self._thread_func, name="fake-picamera2-preview", daemon=True)
        self._loop.start()

    def _thread_func(self) -> None:
        # null_preview.py NullPreview.thread_func: handle_request -> process_requests; an exception ends the thread
        st = self._state
        try:
            while not self._abort.is_set():
                time.sleep(st.frame_period_s)
                immediate = False
                with self.lock:
                    immediate = any(getattr(j, "immediate", False) for j in self._jobs)
                if immediate:
                    self._process_requests(frame=False)
                elif self.started and not st.stalled and st.manager.delivers_to(self):
                    self._process_requests(frame=True)
        except BaseException as exc:
            self.loop_died = exc

    def _process_requests(self, frame: bool) -> None:
        if frame:
            self.frames += 1
        self._frame_ready = frame  # capture_array_ needs a completed request
        finished = []
        with self.lock:
            while self._jobs:
                if self._jobs[0].execute():
                    finished.append(self._jobs.pop(0))
                else:
                    break
        if frame and self._preview is not None and self._preview[2] is not None and self.display_stream_name:
            drm = self._preview[2]
            t0 = time.monotonic()
            with drm.lock:  # DrmPreview.render_request
                waited = time.monotonic() - t0
                with self._state.lock:
                    self._state.render_lock_wait_s += waited  # the camera loop held up by set_overlay's commit
                drm.render(self.frames)  # raises at the first frame with nothing plugged in
        for job in finished:
            job.signal()

    def _dispatch(self, function, wait, signal_function=None, immediate=False):
        # dispatch_functions: wait None means "wait unless given a signal_function"; a number is a timeout
        # (from 0.3.17), False returns the job to pass to wait()
        if wait is None:
            wait = signal_function is None
        if wait is not True and wait and getattr(self._state, "version", (0, 3, 36)) < (0, 3, 17):
            wait = True  # before 0.3.17 a number only meant "wait"
        job = _Job(function, signal_function)
        job.immediate = immediate
        with self.lock:
            self._jobs.append(job)
        if not wait:
            return job
        timeout = None if wait is True else wait
        return job.future.result(timeout=timeout)  # concurrent.futures.TimeoutError is TimeoutError

    def wait(self, job, timeout=None):
        """Picamera2.wait: the finished job's result (or its exception)."""
        return job.future.result(timeout=timeout)

    def start(self, config=None, show_preview=False) -> None:
        self.calls.append("start")
        if self.camera_config is None:
            raise RuntimeError("Camera has not been configured")
        if show_preview is not None and self._preview is None:
            self.start_preview(show_preview)
        self.started = True

    def _stop_(self):
        self.started = False
        return True, None

    def stop(self) -> None:
        self.calls.append("stop")
        if not self.started:
            return
        if self._preview is not None:  # the event loop stops the camera: a job (immediate)
            self._dispatch(self._stop_, True, immediate=True)
        else:
            self._stop_()

    def stop_preview(self) -> None:
        self.calls.append("stop_preview")
        if self._preview is None:
            raise RuntimeError("No preview specified.")
        self._abort.set()
        self._loop.join()  # NullPreview.stop: joins the preview thread
        self._preview = None

    def cancel_all_and_flush(self) -> None:
        self.calls.append("cancel_all_and_flush")
        with self.lock:
            for job in self._jobs:
                job.cancel()
            self._jobs = []

    def close(self) -> None:
        self.calls.append("close")
        st = self._state
        if self._preview is not None:
            self.stop_preview()
        if not self.is_open:
            return
        self.stop()
        st.acquired.discard(self.camera_idx)  # camera.release()
        self.is_open = False
        if st.close_delay_s:
            time.sleep(st.close_delay_s)
        self.closed = True
        st.pipes_open -= 1
        st.stalled = False  # a fresh camera delivers again
        st.manager.cleanup(self.camera_idx)  # KeyError when already gone

    # --- capture -------------------------------------------------------------------------

    def capture_array(self, name: str = "main", wait=None, signal_function=None):
        return self._dispatch(lambda: self._capture_array_(name), wait, signal_function)

    def _capture_array_(self, name):
        if not self._frame_ready:
            return False, None
        self._frame_ready = False  # completed_requests.pop(0)
        stream = self.camera_config.get(name)
        if stream is None:
            raise RuntimeError(f"Stream {name!r} is not defined")
        st = self._state
        with st.lock:
            n = st.captures
            st.captures += 1
        if st.on_capture is not None:
            replacement = st.on_capture(n)
            if replacement is STALL:
                st.stall()
                return False, None
            if replacement is not None:
                return True, replacement
        w, h = stream["size"]
        if stream["format"] in ("YUV420", "YVU420"):
            return True, _yuv420(w, h, stream["stride"], n)
        return True, np.full((h, w, 4), n % 256, dtype=np.uint8)

    def set_overlay(self, overlay) -> None:
        if self._preview is None:
            raise RuntimeError("No preview specified.")
        if overlay is not None and (overlay.ndim != 3 or overlay.shape[2] != 4):
            raise RuntimeError("Overlay must be a 4-channel image")
        drm = self._preview[2]
        if drm is None:
            return  # NullPreview.set_overlay does nothing
        drm.set_overlay(overlay)
        kept = None if overlay is None else drm.overlay_fb
        self.overlays.append(kept)
        self._state.overlays.append(kept)


def _score_mode(mode: dict, bit_depth: int, output_size: tuple[int, int]) -> float:
    """picamera2.py ``_make_libcamera_config.score_mode``: how libcamera scores a sensor mode for a size."""
    def score_format(desired, actual):
        score = desired - actual
        return -score / 4 if score < 0 else score * 2

    ar = output_size[0] / output_size[1]
    mw, mh = mode["size"]
    score = score_format(output_size[0], mw) + score_format(output_size[1], mh)
    score += 1500 * score_format(ar, mw / mh)
    score += 500 * abs(bit_depth - mode["bit_depth"])
    return score
