"""The log reader the reliability tests hold the JSON Lines log to.

A writer killed mid-line (SIGKILL, power loss) may leave at most one
incomplete line, and only at the very end of the file. Everything before it
must be whole JSON objects, one per line. Anything else is corruption.
"""

from __future__ import annotations

import json
from pathlib import Path


class LogCorrupt(ValueError):
    """The log has a bad line that is not a torn final line."""


def parse_log(data: bytes) -> tuple[list[dict], bytes]:
    """(records, torn_tail): every terminated line parsed; ``torn_tail`` is b"" or the unterminated final fragment."""
    if not data:
        return [], b""
    parts = data.split(b"\n")
    tail = parts.pop()  # b"" when the file ends with a newline
    records = []
    for n, raw in enumerate(parts, 1):
        try:
            obj = json.loads(raw)
        except ValueError:
            raise LogCorrupt(f"line {n} of {len(parts)} is not JSON: {raw[:80]!r}") from None
        if not isinstance(obj, dict):
            raise LogCorrupt(f"line {n} is JSON but not an object: {raw[:80]!r}")
        records.append(obj)
    return records, tail


def read_log(path: str | Path, allow_torn_tail: bool = True) -> tuple[list[dict], bytes]:
    """Read a log file; a torn final line is tolerated only when ``allow_torn_tail``."""
    records, tail = parse_log(Path(path).read_bytes())
    if tail and not allow_torn_tail:
        raise LogCorrupt(f"the last line is not terminated: {tail[:80]!r}")
    return records, tail


def frames_and_events(records: list[dict]) -> tuple[list[dict], list[dict]]:
    frames = [r for r in records if "seq" in r and "event" not in r]
    events = [r for r in records if "event" in r]
    return frames, events
