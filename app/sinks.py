"""Where results go: previews (DRM / OpenCV window / none), the JSON Lines log, the recorder.

Each role has a null version, and none of them ever stops the pipeline: a
failed write is counted and retried on the next line, a preview that cannot
work falls back to nothing with one warning.
"""

from __future__ import annotations

import errno
import fcntl
import glob
import json
import logging
import os
import stat
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import numpy as np

from app import overlay
from app.sources import Frame

log = logging.getLogger("xnorcam.sinks")

SCHEMA_VERSION = 1


# --- JSON Lines log ------------------------------------------------------------


def utc_now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def detection_records(detections: np.ndarray, class_names: Sequence[str]) -> list[dict[str, Any]]:
    out = []
    for x1, y1, x2, y2, score, cls in np.asarray(detections, dtype=np.float32).reshape(-1, 6).tolist():
        c = int(cls)
        out.append(
            {
                "label": class_names[c] if 0 <= c < len(class_names) else f"class{c}",
                "score": round(score, 4),
                "box": [round(x1, 1), round(y1, 1), round(x2, 1), round(y2, 1)],
            }
        )
    return out


def frame_record(
    frame: Frame,
    detections: np.ndarray,
    class_names: Sequence[str],
    fps: float,
    latency_ms: float,
    dropped: int,
) -> dict[str, Any]:
    h, w = frame.pixels.shape[:2]
    return {
        "v": SCHEMA_VERSION,
        "time": utc_now_iso(),
        "mono_ms": round(frame.t * 1000.0, 3),
        "seq": frame.seq,
        "width": w,
        "height": h,
        "detections": detection_records(detections, class_names),
        "fps": round(fps, 2),
        "latency_ms": round(latency_ms, 2),
        "dropped": dropped,
    }


class NullLog:
    """Writes nothing; has the counters of a real log."""

    path = None
    lines = 0
    failures = 0
    only_detections = False
    only_events = False

    def write(self, record: dict[str, Any]) -> bool:
        return False

    def event(self, record: dict[str, Any]) -> bool:
        return False

    def close(self) -> None:
        pass


class LogRefused(ValueError):
    """The log cannot be used at all (not this program's log, in use by another process, stdout closed):
    a configuration problem, said before the camera opens."""


# The start of every line this program writes: a torn line of ours starts with it too.
_LINE_START = b'{"v":%d,' % SCHEMA_VERSION
_TAIL_BYTES = 256 * 1024  # a line is at most a few KB; the last complete one is within this


def _is_our_line(line: bytes) -> bool:
    try:
        record = json.loads(line)
    except ValueError:
        return False
    return isinstance(record, dict) and type(record.get("v")) is int and record["v"] == SCHEMA_VERSION


def log_tail_state(fd: int, size: int) -> tuple[bool, int]:
    """(whether the file behind ``fd`` is recognisably this program's log, the offset just past its last
    complete line). Ours: its last complete line is a JSON line of this schema, or, with no complete line,
    what is there is the torn start of one."""
    start = max(0, size - _TAIL_BYTES)
    tail = os.pread(fd, size - start, start)
    cut = tail.rfind(b"\n")
    if cut < 0:
        return start == 0 and tail.startswith(_LINE_START[: len(tail)]), 0
    prev = tail.rfind(b"\n", 0, cut)
    if prev < 0 and start > 0:
        return False, start + cut + 1  # one line longer than any this program writes
    torn = tail[cut + 1 :]
    torn_ours = _LINE_START.startswith(torn) or torn.startswith(_LINE_START)
    return _is_our_line(tail[prev + 1 : cut]) and torn_ours, start + cut + 1


# Errors opening the log that no retry heals (EROFS may be a disk remounted read-only after errors: retried,
# unless the service's sandbox is the cause).
_NEVER_WRITABLE = (errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR, errno.ELOOP, errno.ENAMETOOLONG)


def shift_numbered(path: str, keep: int, numbered: Any) -> None:
    """Rotation's renames: ``numbered(keep-2)`` -> ``numbered(keep-1)`` ... ``path`` -> ``numbered(1)``, so that
    ``keep`` files remain in all and the oldest is replaced. Callers have checked every slot it lands on."""
    for i in range(keep - 1, 0, -1):
        src = path if i == 1 else numbered(i - 1)
        if os.path.lexists(src):
            os.replace(src, numbered(i))


def _rotated_log_ours(path: str) -> bool:
    """``path`` may be renamed over by rotation: absent, empty, or a regular file (not a link) whose tail is
    this program's JSON lines."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return True
    except ValueError:
        return False
    except OSError:
        # Its folder cannot even be looked into (EACCES, a sandbox hiding it): nothing there is known to be
        # someone else's, and opening the log itself says why it cannot be used.
        return True
    if not stat.S_ISREG(st.st_mode):
        return False
    if st.st_size == 0:
        return True
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return log_tail_state(fd, os.fstat(fd).st_size)[0]
    except OSError:
        return False
    finally:
        os.close(fd)


class JsonlLog:
    """One JSON object per line, each written whole with a single ``write`` (no userspace buffer).

    ``path`` ``"-"`` writes to stdout. With ``max_bytes`` > 0 the file is
    rotated before a line would push it past the limit, keeping ``files``
    files in all (``path``, ``path.1`` ... ``path.{files-1}``, oldest last).
    A failed or short write is counted, cut back to the last complete line
    when possible (else the next line starts on a fresh line), and the next
    line is tried again: logging never stops capture.

    The file's own size is read before every line (``fstat``), never a count
    kept here: another program may truncate it (logrotate's ``copytruncate``).
    An exclusive advisory lock (``flock``) is held on the open file, so a second
    process on the same log is refused rather than interleaving with this one.
    Only a file that is recognisably this program's log is appended to or
    repaired: anything else (a model, a config, notes) is refused with
    ``LogRefused`` and never touched. Rotation likewise only renames over
    this program's rotated logs: a ``path.N`` that is anything else (the
    user's ``notes.1``, a directory, a link) is refused at start, and one
    that appears later ends the rotation chain before it (said once).
    """

    def __init__(self, path: str, max_bytes: int = 0, files: int = 5, only_detections: bool = False,
                 only_events: bool = False) -> None:
        self.path = path
        self.max_bytes = int(max_bytes) if path != "-" else 0
        self.files = max(1, int(files))
        self.only_detections = only_detections
        self.only_events = only_events
        self.lines = 0
        self.failures = 0
        self.rotations = 0
        self.last_error: str | None = None
        self._fd: int | None = None
        self._regular = False  # a regular file (rotated, locked, repaired), not stdout or a character device
        self._fresh_line = False
        self._expect = 0  # the size after this writer's last line: a different size means someone else wrote
        self._in_failure = False
        self._write = os.write  # tests swap this to simulate ENOSPC / EIO / short writes
        self._warned_foreign: set[str] = set()
        if self.max_bytes and self.files > 1:  # before anything is opened or made
            foreign = self._first_foreign_slot()
            if foreign is not None:
                raise LogRefused(f"log {self.path}: rotation would rename over {self.path}.{foreign}, which is not "
                                 f"a log of this program: move it away, name another log, or set log.files "
                                 f"= {foreign} or fewer")
        self._open(must=True)

    # --- file handling ---

    def _open(self, must: bool = False) -> bool:
        """Open (or reopen) the log. ``must`` (the first open): a log that can never be used raises LogRefused;
        one that cannot be opened now (a missing disk) is warned about and retried on each line."""
        if self.path == "-":
            # Closed at start, Python leaves sys.stdout None, and fd 1 may since have been reused by a pipe of ours.
            try:
                closed = sys.stdout is None or os.fstat(1) is None
            except (OSError, ValueError):
                closed = True
            if closed:
                raise LogRefused("log '-' is stdout, and stdout is closed: log to a file instead")
            self._fd, self._regular = 1, False
            return True
        try:
            refusal = self._open_file()
        except (OSError, ValueError) as exc:
            if isinstance(exc, ValueError):  # a NUL in the path (the config refuses it; a caller may not have)
                raise LogRefused(f"log {self.path!r}: not a usable path ({exc})") from None
            if must:
                from app.sandbox import hint

                why = hint(self.path, exc.errno, writing=True)
                if why or exc.errno in _NEVER_WRITABLE:
                    # No retry heals a permission, a file where a directory should be, or the service's sandbox:
                    # a configuration error, said at start rather than a log that silently stays empty.
                    raise LogRefused(f"log {self.path}: cannot be written ({exc.strerror or exc}){why}") from None
                # Starting without a log is allowed otherwise (a missing disk may come back), but say so.
                log.warning("cannot open log %s (%s); will retry on each line", self.path, exc.strerror)
            self._note_failure(exc)
            return False
        if refusal:
            if must:
                raise LogRefused(refusal)
            self.last_error = refusal  # replaced under us by something else: never write into it
            if not self._in_failure:
                log.warning("log %s: %s; not writing", self.path, refusal)
            return False
        return True

    def _open_file(self) -> str | None:
        """Open, lock and check the file; the problem in words (and nothing left open) when it is not usable."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            st = None
        if st is not None and not (stat.S_ISREG(st.st_mode) or stat.S_ISCHR(st.st_mode)):
            return f"log {self.path} is not a regular file (a directory, FIFO or socket cannot be a log)"
        parent = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(parent, exist_ok=True)
        # Read-write: the tail is read through the same descriptor that is checked and locked.
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NONBLOCK, 0o644)
        try:
            fst = os.fstat(fd)
            if not stat.S_ISREG(fst.st_mode):  # /dev/null, a terminal: a stream, nothing to rotate or repair
                self._fd, self._regular, self._fresh_line = fd, False, False
                return None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return (f"log {self.path} is in use by another process that holds its lock (another xnorcam?): "
                        "two writers would tear and lose each other's lines; give each its own log path")
            ours, end = (True, 0) if fst.st_size == 0 else log_tail_state(fd, fst.st_size)
        except OSError:
            os.close(fd)
            raise
        if not ours:
            os.close(fd)
            return (f"log {self.path} is not a log of this program (its last line is not a JSON line of schema "
                    f"v{SCHEMA_VERSION}): refusing to append to it or cut it; name a new file or an old xnorcam log")
        self._fd, self._regular, self._fresh_line = fd, True, False
        self._expect = min(end, fst.st_size)
        # A crash (power cut, SIGKILL) can leave a torn last line: cut it off so the
        # file stays whole lines; if it cannot be cut, at least never glue onto it.
        if end < fst.st_size:
            try:
                os.ftruncate(fd, end)
                log.warning("log %s: removed a torn last line (%d bytes)", self.path, fst.st_size - end)
            except OSError:
                self._fresh_line = True
        return None

    def _close_fd(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None and fd != 1:
            try:
                os.close(fd)  # also releases the lock
            except OSError:
                pass

    def _first_foreign_slot(self) -> int | None:
        """The first of ``path.1`` ... ``path.{files-1}`` that holds something not this program's log (another
        program's ``notes.1``, a directory, a FIFO, a symbolic link), or None."""
        for i in range(1, self.files):
            if not _rotated_log_ours(f"{self.path}.{i}"):
                return i
        return None

    def _rotate(self) -> None:
        # Rename (or truncate) while still holding the lock: no other process can take the path between.
        # Renames only ever land on this program's rotated logs: the chain ends before the first numbered
        # file that is anything else (checked at start too, where it is refused; this is one made since).
        keep = self.files
        foreign = self._first_foreign_slot() if self.files > 1 else None
        if foreign is not None:
            keep = foreign
            name = f"{self.path}.{foreign}"
            if name not in self._warned_foreign:
                self._warned_foreign.add(name)
                log.warning("log %s: %s is not a log of this program: rotating into %s only%s", self.path, name,
                            f"{self.path}.1 .. {self.path}.{foreign - 1}" if foreign > 1 else "nothing",
                            "" if foreign > 1 else " (the log is emptied instead, as with log.files = 1)")
        try:
            if keep == 1:
                os.ftruncate(self._fd, 0)
                self._fresh_line = False
            else:
                shift_numbered(self.path, keep, lambda i: f"{self.path}.{i}")
            self.rotations += 1
        except OSError as exc:
            self._note_failure(exc)
        if keep > 1:
            self._close_fd()
            self._open()

    # --- writing ---

    def write(self, record: dict[str, Any]) -> bool:
        if self.only_events or (self.only_detections and not record.get("detections")):
            return False
        return self._write_line(record)

    def event(self, record: dict[str, Any]) -> bool:
        record = {"v": SCHEMA_VERSION, "time": utc_now_iso(), **record}
        return self._write_line(record)

    def _size(self) -> int:
        """The file's size now, as the kernel knows it (0 for a stream)."""
        if not self._regular or self._fd is None:
            return 0
        try:
            return os.fstat(self._fd).st_size
        except OSError:
            return 0

    def _write_line(self, record: dict[str, Any]) -> bool:
        try:
            data = (json.dumps(record, separators=(",", ":"), allow_nan=False) + "\n").encode()
        except (TypeError, ValueError) as exc:  # e.g. a NaN score: not JSON; lose the line, not the camera
            self.failures += 1
            self.last_error = f"unencodable record: {exc}"
            log.warning("log %s: %s", self.path, self.last_error)
            return False
        if self._fd is None and not self._open():
            self.failures += 1
            return False
        if self._vanished():  # deleted or moved away (rm, logrotate): a dead inode would take every line
            self._close_fd()
            if not self._open():
                self.failures += 1
                return False
        size = self._size()
        if size != self._expect and size > 0 and not self._fresh_line:
            # Someone else changed the file (truncated it mid-line, appended): never glue onto what is there.
            try:
                self._fresh_line = os.pread(self._fd, 1, size - 1) != b"\n"
            except OSError:
                self._fresh_line = True
        if self.max_bytes:
            if size > 0 and size + len(data) > self.max_bytes:
                self._rotate()
                if self._fd is None:
                    self.failures += 1
                    return False
        if self._fresh_line:
            data = b"\n" + data
        try:
            written = self._write(self._fd, data)
        except OSError as exc:
            self._failed(exc, 0)
            return False
        if written != len(data):
            self._failed(OSError(errno.ENOSPC, "short write"), written)
            return False
        self._fresh_line = False
        self._expect = self._size()
        self.lines += 1
        if self._in_failure:
            self._in_failure = False
            log.warning("log %s: writing again after %d failed line(s)", self.path, self.failures)
        return True

    def _vanished(self) -> bool:
        if not self._regular or self._fd is None:
            return False
        try:
            st, fst = os.stat(self.path), os.fstat(self._fd)
        except OSError:
            return True
        return (st.st_ino, st.st_dev) != (fst.st_ino, fst.st_dev)

    def _note_failure(self, exc: OSError) -> None:
        self.last_error = f"{errno.errorcode.get(exc.errno or 0, 'E?')}: {exc.strerror or exc}"

    def _failed(self, exc: OSError, written: int) -> None:
        self.failures += 1
        self._note_failure(exc)
        if not self._in_failure:
            self._in_failure = True
            log.warning("log %s: write failed (%s); counting failures and retrying", self.path, self.last_error)
        if not self._regular:
            if written:
                self._fresh_line = True
            return
        if written:
            # O_APPEND put the partial line at the file's end, and the lock keeps other writers out: cut exactly
            # those bytes off the real end (a size remembered here would be wrong after an external truncate).
            try:
                end = os.fstat(self._fd).st_size
                os.ftruncate(self._fd, max(0, end - written))
            except OSError:
                self._fresh_line = True  # cannot cut it: start the next line on its own
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            # EIO, EROFS, a vanished file: reopen on the next line.
            self._close_fd()

    def close(self) -> None:
        self._close_fd()


def open_log(path: str, max_mb: float = 10.0, files: int = 5, only_detections: bool = False,
             only_events: bool = False) -> JsonlLog | NullLog:
    if not path:
        return NullLog()
    return JsonlLog(path, max_bytes=int(max_mb * 1024 * 1024), files=files, only_detections=only_detections,
                    only_events=only_events)


# --- previews ----------------------------------------------------------------------


class NullPreview:
    """Headless: shows nothing."""

    name = "none"
    needs_canvas = False
    stop_requested = False

    def show(self, frame: Frame, canvas: np.ndarray | None, detections: np.ndarray, hud: overlay.Hud | None,
             marks: overlay.Marks | None = None) -> None:
        pass

    def close(self) -> None:
        pass


def cv2_has_gui() -> bool:
    """False for opencv-python-headless (no highgui backend) or when no window can be made."""
    try:
        import cv2

        info = cv2.getBuildInformation()
    except Exception:
        return False
    gui_lines = [line for line in info.splitlines() if line.strip().startswith("GUI:")]
    if gui_lines and gui_lines[0].split(":", 1)[1].strip().upper() in ("NONE", "NO", ""):
        return False
    return True


def display_available(environ: dict[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    return bool(env.get("DISPLAY") or env.get("WAYLAND_DISPLAY"))


class WindowPreview:
    """An OpenCV window on a desktop. ``q`` or Esc (or closing the window) asks the app to stop."""

    name = "window"
    needs_canvas = True

    def __init__(self, title: str = "xnorcam") -> None:
        import cv2

        self.title = title
        cv2.namedWindow(title, cv2.WINDOW_AUTOSIZE)  # raises cv2.error without highgui
        self.stop_requested = False
        self._shown = False

    def show(self, frame: Frame, canvas: np.ndarray | None, detections: np.ndarray, hud: overlay.Hud | None,
             marks: overlay.Marks | None = None) -> None:
        import cv2

        if canvas is None:
            return
        cv2.imshow(self.title, canvas)
        key = cv2.waitKey(1) & 0xFF
        if key in (ord("q"), 27):
            self.stop_requested = True
        if self._shown and cv2.getWindowProperty(self.title, cv2.WND_PROP_VISIBLE) < 1:
            self.stop_requested = True
        self._shown = True

    def close(self) -> None:
        try:
            import cv2

            cv2.destroyWindow(self.title)
        except Exception:
            pass


DRM_SYSFS = "/sys/class/drm"
#: the HUD (fps, detect time) on HDMI is refreshed this often; the boxes whenever they change
HUD_REFRESH_S = 0.5


def connected_displays(root: str = DRM_SYSFS) -> list[str]:
    """The DRM connectors (``card1-HDMI-A-1``...) whose ``status`` reads ``connected``.

    kms++ reserves no connector when none is connected, and picamera2's DRM
    preview then fails at its first frame, inside its own thread.
    """
    found = []
    for status in sorted(glob.glob(os.path.join(root, "card*-*", "status"))):
        try:
            with open(status) as fh:
                state = fh.read().strip()
        except OSError:
            continue
        if state == "connected":
            found.append(os.path.basename(os.path.dirname(status)))
    return found


DRM_IOCTL_AUTH_MAGIC = 0x40046411  # _IOW('d', 0x11, struct drm_auth): only the DRM master may call it


def display_taken(connector: str, dev_dir: str = "/dev/dri", opener: Any = None, ioctl: Any = None) -> bool | None:
    """True when another process (a desktop's compositor) is the DRM master of ``connector``'s card.

    A service has no ``$DISPLAY``, so this asks the kernel: the first to open a
    card with no master becomes it, and DRM_IOCTL_AUTH_MAGIC answers EACCES to
    anyone who is not. None when the card cannot be opened (unknown).
    """
    import fcntl
    import struct

    opener = opener or os.open
    ioctl = ioctl or fcntl.ioctl
    card = os.path.join(dev_dir, connector.split("-", 1)[0])
    try:
        fd = opener(card, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        ioctl(fd, DRM_IOCTL_AUTH_MAGIC, struct.pack("I", 0))
    except OSError as exc:
        return exc.errno == errno.EACCES  # EINVAL (no such magic): we were let in as the master
    finally:
        os.close(fd)
    return False


class DrmPreview:
    """Boxes on HDMI: picamera2 shows the camera itself via DRM and we lay an RGBA overlay on top.

    This preview owns everything DRM. The picamera2 source's factory is handed
    it (``sources.make_factory(..., drm=preview)``) and each camera that opens
    is offered to it: ``wanted`` tells the source to configure ``main`` as the
    displayed stream, ``attach`` starts picamera2's ``Preview.DRM`` on the
    configured, not yet started camera, and ``detach`` forgets a camera that is
    closing. The first DRM failure (no display attached, or a desktop owns the
    DRM master: ``attach`` raising, or the source's ``give_up`` when no frame
    came with DRM on) is warned about once; every later camera then runs headless.

    The capture thread attaches and detaches; ``show`` runs on the pipeline
    thread and draws on whichever camera is attached now. During an outage
    there is none, and nothing is drawn. Each ``set_overlay`` allocates a DRM
    buffer and waits for the display's refresh under a lock picamera2's camera
    loop also takes, so the overlay is only set when the drawing changes: the
    boxes, or the HUD every ``HUD_REFRESH_S``.
    """

    name = "drm"
    needs_canvas = False
    stop_requested = False

    def __init__(self, class_names: Sequence[str], overlay_size: tuple[int, int] | None = None,
                 hud_refresh_s: float = HUD_REFRESH_S) -> None:
        self.class_names = list(class_names)
        self.overlay_size = overlay_size
        self.hud_refresh_s = hud_refresh_s
        self.failed = False
        self.failures = 0
        self.overlays_set = 0
        self.overlays_skipped = 0
        self._camera: Any = None
        self._drawn: tuple | None = None  # (camera, what was drawn) of the overlay on screen
        self._hud: overlay.Hud | None = None
        self._hud_t = -1e9

    @property
    def wanted(self) -> bool:
        """True until DRM has failed once: configure the next camera for display."""
        return not self.failed

    @property
    def camera(self) -> Any:
        """The picamera2 camera showing on HDMI now, or None."""
        return self._camera

    def attach(self, camera: Any, size: tuple[int, int]) -> bool:
        """Show ``camera`` (configured, not started) on HDMI at ``size`` = (W,H); False when headless.

        Asked only while ``wanted``.
        """
        from picamera2 import Preview  # only on a Pi

        try:
            camera.start_preview(Preview.DRM, x=0, y=0, width=size[0], height=size[1])
        except Exception as exc:  # no DRM device, or it is not ours to open
            self._fail(str(exc))
            try:
                camera.stop_preview()
            except Exception:
                pass
            return False
        self._camera = camera
        self._drawn = None
        return True

    def give_up(self, camera: Any, reason: str) -> None:
        """``camera`` got no frame with DRM on: run every later camera headless."""
        self.detach(camera)
        self._fail(reason)

    def _fail(self, reason: str) -> None:
        if not self.failed:
            log.warning("DRM preview unavailable (%s); running headless", reason)
        self.failed = True

    def detach(self, camera: Any) -> None:
        """``camera`` is closing. A camera closed late (after a hang) never takes the newer one's place."""
        if self._camera is camera:
            self._camera = None

    def show(self, frame: Frame, canvas: np.ndarray | None, detections: np.ndarray, hud: overlay.Hud | None,
             marks: overlay.Marks | None = None) -> None:
        camera = self._camera
        if camera is None:
            return
        fh, fw = frame.pixels.shape[:2]
        now = time.monotonic()
        if hud is not None and (self._hud is None or now - self._hud_t >= self.hud_refresh_s):
            self._hud, self._hud_t = hud, now
        shown_hud = self._hud if hud is not None else None
        drawing = (camera, _drawing_key(detections, marks, (fw, fh)), shown_hud)
        if drawing == self._drawn:
            self.overlays_skipped += 1
            return
        rgba = overlay.render_rgba(self.overlay_size or (fw, fh), detections, self.class_names, shown_hud, (fw, fh),
                                   marks)
        try:
            camera.set_overlay(rgba)
            self.overlays_set += 1
            self._drawn = drawing
        except Exception as exc:  # a display unplugged mid-run must not stop detection
            self.failures += 1
            if self.failures == 1:
                log.warning("DRM overlay failed (%s); continuing", exc)

    def close(self) -> None:
        camera = self._camera
        if camera is not None:
            try:
                camera.set_overlay(None)
            except Exception:
                pass


def _drawing_key(detections: np.ndarray, marks: overlay.Marks | None, frame_size: tuple[int, int]) -> tuple:
    """What an overlay shows, as overlay.render_rgba draws it: whole-pixel boxes, scores to 2 places, ids."""
    dets = np.asarray(detections, dtype=np.float32).reshape(-1, 6)
    ids = None if marks is None or marks.ids is None else np.asarray(marks.ids).tobytes()
    return (frame_size, np.rint(dets[:, :4]).astype(np.int32).tobytes(), np.rint(dets[:, 4] * 100).astype(np.int32).tobytes(),
            dets[:, 5].astype(np.int32).tobytes(), ids, None if marks is None else (marks.zones, marks.line))


GUI_FIX = ("use the web preview instead (--web 127.0.0.1:8080, then open it in a browser; `make run` does), "
           "or put OpenCV with GUI support in place of the headless one: "
           "pip uninstall opencv-python-headless && pip install opencv-python")


def check_preview_mode(mode: str, source_kind: str, web: bool) -> None:
    """Refuse, before anything opens, a preview that cannot work here: ConfigError naming the fix."""
    from app.config import ConfigError

    if mode == "window" and not cv2_has_gui():
        raise ConfigError(f"preview 'window' needs OpenCV with GUI support, and this one has none "
                          f"(opencv-python-headless): {GUI_FIX}")
    if mode == "browser" and not web:
        raise ConfigError("preview 'browser' opens the web preview in the desktop's browser: turn the web preview "
                          "on as well (--web 127.0.0.1:8080, or [web] enabled = true)")


def choose_preview_mode(mode: str, source_kind: str, environ: dict[str, str] | None = None,
                        web: bool = False, drm_root: str = DRM_SYSFS,
                        taken: Any = display_taken) -> tuple[str, str]:
    """Resolve ``auto``: (mode, why). ``drm`` falls back to headless (with one warning) off picamera2.

    ``auto`` is ``drm`` with the Pi camera when a display is connected (a connector under
    ``drm_root`` reads ``connected``) and no desktop holds it (``$DISPLAY``, or for a service another
    process as the card's DRM master: ``taken``); on a desktop (``$DISPLAY`` or
    ``$WAYLAND_DISPLAY``) an OpenCV window when OpenCV has GUI support, else the web preview in the
    desktop's browser when the web preview is on; otherwise ``none``. ``drm`` is only decided for
    real when the camera opens: if picamera2 cannot start its DRM preview, or no frame comes with
    it on, ``DrmPreview`` warns once and runs headless.
    """
    desktop = display_available(environ)
    if source_kind == "picamera2" and mode in ("auto", "drm"):
        screens = connected_displays(drm_root)
        if desktop:
            why = ("a desktop holds the display ($DISPLAY or $WAYLAND_DISPLAY is set): picamera2's DRM preview "
                   "would show nothing, and its failed display commits are not reported")
        elif not screens:
            why = f"no display connected (no connector under {drm_root} reads 'connected')"
        elif taken(screens[0]):
            why = (f"a desktop holds the display (another process is {screens[0].split('-', 1)[0]}'s DRM master): "
                   "picamera2's DRM preview would show nothing, and its failed display commits are not reported")
        else:
            why = ""
        if mode == "drm" and why:
            log.warning("preview 'drm': %s; trying it anyway", why)
        if mode == "auto":
            if not why:
                return "drm", f"the Pi camera and {screens[0]}: boxes on HDMI"
            if not desktop:
                return "none", why + ("; the picture is on the web preview" if web else
                                      "; to see the picture, add --web 127.0.0.1:8080 and open it in a browser")
            log.info("preview: not drm: %s", why)
    if mode == "auto":
        if not desktop:
            why = "no display ($DISPLAY and $WAYLAND_DISPLAY are unset)"
            return "none", why + ("; the picture is on the web preview" if web else
                                  "; to see the picture, add --web 127.0.0.1:8080 and open it in a browser")
        if cv2_has_gui():
            return "window", "a display, and OpenCV with GUI support"
        if web:
            return "browser", "a display, but this OpenCV has no GUI (opencv-python-headless): the web preview " \
                              "in the desktop's browser"
        return "none", f"a display, but this OpenCV has no GUI (opencv-python-headless); {GUI_FIX}"
    if mode == "drm" and source_kind != "picamera2":
        log.warning("preview 'drm' needs the picamera2 source (source is %s); running headless", source_kind)
        return "none", "drm needs the picamera2 source"
    if mode == "window" and not cv2_has_gui():
        # check_preview_mode refuses this before the app starts; a caller that skipped it gets headless
        log.warning("preview 'window': this OpenCV has no GUI support (opencv-python-headless); running headless")
        return "none", "no GUI in this OpenCV"
    return mode, "as configured"


class BrowserPreview:
    """The web preview opened in the desktop's browser (Python's ``webbrowser``: $BROWSER, xdg-open, ...)."""

    name = "browser"
    needs_canvas = False
    stop_requested = False

    def __init__(self, url: str, opener: Any = None) -> None:
        self.url = url
        self._opener = opener
        self.opened: bool | None = None

    def open(self) -> None:
        """Ask the desktop to open the page, once, without waiting for the browser."""
        import threading

        def go() -> None:
            try:
                if self._opener is not None:
                    self.opened = bool(self._opener(self.url))
                else:
                    import webbrowser

                    self.opened = webbrowser.open(self.url, new=1)
            except Exception as exc:
                log.debug("opening a browser failed: %s", exc)
                self.opened = False
            if not self.opened:
                log.warning("could not open a browser here: open %s yourself", self.url)

        threading.Thread(target=go, name="open-browser", daemon=True).start()

    def show(self, frame: Frame, canvas: np.ndarray | None, detections: np.ndarray, hud: overlay.Hud | None,
             marks: overlay.Marks | None = None) -> None:
        pass

    def close(self) -> None:
        pass


def make_preview(
    mode: str, source_kind: str, class_names: Sequence[str], environ: dict[str, str] | None = None,
    web_url: str | None = None, drm_root: str = DRM_SYSFS, taken: Any = display_taken,
) -> NullPreview | WindowPreview | DrmPreview | BrowserPreview:
    """The preview for the configured ``mode`` (``auto`` resolved and said once) and a source kind.

    ``name`` says which it is. A ``DrmPreview`` must also be handed to the source's factory (the
    camera is shown by picamera2 itself); a ``BrowserPreview`` is opened once the web preview serves.
    """
    wanted = mode
    mode, why = choose_preview_mode(mode, source_kind, environ, web=web_url is not None, drm_root=drm_root,
                                    taken=taken)
    if wanted == "auto":
        log.info("preview: %s (%s)", mode, why)
    if mode == "window":
        try:
            return WindowPreview()
        except Exception as exc:
            log.warning("preview 'window' unavailable (%s); running headless", exc)
            return NullPreview()
    if mode == "drm":
        return DrmPreview(class_names)
    if mode == "browser" and web_url is not None:
        return BrowserPreview(web_url)
    return NullPreview()


# --- recorder ------------------------------------------------------------------------


class NullRecorder:
    needs_canvas = False
    frames = 0

    def write(self, canvas: np.ndarray | None) -> None:
        pass

    def close(self) -> None:
        pass


RECORD_SUFFIXES = (".mp4", ".m4v", ".mov", ".avi", ".mkv")


def _is_video_or_empty(path: str) -> bool:
    """An empty file, or one that starts like an MP4/MOV, AVI or Matroska file (what the recorder writes)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return True  # unreadable here: the write check that follows says why
    try:
        head = os.read(fd, 12)
    except OSError:
        return True
    finally:
        os.close(fd)
    return (not head or head[4:8] in (b"ftyp", b"moov", b"mdat", b"wide", b"free", b"skip")
            or (head[:4] == b"RIFF" and head[8:12] == b"AVI ") or head[:4] == b"\x1aE\xdf\xa3")


def numbered_recording(path: str, i: int) -> str:
    """The ``i``-th earlier recording of ``path``: ``rec.mp4`` -> ``rec.1.mp4`` (the suffix stays last, so a
    player still knows the file)."""
    root, ext = os.path.splitext(path)
    return f"{root}.{i}{ext}"


def _slot_takes_a_recording(path: str) -> bool:
    """Whether rotation may rename a recording over ``path``: nothing there, or a regular file (not a link)
    that is empty or an earlier recording. Anything else is somebody's file and is never replaced."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return True
    except (OSError, ValueError):
        return False
    return stat.S_ISREG(st.st_mode) and _is_video_or_empty(path)


def first_foreign_recording_slot(path: str, files: int) -> int | None:
    """The first of ``numbered_recording(path, 1 .. files-1)`` that rotation may not rename over, or None."""
    for i in range(1, files):
        if not _slot_takes_a_recording(numbered_recording(path, i)):
            return i
    return None


def record_path_problem(path: str, key: str = "preview.record", files: int = 1) -> str | None:
    """Why ``path`` cannot take a recording, or None, found by trying: its directory is made (as the recorder
    would), the file opened for writing and, when this made it, removed again. A path that can never be
    recorded to (a read-only or missing tree, a file where a directory should be, a path the service's sandbox
    hides) is a configuration error said at start, not a recording silently missing later. Only a regular file
    (or a new one) can take it: the MP4 muxer seeks back to finish the file, and opening a FIFO blocks inside
    FFmpeg, out of reach of a stop request, until someone reads it."""
    from app.sandbox import hint
    from app.sources import opencv_name_problem

    def failed(what: str, exc: OSError) -> str:
        return f"{key} = {path!r}: {what} ({exc.strerror or exc}){hint(path, exc.errno, writing=True)}"

    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        mode = None
    except (OSError, ValueError) as exc:
        if isinstance(exc, ValueError):
            return f"{key} = {path!r}: not a usable path ({exc})"
        return failed("cannot be written", exc)
    if mode is not None and not stat.S_ISREG(mode):
        kind = ("a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else
                "a socket" if stat.S_ISSOCK(mode) else "a device")
        return f"{key} = {path!r} is {kind}: a recording needs a regular file (MP4 seeks back to finish it)"
    if opencv_name_problem(path):
        return f"{key}: {opencv_name_problem(path)}"
    if os.path.splitext(path)[1].lower() not in RECORD_SUFFIXES:
        # OpenCV picks the container by the suffix and opens nothing for any other (a swapped --record
        # models/person.xnc was a record_error at the first frame): say it now.
        return (f"{key} = {path!r}: not a video file name: the recording's container comes from its suffix "
                f"({', '.join(RECORD_SUFFIXES)})")
    if mode is not None and not _is_video_or_empty(path):
        # The writer truncates what is there: only an earlier recording (or nothing) may be replaced.
        return (f"{key} = {path!r} exists and is not a video: refusing to overwrite it; name a new file or "
                f"an earlier recording")
    foreign = first_foreign_recording_slot(path, files)
    if foreign is not None:
        return (f"{key} = {path!r}: keeping earlier recordings would rename over "
                f"{numbered_recording(path, foreign)!r}, which is not a recording; move it, or keep fewer "
                f"(preview.record_files = {foreign})")
    parent = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as exc:
        return failed(f"cannot make its directory {parent}", exc)
    try:
        # O_NONBLOCK: a FIFO put there since the stat above must not block the open.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL * (mode is None) | os.O_NONBLOCK | os.O_CLOEXEC,
                     0o644)
    except FileExistsError:
        return None  # made by someone else in between: the recorder will overwrite it as it would have
    except OSError as exc:
        return failed("cannot be written", exc)
    os.close(fd)
    if mode is None:
        try:
            os.unlink(path)  # a run stopped before its first frame leaves no empty file behind
        except OSError:
            pass
    return None


def writable_dir_problem(key: str, directory: str) -> str | None:
    """Why files cannot be written in ``directory`` (made when missing, as its writer would), or None; found by
    creating and removing a file there, so a read-only tree or the service's sandbox is said at start."""
    from app.sandbox import hint

    try:
        os.makedirs(directory, exist_ok=True)
        if not os.path.isdir(directory):
            return f"{key} = {directory!r}: not a directory"
        fd, probe = _tempfile_in(directory)
        os.close(fd)
        os.unlink(probe)
    except ValueError as exc:
        return f"{key} = {directory!r}: not a usable path ({exc})"
    except OSError as exc:
        return f"{key} = {directory!r}: cannot be written ({exc.strerror or exc}){hint(directory, exc.errno, True)}"
    return None


def _tempfile_in(directory: str) -> tuple[int, str]:
    import tempfile

    return tempfile.mkstemp(prefix=".xnorcam-check-", dir=directory)


class Recorder:
    """Writes the annotated frames to a video file (cv2.VideoWriter, mp4v), opened at the first frame.

    Nothing recorded is lost to a restart and the disk does not fill: an earlier recording at ``path`` is moved
    to ``rec.1.mp4`` (``.1`` to ``.2`` ...) before a new one starts, ``files`` in all are kept, and a recording
    that reaches ``max_mb`` MiB is finished and the next one started the same way (0: one file, never split).
    """

    needs_canvas = True
    # How often (frames) the file's size is looked at: a stat once a second or so at the usual 10-15 fps.
    SIZE_CHECK_EVERY = 16

    def __init__(self, path: str, fps: float = 10.0, fourcc: str = "mp4v", on_event: Any = None,
                 max_mb: float = 256.0, files: int = 5) -> None:
        self.path = path
        self.fps = fps
        self.fourcc = fourcc
        self.max_bytes = max(1, int(max_mb * 2**20)) if max_mb > 0 else 0
        self.files = max(1, int(files))
        self.frames = 0
        self.failures = 0
        self.segments = 0  # recordings started by this run
        self.last_error: str | None = None
        self._frames_in_file = 0
        self._warned_foreign: set[str] = set()
        # Called with a ``record_error`` event (the log's ``event``): a recording lost after the start checks
        # passed (the disk went away, the writer would not open) is a line in the log, not only a warning.
        self.on_event = on_event
        self._writer = None
        self._size: tuple[int, int] | None = None
        self._broken = False

    def _give_up(self, message: str) -> None:
        self._broken = True
        self.last_error = message
        log.error("%s; not recording (detection goes on)", message)
        if self.on_event is not None:
            try:
                self.on_event({"event": "record_error", "mono_ms": round(time.monotonic() * 1000.0, 3),
                               "path": self.path, "message": message})
            except Exception:
                log.debug("logging the record_error event failed", exc_info=True)

    def write(self, canvas: np.ndarray | None) -> None:
        import cv2

        if canvas is None or self._broken:
            return
        h, w = canvas.shape[:2]
        if self._writer is None:
            # Checked at start too (a bad path is refused there); the disk may have gone since: then the
            # recording is lost, not the camera.
            problem = record_path_problem(self.path)
            if problem:
                self._give_up(problem)
                return
            problem = self._keep_earlier()
            if problem:
                self._give_up(problem)
                return
            size = self._size or (w, h)  # a later file keeps the first one's size
            writer = cv2.VideoWriter(self.path, cv2.VideoWriter_fourcc(*self.fourcc), self.fps, size)
            if not writer.isOpened():
                self._give_up(f"preview.record = {self.path!r}: cv2.VideoWriter did not open it")
                return
            self._writer, self._size, self._frames_in_file = writer, size, 0
            self.segments += 1
        if (w, h) != self._size:
            canvas = cv2.resize(canvas, self._size)  # a reopened source may change size
        try:
            self._writer.write(canvas)
            self.frames += 1
            self._frames_in_file += 1
        except cv2.error:
            self.failures += 1
        if self.max_bytes and self._frames_in_file % self.SIZE_CHECK_EVERY == 0:
            try:
                full = os.stat(self.path).st_size >= self.max_bytes
            except OSError:
                full = False  # gone under us: the writer's own errors say so
            if full:
                # Finished here (the MP4 index written), so the file plays; the next frame starts the next one.
                log.info("recording %s reached %.1f MiB: finished; the next frame starts a new one",
                         self.path, self.max_bytes / 2**20)
                self.close()

    def _keep_earlier(self) -> str | None:
        """Moves a non-empty earlier recording at ``path`` to ``.1`` (``.1`` to ``.2`` ...), keeping ``files``
        in all; the oldest goes. Renames land only on earlier recordings: the chain ends before the first slot
        that holds anything else (refused at start; one that appeared since shortens the chain, with a warning).
        Returns why it could not, or None."""
        try:
            if self.files <= 1 or os.path.getsize(self.path) == 0:
                return None  # replaced, as asked (one file), or nothing to keep
        except OSError:
            return None  # not there
        keep = self.files
        foreign = first_foreign_recording_slot(self.path, self.files)
        if foreign is not None:
            keep = foreign
            name = numbered_recording(self.path, foreign)
            if name not in self._warned_foreign:
                self._warned_foreign.add(name)
                log.warning("recording %s: %s is not a recording: keeping %s", self.path, name,
                            f"{keep - 1} earlier one(s) only" if keep > 1 else "no earlier one (it is replaced)")
        try:
            shift_numbered(self.path, keep, lambda i: numbered_recording(self.path, i))
        except OSError as exc:
            return (f"preview.record = {self.path!r}: could not keep the earlier recording "
                    f"({exc.strerror or exc}); not replacing it")
        return None

    def close(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.release()
