"""Frame sources: the Pi camera, OpenCV (file, webcam, stream), an image folder, the demo.

Every source has the same small interface::

    src.open()          # may raise SourceError (or anything: the capture thread contains it)
    src.read()          # -> uint8 (H,W) grey or (H,W,3) BGR, or None at the end of a file
    src.close()         # never raises

``frames(src)`` wraps one into an iterator of ``Frame(pixels, seq, t)``; the
capture thread (app/capture.py) numbers and stamps frames itself so that the
sequence keeps counting across reopens. A source object is used for one
open/close cycle; the capture thread asks its factory for a fresh one to reopen.
"""

from __future__ import annotations

import glob
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from app.config import ConfigError, SourceConfig

if TYPE_CHECKING:
    from app.sinks import DrmPreview

log = logging.getLogger("xnorcam.sources")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".pgm", ".ppm")
DEMO_DIR = Path(__file__).resolve().parent / "assets" / "demo"


class Frame(NamedTuple):
    """One captured image: uint8 grey (H,W) or BGR (H,W,3), its sequence number, time.monotonic()."""

    pixels: np.ndarray
    seq: int
    t: float


class SourceError(RuntimeError):
    """The source could not be opened or read; the capture thread retries."""


class Source:
    """Base class: a null source that never produces a frame (only ends)."""

    name = "null"
    #: files end; cameras and streams do not (a failed read there is an outage)
    finite = False

    def open(self) -> None:
        pass

    def read(self) -> np.ndarray | None:
        return None

    def close(self) -> None:
        pass

    def __enter__(self) -> Source:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def frames(source: Source, start_seq: int = 0) -> Iterator[Frame]:
    """Open ``source`` and yield its frames as ``Frame`` until it ends."""
    seq = start_seq
    with source:
        while True:
            pixels = source.read()
            if pixels is None:
                return
            yield Frame(pixels, seq, time.monotonic())
            seq += 1


class _Pacer:
    """Spaces reads ``1/fps`` apart on the monotonic clock; fps 0 means no pacing."""

    def __init__(self, fps: float, sleep: Callable[[float], None] = time.sleep) -> None:
        self.period = 1.0 / fps if fps > 0 else 0.0
        self._next: float | None = None
        self._sleep = sleep

    def wait(self) -> None:
        if self.period == 0.0:
            return
        now = time.monotonic()
        if self._next is None:
            self._next = now
        delay = self._next - now
        if delay > 0:
            self._sleep(delay)
        # Never try to catch up after a stall: that would burst frames.
        self._next = max(self._next, now - self.period) + self.period


# --- images ------------------------------------------------------------------


def list_images(target: str) -> list[Path]:
    """The image files named by a directory or a glob pattern, sorted."""
    path = Path(target).expanduser()
    if path.is_dir():
        files = [p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    else:
        files = [Path(p) for p in glob.glob(os.path.expanduser(target))]
        files = [p for p in files if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    return sorted(files)


class ImagesSource(Source):
    """A folder or glob of images played at ``fps`` (0: as fast as they are taken), optionally looping."""

    name = "images"
    finite = True

    def __init__(self, target: str, fps: float = 5.0, loop: bool = False, grey: bool = False) -> None:
        self.target = target
        self.loop = loop
        self.grey = grey
        self._pacer = _Pacer(fps)
        self._files: list[Path] = []
        self._index = 0
        self.skipped = 0

    def open(self) -> None:
        self._files = list_images(self.target)
        if not self._files:
            raise SourceError(f"images:{self.target}: no image files ({', '.join(IMAGE_SUFFIXES)})")
        self._index = 0

    def read(self) -> np.ndarray | None:
        import cv2

        # Bounded: one pass over the list at most, so a folder of unreadable files ends.
        for _ in range(len(self._files)):
            if self._index >= len(self._files):
                if not self.loop:
                    return None
                self._index = 0
            path = self._files[self._index]
            self._index += 1
            image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE if self.grey else cv2.IMREAD_COLOR)
            if image is None or image.size == 0:
                self.skipped += 1
                log.warning("images: skipping unreadable file %s", path)
                continue
            self._pacer.wait()
            return image
        if self._index >= len(self._files) and not self.loop:
            return None
        raise SourceError(f"images:{self.target}: no readable image files")


# --- demo --------------------------------------------------------------------


class DemoSource(ImagesSource):
    """Needs nothing: a slow pan and zoom across the bundled photos (app/assets/demo)."""

    name = "demo"
    finite = False

    def __init__(
        self,
        width: int = 320,
        height: int = 240,
        fps: float = 15.0,
        frames_per_photo: int = 60,
        directory: Path = DEMO_DIR,
    ) -> None:
        super().__init__(str(directory), fps=fps, loop=True)
        self.size = (int(width), int(height))
        self.frames_per_photo = max(1, int(frames_per_photo))
        self._photos: list[np.ndarray] = []
        self._step = 0

    def open(self) -> None:
        import cv2

        super().open()
        photos = [cv2.imread(str(p), cv2.IMREAD_COLOR) for p in self._files]
        self._photos = [p for p in photos if p is not None]
        if not self._photos:
            raise SourceError(f"demo: no readable photos in {self.target}")
        self._step = 0

    def read(self) -> np.ndarray:
        import cv2

        photo = self._photos[(self._step // self.frames_per_photo) % len(self._photos)]
        phase = (self._step % self.frames_per_photo) / self.frames_per_photo
        self._step += 1
        h, w = photo.shape[:2]
        out_w, out_h = self.size
        # Fill the frame (no bars: their edges look like people to a small detector) and
        # zoom in a little while drifting down from the top, where the heads are.
        scale = min(w / out_w, h / out_h) / (1.0 + 0.15 * phase)
        cw, ch = out_w * scale, out_h * scale
        x0 = (w - cw) * (0.35 + 0.3 * phase)
        y0 = (h - ch) * 0.4 * phase
        m = np.array([[1 / scale, 0, -x0 / scale], [0, 1 / scale, -y0 / scale]], dtype=np.float64)
        frame = cv2.warpAffine(photo, m, self.size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        self._pacer.wait()
        return frame


# --- OpenCV ------------------------------------------------------------------


def parse_opencv_target(target: str) -> int | str:
    """``"0"`` is webcam index 0; anything else is a file path or a URL."""
    return int(target) if target.isdigit() else target


def _is_url(target: int | str) -> bool:
    return isinstance(target, str) and "://" in target


class OpenCVSource(Source):
    """A video file, a V4L2 webcam index or an RTSP/HTTP URL through cv2.VideoCapture."""

    name = "opencv"

    def __init__(self, target: str, loop: bool = False, fps: float = 0.0) -> None:
        self.target = parse_opencv_target(target)
        self.loop = loop
        self.finite = isinstance(self.target, str) and not _is_url(self.target)
        # Files play as fast as decoded unless paced; cameras and streams pace themselves.
        self._pacer = _Pacer(fps if self.finite else 0.0)
        self._cap = None

    def open(self) -> None:
        import cv2

        cap = cv2.VideoCapture(self.target)
        if not cap.isOpened():
            cap.release()
            raise SourceError(f"opencv:{self.target}: cv2.VideoCapture could not open it")
        self._cap = cap

    def read(self) -> np.ndarray | None:
        import cv2

        if self._cap is None:
            raise SourceError(f"opencv:{self.target}: not open")
        ok, image = self._cap.read()
        if not ok and self.finite and self.loop:
            self._cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
            ok, image = self._cap.read()
        if not ok:
            if self.finite:
                return None
            raise SourceError(f"opencv:{self.target}: read failed")
        self._pacer.wait()
        return image

    def close(self) -> None:
        cap, self._cap = self._cap, None
        if cap is not None:
            try:
                cap.release()
            except Exception:  # closing must not raise: it runs on the error path
                log.debug("opencv release failed", exc_info=True)


# --- picamera2 ---------------------------------------------------------------


def picamera2_available() -> bool:
    """True when picamera2 imports and libcamera lists at least one camera."""
    try:
        from picamera2 import Picamera2
    except Exception:  # ImportError off a Pi; libcamera errors on a broken install
        return False
    try:
        return len(Picamera2.global_camera_info()) > 0
    except Exception:
        return False


class Picamera2Source(Source):
    """The Pi camera: a YUV420 ``lores`` stream for detection (its Y plane) and a ``main`` stream for preview.

    ``drm`` is the preview that shows ``main`` on HDMI (``app.sinks.DrmPreview``),
    or None for a headless camera. The source only offers it each camera it
    opens (``attach``, between ``configure`` and ``start``) and closes
    (``detach``); the preview starts picamera2's DRM preview and sets the
    overlay itself. We never copy the preview frame.
    """

    name = "picamera2"

    def __init__(
        self,
        width: int = 320,
        height: int = 240,
        preview_size: tuple[int, int] = (640, 480),
        camera_num: int = 0,
        drm: DrmPreview | None = None,
    ) -> None:
        self.size = (int(width), int(height))
        self.preview_size = (int(preview_size[0]), int(preview_size[1]))
        self.camera_num = camera_num
        self.drm = drm
        self.camera = None
        self._lores_size = self.size

    def open(self) -> None:
        from picamera2 import Picamera2  # only on a Pi

        camera = Picamera2(self.camera_num)
        self.camera = camera
        show = self.drm is not None and self.drm.wanted
        config = camera.create_preview_configuration(
            main={"size": self.preview_size, "format": "XBGR8888"},
            lores={"size": self.size, "format": "YUV420"},
            display="main" if show else None,
            buffer_count=4,
        )
        camera.configure(config)
        if show:
            self.drm.attach(camera, self.preview_size)
        camera.start()
        # picamera2 may align the requested size; crop to what was configured.
        actual = camera.camera_configuration()["lores"]
        self._lores_size = tuple(actual["size"])

    def read(self) -> np.ndarray:
        if self.camera is None:
            raise SourceError("picamera2: not open")
        yuv = self.camera.capture_array("lores")
        w, h = self._lores_size
        # A YUV420 array is (h*3/2, stride): Y rows first, then U and V; the row
        # stride may be padded past the width.
        if yuv.ndim != 2 or yuv.shape[0] < h or yuv.shape[1] < w:
            raise SourceError(f"picamera2: lores buffer shape {yuv.shape} cannot hold a {w}x{h} Y plane")
        return np.ascontiguousarray(yuv[:h, :w])

    def close(self) -> None:
        camera, self.camera = self.camera, None
        if camera is None:
            return
        if self.drm is not None:
            self.drm.detach(camera)
        for step in ("stop_preview", "stop", "close"):
            try:
                getattr(camera, step)()
            except Exception:
                log.debug("picamera2 %s failed", step, exc_info=True)


# --- spec strings ------------------------------------------------------------


def resolve_spec(spec: str, probe: Callable[[], bool] = picamera2_available) -> str:
    """``auto`` becomes ``picamera2`` when a camera is there, else ``demo``."""
    if spec == "auto":
        return "picamera2" if probe() else "demo"
    return spec


def preflight(spec: str) -> None:
    """Refuse a source that cannot work before anything is opened (exit 78, not a retry loop)."""
    kind, _, arg = spec.partition(":")
    if kind == "images" and not list_images(arg):
        raise ConfigError(f"source.spec = {spec!r}: no image files there ({', '.join(IMAGE_SUFFIXES)})")
    if kind == "opencv":
        target = parse_opencv_target(arg)
        if isinstance(target, str) and not _is_url(target) and not Path(target).expanduser().exists():
            raise ConfigError(f"source.spec = {spec!r}: no such file")
    if kind == "demo" and not list_images(str(DEMO_DIR)):
        raise ConfigError(f"source.spec = 'demo': the bundled photos are missing from {DEMO_DIR}")


def make_factory(spec: str, cfg: SourceConfig, drm: DrmPreview | None = None) -> Callable[[], Source]:
    """A function that makes a fresh, unopened source for a resolved spec.

    ``drm``, the DRM preview (``app.sinks.DrmPreview``), is handed to every
    picamera2 source it makes; None keeps the camera headless.
    """
    kind, _, arg = spec.partition(":")
    if kind == "demo":
        return lambda: DemoSource(cfg.width, cfg.height, fps=cfg.fps)
    if kind == "images":
        return lambda: ImagesSource(arg, fps=cfg.fps, loop=cfg.loop)
    if kind == "opencv":
        return lambda: OpenCVSource(arg, loop=cfg.loop, fps=cfg.fps)
    if kind == "picamera2":
        return lambda: Picamera2Source(
            cfg.width, cfg.height, (cfg.preview_width, cfg.preview_height), cfg.camera_num, drm
        )
    raise ConfigError(f"source.spec = {spec!r} is not allowed")
