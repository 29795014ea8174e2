"""A FAKE of the part of picamera2's API that app/sources.py and app/sinks.py use.

picamera2 only installs on a Raspberry Pi (it needs libcamera), so tests put
this in ``sys.modules["picamera2"]``. It mimics the real behaviour that
matters to us, as documented by picamera2 (Appendix A of its manual and
picamera2/picamera2.py, previews/drm_preview.py):

- ``Picamera2.global_camera_info()`` lists cameras; ``Picamera2()`` raises
  RuntimeError("Camera __init__ sequence did not complete.") without one.
- ``create_preview_configuration(main=, lores=, display=, buffer_count=)``;
  ``configure`` before ``start``; ``start_preview`` before ``start``.
- A YUV420 stream's ``capture_array`` is (height*3/2, stride) uint8: Y rows,
  then U and V packed two rows per array row; the stride is padded to a
  multiple of 64 bytes, so columns past the width are junk.
- ``camera_configuration()["lores"]`` has ``size``, ``stride``, ``format``.
- ``start_preview(Preview.DRM, ...)`` raises when there is no display (pykms
  cannot open a card or reserve a connector).
- ``set_overlay(rgba)`` needs a started preview, ``buffer_count >= 2`` and an
  (H,W,4) array; ``None`` clears it.
"""

from __future__ import annotations

import enum
import threading
import time
import types

import numpy as np

PAD_VALUE = 0xEE  # what sits in the stride padding: never a real Y value in our pattern


class Preview(enum.Enum):
    NULL = 0
    DRM = 1
    QT = 2
    QTGL = 3


class FakeState:
    """Knobs and records shared by every fake camera of one fake module."""

    def __init__(self, cameras: int = 1, drm_ok: bool = True) -> None:
        self.cameras = cameras
        self.drm_ok = drm_ok
        self.opened: list[FakePicamera2] = []
        self.overlays: list[np.ndarray | None] = []
        self.captures = 0
        # failure injection: a callable(capture_index) that may raise, hang or return a replacement array
        self.on_capture = None
        self.fail_open = 0  # the next N constructions raise
        self.hang_event = threading.Event()


def _yuv420(width: int, height: int, stride: int, n: int) -> np.ndarray:
    arr = np.full((height * 3 // 2, stride), PAD_VALUE, dtype=np.uint8)
    y = (np.arange(width, dtype=np.int32)[None, :] + np.arange(height, dtype=np.int32)[:, None] + n) % 200
    arr[:height, :width] = y.astype(np.uint8)
    arr[height:, : stride] = 128
    return arr


def make_module(cameras: int = 1, drm_ok: bool = True) -> types.ModuleType:
    """A module object to install as ``sys.modules["picamera2"]``; its ``state`` holds the knobs."""
    state = FakeState(cameras, drm_ok)
    module = types.ModuleType("picamera2")
    module.__doc__ = "FAKE picamera2 for tests (tests/fakes/fake_picamera2.py)"
    module.state = state
    module.Preview = Preview

    class Picamera2(FakePicamera2):
        _state = state

    module.Picamera2 = Picamera2
    return module


class FakePicamera2:
    _state: FakeState

    @classmethod
    def global_camera_info(cls) -> list[dict]:
        return [{"Model": "imx708", "Location": 2, "Rotation": 0, "Id": f"/base/fake@{i}"} for i in range(cls._state.cameras)]

    def __init__(self, camera_num: int = 0, tuning=None) -> None:
        st = self._state
        if st.fail_open > 0:
            st.fail_open -= 1
            raise RuntimeError("Camera __init__ sequence did not complete.")
        if camera_num >= st.cameras:
            raise RuntimeError("Camera __init__ sequence did not complete.")
        self.camera_num = camera_num
        self.camera_config = None
        self.started = False
        self.preview = None
        self.closed = False
        self.frames = 0
        self.overlays: list[np.ndarray | None] = []  # this camera's; state.overlays has every camera's
        st.opened.append(self)

    def create_preview_configuration(self, main=None, lores=None, raw=None, transform=None, colour_space=None,
                                     buffer_count=4, controls=None, display="main", encode="main", **kwargs):
        config = {"use_case": "preview", "buffer_count": buffer_count, "display": display, "encode": encode,
                  "main": {"format": "XBGR8888", "size": (640, 480), **(main or {})},
                  "lores": None if lores is None else {"format": "YUV420", "size": (320, 240), **lores},
                  "controls": dict(controls or {})}
        if config["lores"] is not None and config["lores"]["format"] not in ("YUV420", "YVU420", "XBGR8888", "XRGB8888"):
            raise RuntimeError(f"lores stream format {config['lores']['format']} not supported")
        return config

    def configure(self, config) -> None:
        if self.started:
            raise RuntimeError("Camera must be stopped before configuring")
        config = {k: (dict(v) if isinstance(v, dict) else v) for k, v in config.items()}
        for name in ("main", "lores"):
            stream = config.get(name)
            if stream is None:
                continue
            w, h = stream["size"]
            w, h = w - w % 2, h - h % 2  # libcamera wants even YUV420 sizes
            stream["size"] = (w, h)
            bpp = 4 if stream["format"].endswith("8888") else 1
            stream["stride"] = -(-w * bpp // 64) * 64
        self.camera_config = config

    def camera_configuration(self) -> dict:
        return self.camera_config

    def start_preview(self, preview=False, **kwargs) -> None:
        if self.preview is not None:
            raise RuntimeError("An event loop is already running")
        if preview == Preview.DRM and not self._state.drm_ok:
            raise RuntimeError("DRM: failed to reserve connector (no display, or another DRM master owns it)")
        self.preview = (preview, kwargs)

    def stop_preview(self) -> None:
        self.preview = None

    def start(self) -> None:
        if self.camera_config is None:
            raise RuntimeError("Camera has not been configured")
        if self.preview is None:
            self.preview = (Preview.NULL, {})
        self.started = True

    def stop(self) -> None:
        self.started = False

    def close(self) -> None:
        self.started = False
        self.closed = True
        self._state.hang_event.set()  # closing a camera ends a pending (hung) capture

    def capture_array(self, name: str = "main", wait=None):
        if not self.started:
            raise RuntimeError("Camera must be started")
        stream = self.camera_config.get(name)
        if stream is None:
            raise KeyError(name)
        st = self._state
        n = st.captures
        st.captures += 1
        self.frames += 1
        if st.on_capture is not None:
            replacement = st.on_capture(n)
            if replacement is not None:
                return replacement
        time.sleep(0.002)  # a camera delivers frames, it does not spin
        w, h = stream["size"]
        if stream["format"] in ("YUV420", "YVU420"):
            return _yuv420(w, h, stream["stride"], n)
        return np.full((h, stream["stride"] // 4, 4), n % 256, dtype=np.uint8)

    def set_overlay(self, overlay) -> None:
        if self.preview is None or not self.started:
            raise RuntimeError("Preview must be started before setting an overlay")
        if self.camera_config["buffer_count"] < 2:
            raise RuntimeError("Need at least buffer_count=2 to set overlay")
        if overlay is not None:
            if not (isinstance(overlay, np.ndarray) and overlay.ndim == 3 and overlay.shape[2] == 4):
                raise ValueError("overlay must be an (H,W,4) RGBA array")
            overlay = overlay.copy()  # the real one copies it into a DRM dumb buffer
        self.overlays.append(overlay)
        self._state.overlays.append(overlay)
