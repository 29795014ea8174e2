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
import importlib.util
import inspect
import logging
import os
import threading
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
    """The source could not be opened or read; the capture thread retries a live source."""


class PermanentSourceError(SourceError):
    """Retrying cannot help: the capture thread stops and ``python -m app`` exits ``exit_code``.

    65 (bad data: a file that cannot be decoded) or 78 (this machine or the
    configuration cannot run the source, e.g. the picamera2 module is missing).
    """

    def __init__(self, message: str, exit_code: int = 65) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def one_line(exc: BaseException) -> str:
    """``Type: message`` on one line (OpenCV's errors span several)."""
    text = " ".join(str(exc).split())
    if isinstance(exc, SourceError) and text:
        return text  # our own messages name the source already
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def opencv_name_problem(path: object) -> str | None:
    """Why OpenCV cannot be handed ``path`` by name, or None. A file name that is not UTF-8 (Latin-1 bytes:
    Python keeps them as surrogates) crashes cv2.imread, VideoCapture and VideoWriter with SIGSEGV."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        return f"{os.fsencode(str(path))!r}: the name is not UTF-8, which OpenCV cannot open by name; rename it"
    return None


def imread(path: object, flags: int) -> np.ndarray | None:
    """cv2.imread, safe for any file name: one OpenCV cannot take (``opencv_name_problem``) is read by Python
    and decoded from memory."""
    import cv2

    if opencv_name_problem(path) is None:
        return cv2.imread(str(path), flags)
    with open(str(path), "rb") as fh:
        data = np.frombuffer(fh.read(), np.uint8)
    return cv2.imdecode(data, flags) if data.size else None


def frame_problem(pixels: object) -> str | None:
    """Why ``pixels`` is not a usable frame, or None when it is."""
    if not isinstance(pixels, np.ndarray):
        return f"not an array ({type(pixels).__name__})"
    if pixels.dtype != np.uint8:
        return f"dtype {pixels.dtype}, expected uint8"
    if pixels.ndim == 3 and pixels.shape[2] == 3:
        pass
    elif pixels.ndim != 2:
        return f"shape {pixels.shape}, expected (H,W) or (H,W,3)"
    if pixels.shape[0] < 2 or pixels.shape[1] < 2:
        return f"empty image (shape {pixels.shape})"
    return None


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

    def take_skips(self) -> list[tuple[str, str]]:
        """(item, why) for each part of the input skipped since the last call (an unreadable file)."""
        return []

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


# --- image headers -----------------------------------------------------------

#: the most pixels an image file may declare, unless ``source.max_pixels`` says otherwise
DEFAULT_MAX_PIXELS = SourceConfig.max_pixels


class ImageHeaderError(ValueError):
    """The file's header does not say the image's size in a format we read."""


def _u16(b: bytes, o: int, big: bool) -> int:
    return int.from_bytes(b[o:o + 2], "big" if big else "little")


def _u32(b: bytes, o: int, big: bool) -> int:
    return int.from_bytes(b[o:o + 4], "big" if big else "little")


def _jpeg_size(fh) -> tuple[int, int]:
    fh.seek(2)
    sof = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
    for _ in range(4096):  # segments before the frame header: APPn, DQT, DHT, comments
        b = fh.read(1)
        while b == b"\xff":
            b = fh.read(1)  # fill bytes, then the marker
        if not b:
            break
        marker = b[0]
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:
            continue  # markers without a length
        if marker in (0xD9, 0xDA):
            break  # end of image or scan data before any frame header
        head = fh.read(2)
        if len(head) < 2:
            break
        length = _u16(head, 0, True)
        if length < 2:
            break
        if marker in sof:
            body = fh.read(5)
            if len(body) < 5:
                break
            return _u16(body, 3, True), _u16(body, 1, True)
        fh.seek(length - 2, 1)
        if fh.read(1) != b"\xff":  # the next segment must start here
            break
        fh.seek(-1, 1)
    raise ImageHeaderError("JPEG without a readable frame header")


def _tiff_size(fh, head: bytes) -> tuple[int, int]:
    big = head[:2] == b"MM"
    version = _u16(head, 2, big)
    if version == 42:
        fh.seek(_u32(head, 4, big))
        n = _u16(fh.read(2), 0, big)
        entry, value_at = 12, 8
    elif version == 43:  # BigTIFF
        fh.seek(int.from_bytes(head[8:16], "big" if big else "little"))
        n = int.from_bytes(fh.read(8), "big" if big else "little")
        entry, value_at = 20, 12
    else:
        raise ImageHeaderError(f"TIFF version {version}")
    data = fh.read(entry * min(n, 4096))
    size: dict[int, int] = {}
    for i in range(len(data) // entry):
        e = data[i * entry:(i + 1) * entry]
        tag, kind = _u16(e, 0, big), _u16(e, 2, big)
        if tag in (256, 257):
            if kind == 3:
                size[tag] = _u16(e, value_at, big)
            elif kind == 4:
                size[tag] = _u32(e, value_at, big)
            elif kind == 16:
                size[tag] = int.from_bytes(e[value_at:value_at + 8], "big" if big else "little")
    if 256 not in size or 257 not in size:
        raise ImageHeaderError("TIFF without ImageWidth and ImageLength")
    return size[256], size[257]


def _pnm_size(fh, head: bytes) -> tuple[int, int]:
    fh.seek(0)
    text = fh.read(4096)
    if head[1:2] == b"7":  # PAM: WIDTH and HEIGHT lines before ENDHDR
        fields = dict(line.split(None, 1) for line in text.split(b"\n") if len(line.split(None, 1)) == 2)
        try:
            return int(fields[b"WIDTH"]), int(fields[b"HEIGHT"])
        except (KeyError, ValueError):
            raise ImageHeaderError("PAM without WIDTH and HEIGHT") from None
    tokens: list[bytes] = []
    for line in text[2:].split(b"\n"):
        tokens += line.split(b"#", 1)[0].split()
        if len(tokens) >= 2:
            break
    try:
        return int(tokens[0]), int(tokens[1])
    except (IndexError, ValueError):
        raise ImageHeaderError("PNM without a width and height") from None


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) as the file's header declares it, read without decoding the pixels.

    Knows the formats of ``IMAGE_SUFFIXES`` by their first bytes (whatever the
    name says): JPEG, PNG, BMP, WebP, TIFF (and BigTIFF), PNM/PAM. Raises
    ``ImageHeaderError`` for anything else or a header cut short, OSError when
    the file cannot be read.
    """
    with open(path, "rb") as fh:
        head = fh.read(32)
        if head[:3] == b"\xff\xd8\xff":
            return _jpeg_size(fh)
        if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
            return _u32(head, 16, True), _u32(head, 20, True)
        if head[:2] == b"BM" and len(head) >= 26:
            if _u32(head, 14, False) == 12:  # BITMAPCOREHEADER
                return _u16(head, 18, False), _u16(head, 20, False)
            w = int.from_bytes(head[18:22], "little", signed=True)
            h = int.from_bytes(head[22:26], "little", signed=True)
            return abs(w), abs(h)  # a negative height is a top-down bitmap
        if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
            chunk = head[12:16]
            if chunk == b"VP8X":
                return (int.from_bytes(head[24:27], "little") + 1, int.from_bytes(head[27:30], "little") + 1)
            if chunk == b"VP8L" and head[20] == 0x2F:
                bits = int.from_bytes(head[21:25], "little")
                return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
            if chunk == b"VP8 " and head[23:26] == b"\x9d\x01\x2a":
                return _u16(head, 26, False) & 0x3FFF, _u16(head, 28, False) & 0x3FFF
            raise ImageHeaderError(f"WebP chunk {chunk!r}")
        if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
            return _tiff_size(fh, head)
        if head[:1] == b"P" and head[1:2] in b"1234567" and len(head) > 2 and head[2:3].isspace():
            return _pnm_size(fh, head)
    raise ImageHeaderError("not a JPEG, PNG, BMP, WebP, TIFF or PNM file")


def load_image(path: Path, grey: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray | None, str]:
    """(image, "") or (None, why not): checks the declared size before decoding, then what came out.

    A decompression bomb (a small file declaring a huge image) is refused from
    its header, before a byte of pixels is decoded or allocated; a decoder
    error (including OpenCV's out-of-memory) is a reason, never an exception.
    """
    import cv2

    try:
        w, h = image_size(path)
    except (OSError, ImageHeaderError) as exc:
        return None, f"unreadable header ({exc})"
    if w < 1 or h < 1:
        return None, f"declares {w}x{h} pixels"
    if w * h > max_pixels:
        return None, f"declares {w}x{h} = {w * h / 1e6:.1f} megapixels, over source.max_pixels = {max_pixels}"
    try:
        image = imread(path, cv2.IMREAD_GRAYSCALE if grey else cv2.IMREAD_COLOR)
    except Exception as exc:  # cv2.error (a corrupt stream, out of memory), MemoryError
        return None, f"cannot be decoded ({one_line(exc)})"
    if image is None:
        return None, "cannot be decoded"
    problem = frame_problem(image)
    if problem is not None:
        return None, problem
    if image.shape[0] * image.shape[1] > max_pixels:  # a header that lied
        return None, f"decoded to {image.shape[1]}x{image.shape[0]}, over source.max_pixels = {max_pixels}"
    return image, ""


# --- images ------------------------------------------------------------------


def list_images(target: str) -> list[Path]:
    """The image files named by a directory or a glob pattern, sorted."""
    path = Path(target).expanduser()
    try:  # a folder we may not enter (EACCES, the service's sandbox): no images, said by preflight with the reason
        if path.is_dir():
            files = [p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
        else:
            files = [Path(p) for p in glob.glob(os.path.expanduser(target))]
            files = [p for p in files if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    except (OSError, ValueError):
        return []
    return sorted(files)


def _unreadable_hint(target: str) -> str:
    """Why ``target`` (a folder, a glob or a file) may be invisible here: the service's sandbox, or ''."""
    from app.sandbox import hint

    base = os.path.expanduser(target)
    cut = min((i for i, c in enumerate(base) if c in "*?["), default=None)
    if cut is not None:
        base = os.path.dirname(base[:cut]) or "."
    try:
        os.stat(base)
        error = None
    except OSError as exc:
        error = exc.errno
    except ValueError:
        return ""
    return hint(base, error, writing=False)


class ImagesSource(Source):
    """A folder or glob of images played at ``fps`` (0: as fast as they are taken), optionally looping.

    A file that cannot be used (unreadable, a header over ``max_pixels``, a
    decoder error, an image under 2x2) is skipped, counted in ``skipped``,
    warned about and reported by ``take_skips`` once, and never read again,
    not even when looping. Reading raises only when no usable file is left.
    """

    name = "images"
    finite = True

    def __init__(self, target: str, fps: float = 5.0, loop: bool = False, grey: bool = False,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.target = target
        self.loop = loop
        self.grey = grey
        self.max_pixels = int(max_pixels)
        self._pacer = _Pacer(fps)
        self._files: list[Path] = []
        self._index = 0
        self.skipped = 0
        self._skips: list[tuple[str, str]] = []

    def open(self) -> None:
        self._files = list_images(self.target)
        if not self._files:
            raise SourceError(f"images:{self.target}: no image files ({', '.join(IMAGE_SUFFIXES)})")
        self._index = 0

    def take_skips(self) -> list[tuple[str, str]]:
        skips, self._skips = self._skips, []
        return skips

    def read(self) -> np.ndarray | None:
        while self._files:  # each pass either returns or removes a file: bounded
            if self._index >= len(self._files):
                if not self.loop:
                    return None
                self._index = 0
            path = self._files[self._index]
            image, why = load_image(path, self.grey, self.max_pixels)
            if image is None:
                del self._files[self._index]
                self.skipped += 1
                self._skips.append((str(path), why))
                log.warning("images: skipping %s: %s", path, why)
                continue
            self._index += 1
            self._pacer.wait()
            return image
        raise SourceError(f"images:{self.target}: no usable image files ({self.skipped} skipped)")


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
        super().open()
        photos = [load_image(p, max_pixels=self.max_pixels)[0] for p in self._files]
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
    """A video file, a V4L2 webcam index or an RTSP/HTTP URL through cv2.VideoCapture.

    A stream gets ``timeout_s`` for opening and for each read (OpenCV's FFmpeg
    timeouts), so a server that accepts the connection and then says nothing
    is an open or read failure, retried, not a thread stuck for good. A file
    that will not open, or declares frames over ``max_pixels``, is permanent
    (``PermanentSourceError``): retrying a file cannot mend it.
    """

    name = "opencv"

    def __init__(self, target: str, loop: bool = False, fps: float = 0.0, timeout_s: float = 5.0,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.target = parse_opencv_target(target)
        self.loop = loop
        self.finite = isinstance(self.target, str) and not _is_url(self.target)
        self.timeout_s = float(timeout_s)
        self.max_pixels = int(max_pixels)
        # Files play as fast as decoded unless paced; cameras and streams pace themselves.
        self._pacer = _Pacer(fps if self.finite else 0.0)
        self._cap = None

    def open(self) -> None:
        import cv2

        if _is_url(self.target):
            ms = max(1, int(self.timeout_s * 1000))
            cap = cv2.VideoCapture(self.target, cv2.CAP_ANY,
                                   [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, ms])
        else:
            if opencv_name_problem(self.target):  # refused by preflight; a crash is never the answer
                raise PermanentSourceError(f"opencv: {opencv_name_problem(self.target)}")
            cap = cv2.VideoCapture(self.target)
        if not cap.isOpened():
            cap.release()
            if self.finite:
                raise PermanentSourceError(
                    f"opencv:{self.target}: cv2.VideoCapture could not open it: not a video it can decode "
                    "(empty or corrupt?)")
            raise SourceError(f"opencv:{self.target}: cv2.VideoCapture could not open it")
        w, h = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
        if w * h > self.max_pixels:
            cap.release()
            message = f"opencv:{self.target}: frames of {w}x{h}, over source.max_pixels = {self.max_pixels}"
            raise PermanentSourceError(message) if self.finite else SourceError(message)
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


class SourceTimeout(SourceError):
    """No frame came within the source's own read timeout: reported as a hang, like one the capture thread finds."""


def csi_cameras(picamera2_class) -> list[dict]:
    """The cameras libcamera lists, without USB webcams (their Id contains ``/usb``: use ``opencv:<index>``).

    picamera2's ``global_camera_info`` lists USB cameras last, so a Pi camera's
    index is the same in both lists.
    """
    return [c for c in picamera2_class.global_camera_info() if "/usb" not in str(c.get("Id", ""))]


def picamera2_available() -> bool:
    """True when picamera2 imports and libcamera lists at least one Pi camera (USB webcams do not count)."""
    try:
        from picamera2 import Picamera2
    except Exception:  # ImportError off a Pi; libcamera errors on a broken install
        return False
    try:
        return len(csi_cameras(Picamera2)) > 0
    except Exception:
        return False


def lores_size(network: tuple[int, int] | None, main: tuple[int, int], most: tuple[int, int]) -> tuple[int, int]:
    """The lores (detection) stream's size: the network input's fit at ``main``'s aspect.

    On the VC4 both ISP outputs scale one crop, chosen for ``main``'s aspect, so
    a lores of another aspect would be squashed: the frame keeps ``main``'s
    aspect, and at the network's width or height the letterbox only pads it
    (no resize). Never larger than ``most`` (the configured size) nor than
    ``main`` (picamera2 refuses a lores larger than main); even sizes, which
    YUV420 needs (picamera2 ``check_stream_config``).
    """
    mw, mh = main
    bw, bh = most
    if network is not None:
        bw, bh = min(bw, network[0]), min(bh, network[1])
    scale = min(bw / mw, bh / mh, 1.0)
    w, h = max(2, int(mw * scale + 1e-6)), max(2, int(mh * scale + 1e-6))
    return w - w % 2, h - h % 2


def full_view_mode(modes: list[dict], main: tuple[int, int], fps: float) -> dict | None:
    """The sensor mode to ask for: the whole field of view, the fewest pixels that cover ``main``, fast enough.

    picamera2 otherwise picks the mode nearest ``main``'s size, which on a
    Camera Module 2 is a binned 640x480 centre crop (39 % of the width). A mode
    shows the full field of view when its ``crop_limits`` cover (95 % of) the
    largest crop any mode has.
    """
    modes = [m for m in modes if m.get("size") and m.get("crop_limits")]
    if not modes:
        return None
    widest = max(m["crop_limits"][2] * m["crop_limits"][3] for m in modes)
    full = [m for m in modes if m["crop_limits"][2] * m["crop_limits"][3] >= 0.95 * widest]

    def cost(m: dict) -> tuple:
        w, h = m["size"]
        covers = w >= main[0] and h >= main[1]
        fast = fps <= 0 or m.get("fps", 0) >= fps
        return (not covers, not fast, w * h if covers else -w * h)

    return min(full, key=cost)


# (camera Id, main size, fps) -> the chosen mode: sensor_modes reconfigures the camera once per mode, so once only
_MODES: dict[tuple, dict | None] = {}


class Picamera2Source(Source):
    """The Pi camera: a YUV420 ``lores`` stream for detection (its Y plane) and a ``main`` stream for preview.

    ``drm`` is the preview that shows ``main`` on HDMI (``app.sinks.DrmPreview``),
    or None for a headless camera. The source only offers it each camera it
    opens (``attach``, between ``configure`` and ``start``) and closes
    (``detach``); the preview starts picamera2's DRM preview and sets the
    overlay itself. We never copy the preview frame.

    Every capture waits at most ``timeout_s``: picamera2 completes a capture
    only after its preview thread has rendered the frame, and a DRM preview
    whose render fails (nothing on HDMI) kills that thread, so an unbounded
    capture would wait for ever. A timeout before the first frame with DRM on
    turns DRM off for every later camera.
    """

    name = "picamera2"

    def __init__(
        self,
        width: int = 320,
        height: int = 240,
        preview_size: tuple[int, int] = (640, 480),
        camera_num: int = 0,
        drm: DrmPreview | None = None,
        network_size: tuple[int, int] | None = None,
        fps: float = 0.0,
        timeout_s: float = 5.0,
    ) -> None:
        self.size = (int(width), int(height))
        self.preview_size = (int(preview_size[0]), int(preview_size[1]))
        self.camera_num = camera_num
        self.drm = drm
        self.network_size = network_size
        self.fps = float(fps)
        self.timeout_s = float(timeout_s)
        self.camera = None
        self.shown = False
        self.frames = 0
        self.mode: dict | None = None
        self._lores_size = lores_size(network_size, self.preview_size, self.size)

    def open(self) -> None:
        try:
            from picamera2 import Picamera2  # only on a Pi
        except ImportError as exc:  # no module, or a broken libcamera install: no retry mends that
            raise PermanentSourceError(f"picamera2: cannot import it ({one_line(exc)}); {PICAMERA2_FIX}", 78) from exc

        cameras = csi_cameras(Picamera2)
        if self.camera_num >= len(cameras):
            # Checked before Picamera2(): it indexes the list (IndexError) after opening a pipe it then leaks.
            usb = len(Picamera2.global_camera_info()) - len(cameras)
            raise SourceError(f"picamera2: no Pi camera number {self.camera_num} (libcamera lists {len(cameras)}"
                              + (f", and {usb} USB webcam(s): use opencv:<index> for those)" if usb else ")"))
        camera = Picamera2(self.camera_num)
        self.camera = camera
        cam_id = str(cameras[self.camera_num].get("Id", self.camera_num))
        self.mode = self._choose_mode(camera, cam_id)
        controls: dict = {}
        if self.fps > 0:
            # Not faster than detection needs: the default lets the frame rate run as fast as the mode allows.
            top = self.mode.get("fps") if self.mode else None
            controls["FrameRate"] = min(self.fps, top) if top else self.fps
        if "AfMode" in getattr(camera, "camera_controls", {}):
            controls["AfMode"] = 2  # libcamera AfModeEnum.Continuous (Camera Module 3)
        mode_args: dict = {}
        if self.mode and self.mode.get("bit_depth"):
            if "sensor" in inspect.signature(camera.create_preview_configuration).parameters:
                mode_args["sensor"] = {"output_size": tuple(self.mode["size"]), "bit_depth": self.mode["bit_depth"]}
            else:  # picamera2 before 0.3.13: the raw stream's size and format pick the sensor mode
                mode_args["raw"] = {"size": tuple(self.mode["size"]), "format": str(self.mode["format"])}
        show = self.drm is not None and self.drm.wanted
        config = camera.create_preview_configuration(
            main={"size": self.preview_size, "format": "XBGR8888"},
            lores={"size": self._lores_size, "format": "YUV420"},
            display="main" if show else None,
            buffer_count=4,
            controls=controls,
            **mode_args,
        )
        camera.configure(config)
        self.shown = bool(show and self.drm.attach(camera, self.preview_size))
        camera.start()
        # picamera2 may align the requested size; crop to what was configured.
        actual = camera.camera_configuration()["lores"]
        self._lores_size = tuple(actual["size"])
        log.info("camera %s: %s, main %dx%d, lores %dx%d%s", cam_id, self.describe_mode(camera),
                     *self.preview_size, *self._lores_size, f", {controls['FrameRate']:g} fps" if self.fps > 0 else "")

    def _choose_mode(self, camera, cam_id: str) -> dict | None:
        key = (cam_id, self.preview_size, self.fps)
        if key not in _MODES:
            try:
                _MODES[key] = full_view_mode(list(camera.sensor_modes), self.preview_size, self.fps)
            except Exception as exc:  # a camera without raw modes: let picamera2 choose
                log.debug("picamera2 sensor_modes failed: %s", exc)
                _MODES[key] = None
        return _MODES[key]

    def prepare(self) -> None:
        """Choose the sensor mode before capture starts, outside its hang clock (``open()`` runs under it).

        picamera2's ``sensor_modes`` configures the camera once per mode: seconds
        on a Zero, once per process. Never raises: ``open()`` chooses otherwise.
        """
        try:
            from picamera2 import Picamera2

            cameras = csi_cameras(Picamera2)
            if self.camera_num >= len(cameras):
                return
            cam_id = str(cameras[self.camera_num].get("Id", self.camera_num))
            if (cam_id, self.preview_size, self.fps) in _MODES:
                return
            camera = Picamera2(self.camera_num)
            try:
                self._choose_mode(camera, cam_id)
            finally:
                camera.close()
        except Exception as exc:
            log.debug("picamera2: choosing the sensor mode ahead failed: %s", exc)

    def describe_mode(self, camera) -> str:
        mode = self.mode
        if not mode:
            return "sensor mode chosen by picamera2"
        crop = mode["crop_limits"]
        full = camera.camera_properties.get("PixelArraySize") or (crop[2], crop[3])
        return (f"sensor mode {mode['size'][0]}x{mode['size'][1]} ({100 * crop[2] / full[0]:.0f} % of the sensor's "
                f"width, up to {mode.get('fps', 0):g} fps)")

    def read(self) -> np.ndarray:
        camera = self.camera
        if camera is None:
            raise SourceError("picamera2: not open")
        # capture_array(wait=<seconds>) only bounds the wait from picamera2 0.3.17 (Bookworm shipped 0.3.12,
        # where a number means "wait for ever"): every version signals a job it was given a function for.
        done = threading.Event()
        job = camera.capture_array("lores", signal_function=lambda _job: done.set())
        if done.wait(self.timeout_s):
            yuv = camera.wait(job)
        else:
            if self.shown and self.frames == 0 and self.drm is not None:
                self.drm.give_up(camera, f"no frame within {self.timeout_s:g} s with the DRM preview on (nothing "
                                         "on HDMI, or the display refused it)")
            raise SourceTimeout(f"picamera2: no frame for {self.timeout_s:.1f} s") from None
        self.frames += 1
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
        # A timed-out capture is still queued: cancel it first (picamera2: "so that the camera can be closed").
        for step in ("cancel_all_and_flush", "stop_preview", "stop", "close"):
            try:
                getattr(camera, step)()
            except Exception:
                log.debug("picamera2 %s failed", step, exc_info=True)


# --- spec strings ------------------------------------------------------------


PICAMERA2_FIX = ("on Raspberry Pi OS: sudo apt install python3-picamera2, and a venv made with "
                 "--system-site-packages; or choose another source (demo, images:, opencv:)")


#: how long a start waits for libcamera to list the Pi camera (drivers still loading at boot)
CAMERA_WAIT_S = 15.0


def picamera2_importable() -> bool:
    try:
        import picamera2  # noqa: F401
    except Exception:
        return False
    return True


def wait_for_camera(wait_s: float, probe: Callable[[], bool] = picamera2_available,
                    sleep: Callable[[float], None] = time.sleep, every_s: float = 1.0) -> bool:
    """Probe for the Pi camera until it is listed or ``wait_s`` has passed; True when it is there."""
    deadline = time.monotonic() + wait_s
    while True:
        if probe():
            return True
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        sleep(min(every_s, left))


def resolve_spec(spec: str, probe: Callable[[], bool] = picamera2_available, wait_s: float = 0.0,
                 importable: Callable[[], bool] = picamera2_importable) -> str:
    """``auto`` becomes ``picamera2`` when a camera is there, else ``demo``.

    Where picamera2 is installed (a Pi), the camera is probed for ``wait_s``
    first: at boot its drivers may still be loading, and a demo chosen then
    would stay for good.
    """
    if spec == "auto":
        if probe():
            return "picamera2"
        if wait_s > 0 and importable():
            log.info("no Pi camera listed yet; probing for up to %g s", wait_s)
            if wait_for_camera(wait_s, probe):
                return "picamera2"
        return "demo"
    return spec


def preflight(spec: str) -> None:
    """Refuse a source that cannot work before anything is opened (exit 78, not a retry loop)."""
    kind, _, arg = spec.partition(":")
    if kind == "images" and not list_images(arg):
        raise ConfigError(f"source.spec = {spec!r}: no image files there ({', '.join(IMAGE_SUFFIXES)})"
                          f"{_unreadable_hint(arg)}")
    if kind == "opencv":
        target = parse_opencv_target(arg)
        if isinstance(target, str) and not _is_url(target) and not _exists(target):
            raise ConfigError(f"source.spec = {spec!r}: no such file{_unreadable_hint(target)}")
        if isinstance(target, str) and opencv_name_problem(target):
            raise ConfigError(f"source.spec: {opencv_name_problem(target)}")
        if isinstance(target, str) and not _is_url(target):
            kind = _not_a_video_file(target)
            if kind:  # FFmpeg blocks opening a FIFO until someone writes, out of reach of a stop request
                raise ConfigError(f"source.spec = {spec!r} is {kind}: a video source is a file, a camera device "
                                  f"or a URL")
    if kind == "picamera2" and importlib.util.find_spec("picamera2") is None:
        raise ConfigError(f"source.spec = 'picamera2': the picamera2 module is not installed ({PICAMERA2_FIX})")
    if kind == "demo" and not list_images(str(DEMO_DIR)):
        raise ConfigError(f"source.spec = 'demo': the bundled photos are missing from {DEMO_DIR}")


def _not_a_video_file(target: str) -> str:
    """'a FIFO', 'a directory' or 'a socket' when ``target`` is one ('' for a file or a device like
    /dev/video0)."""
    import stat

    try:
        mode = os.stat(os.path.expanduser(target)).st_mode
    except (OSError, ValueError):
        return ""
    return ("a FIFO" if stat.S_ISFIFO(mode) else "a directory" if stat.S_ISDIR(mode) else
            "a socket" if stat.S_ISSOCK(mode) else "")


def _exists(target: str) -> bool:
    try:
        return Path(target).expanduser().exists()
    except (OSError, ValueError):  # EACCES on a parent (before Python 3.12), a NUL
        return False


def make_factory(spec: str, cfg: SourceConfig, drm: DrmPreview | None = None,
                 network_size: tuple[int, int] | None = None) -> Callable[[], Source]:
    """A function that makes a fresh, unopened source for a resolved spec.

    ``drm``, the DRM preview (``app.sinks.DrmPreview``), is handed to every
    picamera2 source it makes; None keeps the camera headless. ``network_size``
    (W,H), the detector's input, sizes the camera's detection stream.
    """
    kind, _, arg = spec.partition(":")
    if kind == "demo":
        return lambda: DemoSource(cfg.width, cfg.height, fps=cfg.fps)
    if kind == "images":
        return lambda: ImagesSource(arg, fps=cfg.fps, loop=cfg.loop, max_pixels=cfg.max_pixels)
    if kind == "opencv":
        return lambda: OpenCVSource(arg, loop=cfg.loop, fps=cfg.fps, timeout_s=cfg.hang_timeout_s,
                                    max_pixels=cfg.max_pixels)
    if kind == "picamera2":
        return lambda: Picamera2Source(
            cfg.width, cfg.height, (cfg.preview_width, cfg.preview_height), cfg.camera_num, drm,
            network_size=network_size, fps=cfg.fps, timeout_s=cfg.hang_timeout_s,
        )
    raise ConfigError(f"source.spec = {spec!r} is not allowed")
