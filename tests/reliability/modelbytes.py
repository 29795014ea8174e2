"""Take a model file apart and put it back together (with a fresh checksum), for corruption tests.

Follows the layout in models/FORMAT.md: magic, uint32 version, uint32 header
length, JSON header, zero padding to 64 bytes, data section, sha256.
"""

from __future__ import annotations

import hashlib
import json
import struct

PREFIX = struct.Struct("<8sII")
ALIGN = 64
DIGEST = 32


def split(raw: bytes) -> tuple[bytes, int, dict, bytes]:
    """(magic, version, header, data section) of a valid file."""
    magic, version, hlen = PREFIX.unpack_from(raw, 0)
    header = json.loads(raw[PREFIX.size : PREFIX.size + hlen])
    start = PREFIX.size + hlen
    start += (-start) % ALIGN
    return magic, version, header, raw[start:-DIGEST]


def build(header: dict | bytes, data: bytes, version: int = 1, magic: bytes = b"XNORCAM\x00") -> bytes:
    """A file with a correct checksum around ``header`` (a dict, or raw header bytes) and ``data``."""
    hjson = header if isinstance(header, bytes) else json.dumps(header, allow_nan=True).encode()
    start = PREFIX.size + len(hjson)
    body = PREFIX.pack(magic, version, len(hjson)) + hjson + b"\x00" * ((-start) % ALIGN) + data
    return body + hashlib.sha256(body).digest()


def reseal(raw: bytes) -> bytes:
    """Recompute the trailing checksum so a corruption reaches the checks behind it."""
    body = raw[:-DIGEST] if len(raw) >= DIGEST else raw
    return body + hashlib.sha256(body).digest()


def tensor_range(header: dict, layer: int, name: str) -> tuple[int, int]:
    """(offset in the data section, nbytes) of one tensor."""
    desc = header["layers"][layer]["tensors"][name]
    return desc["offset"], desc["nbytes"]


def data_start(raw: bytes) -> int:
    _, _, hlen = PREFIX.unpack_from(raw, 0)
    start = PREFIX.size + hlen
    return start + (-start) % ALIGN
