"""Snapshots: a JPEG of a track's best frame, with its box drawn, kept under a directory with retention.

``SnapshotStore(directory, max_files, max_bytes).save(name, image)`` writes
``image`` (BGR or grey uint8, already drawn on) as ``directory/name``, written
to a temporary name and renamed, so a crash never leaves half a JPEG. After
each write the oldest snapshots (by name: names start with the UTC time) are
deleted until at most ``max_files`` files and ``max_bytes`` bytes remain; the
files found in the directory at start count too. Only this store's own files
(``*.jpg`` starting with a timestamp) are ever counted or deleted.

A write that fails (a full disk, a read-only file system, a missing mount) is
counted, the first failure is logged once, and ``save`` returns None: a
snapshot is never worth stopping detection for. ``NullSnapshots`` writes
nothing.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import re

import cv2
import numpy as np

log = logging.getLogger("xnorcam.snapshots")

# 20261128T032906.123Z-track7-enter.jpg
NAME_RE = re.compile(r"^\d{8}T\d{6}\.\d{3}Z-[A-Za-z0-9_.-]+\.jpg$")
JPEG_QUALITY = 85


class NullSnapshots:
    """Writes nothing; has the counters of a real store."""

    directory = None
    written = 0
    failures = 0
    deleted = 0

    def save(self, name: str, image: np.ndarray) -> str | None:
        return None


class SnapshotStore:
    def __init__(self, directory: str, max_files: int = 100, max_bytes: int = 20 << 20,
                 quality: int = JPEG_QUALITY) -> None:
        self.directory = directory
        self.max_files = max(1, int(max_files))
        self.max_bytes = max(1, int(max_bytes))
        self.quality = int(quality)
        self.written = 0
        self.failures = 0
        self.deleted = 0
        self.last_error: str | None = None
        self._in_failure = False
        self._files: collections.deque[tuple[str, int]] = collections.deque()  # (name, bytes), oldest first
        self._bytes = 0
        self._write = _write_file  # tests swap this to simulate ENOSPC / EIO
        self._scan()

    def _scan(self) -> None:
        try:
            names = sorted(n for n in os.listdir(self.directory) if NAME_RE.match(n))
        except OSError:
            return  # not there yet: made on the first save
        for name in names:
            try:
                size = os.stat(os.path.join(self.directory, name)).st_size
            except OSError:
                continue
            self._files.append((name, size))
            self._bytes += size
        self._retain()

    @property
    def files(self) -> int:
        return len(self._files)

    @property
    def bytes(self) -> int:
        return self._bytes

    def save(self, name: str, image: np.ndarray) -> str | None:
        """Write ``image`` as ``name`` (which must match NAME_RE); the path written, or None when it failed."""
        if not NAME_RE.match(name):
            raise ValueError(f"snapshot name {name!r} does not start with a UTC timestamp or is not a .jpg")
        ok, jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, self.quality])
        if not ok:
            self._failed(OSError(errno.EINVAL, "JPEG encoding failed"))
            return None
        path = os.path.join(self.directory, name)
        try:
            os.makedirs(self.directory, exist_ok=True)
            self._write(path, jpeg.tobytes())
        except OSError as exc:
            self._failed(exc)
            return None
        if self._in_failure:
            self._in_failure = False
            log.warning("snapshots %s: writing again after %d failed snapshot(s)", self.directory, self.failures)
        self.written += 1
        self._files.append((name, len(jpeg)))
        self._bytes += len(jpeg)
        self._retain()
        return path

    def _retain(self) -> None:
        while self._files and (len(self._files) > self.max_files or self._bytes > self.max_bytes):
            name, size = self._files.popleft()
            self._bytes -= size
            try:
                os.unlink(os.path.join(self.directory, name))
                self.deleted += 1
            except FileNotFoundError:
                pass  # removed by someone else: it no longer counts either way
            except OSError as exc:
                log.warning("snapshots %s: cannot delete %s (%s)", self.directory, name, exc.strerror)

    def _failed(self, exc: OSError) -> None:
        self.failures += 1
        self.last_error = f"{errno.errorcode.get(exc.errno or 0, 'E?')}: {exc.strerror or exc}"
        if not self._in_failure:
            self._in_failure = True
            log.warning("snapshots %s: write failed (%s); counting failures, detection goes on", self.directory,
                        self.last_error)


def _write_file(path: str, data: bytes) -> None:
    """Write ``data`` whole under a temporary name, then rename it to ``path``; nothing is left on failure."""
    tmp = f"{path}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                if n <= 0:
                    raise OSError(errno.ENOSPC, "short write")
                view = view[n:]
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
