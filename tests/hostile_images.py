"""Hostile image files for the source tests: decompression bombs in every format the images source reads,
images too small to be a frame, files that are not images. Made on the fly; nothing here is a dataset image."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import cv2
import numpy as np


def good_image(path: Path, value: int, size=(48, 64)) -> Path:
    cv2.imwrite(str(path), np.full((*size, 3), value, np.uint8))
    return path


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(path: Path, w: int, h: int, grey: bool = True) -> Path:
    """A real, valid PNG of w x h zero pixels: megabytes of pixels in a file of kilobytes."""
    channels = 1 if grey else 3
    row = bytes(1 + w * channels)
    co = zlib.compressobj(9)
    per = max(1, (4 << 20) // len(row))
    parts, left = [], h
    while left > 0:
        k = min(per, left)
        parts.append(co.compress(row * k))
        left -= k
    parts.append(co.flush())
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0 if grey else 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", b"".join(parts))
                     + _chunk(b"IEND", b""))
    return path


def _patched(path: Path, ext: str, patch) -> Path:
    ok, buf = cv2.imencode(ext, np.full((24, 32, 3), 90, np.uint8))
    assert ok
    data = bytearray(buf.tobytes())
    patch(data)
    path.write_bytes(bytes(data))
    return path


def header_bomb(path: Path, fmt: str, w: int = 9000, h: int = 9000) -> Path:
    """A small real image of format ``fmt`` whose header is rewritten to declare w x h pixels."""
    if fmt == "png":
        def patch(d):
            d[16:24] = struct.pack(">II", w, h)
            d[29:33] = struct.pack(">I", zlib.crc32(bytes(d[12:29])))  # a valid IHDR: only its size lies
        return _patched(path, ".png", patch)
    if fmt == "jpeg":
        def patch(d):
            i = d.index(b"\xff\xc0")
            d[i + 5:i + 9] = struct.pack(">HH", h, w)
        return _patched(path, ".jpg", patch)
    if fmt == "bmp":
        def patch(d):
            d[18:26] = struct.pack("<ii", w, -h)  # a top-down bitmap: the height is negative
        return _patched(path, ".bmp", patch)
    if fmt == "webp":
        def patch(d):
            ww, hh = min(w, 16383), min(h, 16383)
            if d[12:16] == b"VP8 ":
                d[26:30] = struct.pack("<HH", ww, hh)
            else:  # VP8L: 14 bits of width - 1, 14 of height - 1, then alpha and version
                assert d[12:16] == b"VP8L"
                bits = struct.unpack("<I", d[21:25])[0] & ~((1 << 28) - 1)
                d[21:25] = struct.pack("<I", bits | (ww - 1) | ((hh - 1) << 14))
        return _patched(path, ".webp", patch)
    if fmt == "tiff":
        def patch(d):
            big = d[:2] == b"MM"
            end = ">" if big else "<"
            ifd = struct.unpack(end + "I", d[4:8])[0]
            n = struct.unpack(end + "H", d[ifd:ifd + 2])[0]
            for k in range(n):
                e = ifd + 2 + 12 * k
                tag, kind = struct.unpack(end + "HH", d[e:e + 4])
                if tag in (256, 257):
                    value = w if tag == 256 else h
                    d[e + 2:e + 4] = struct.pack(end + "H", 4)
                    d[e + 8:e + 12] = struct.pack(end + "I", value)
        return _patched(path, ".tiff", patch)
    if fmt == "pnm":
        path.write_bytes(f"P5\n# a comment\n{w} {h}\n255\n".encode() + bytes(64))
        return path
    raise ValueError(fmt)


BOMB_FORMATS = ("png", "jpeg", "bmp", "webp", "tiff", "pnm")
