"""Bounds on the nesting of untrusted JSON and TOML, measured before a parser sees the text.

Python's json and tomllib parsers recurse once per level of nesting: a few hundred
KB of ``[[[[...`` ends in a RecursionError (an unhandled exception, exit 1, a
unit that restarts forever), and tomllib's dotted keys cost time and memory that
grow faster than their length. The files read here (a model header, the config,
COCO annotations) are a few levels deep, so a cheap scan first says how deep a
text goes and the caller refuses it with its own error before parsing.

The scans run at C speed (a regex removes strings and comments; numpy counts
brackets), so they cost milliseconds even on a 16 MB model header.
"""

from __future__ import annotations

import re

import numpy as np

# Real files: a model header is 4 levels deep, the config 4 (events.zones.NAME = [[x, y], ...]), COCO 4.
MAX_JSON_DEPTH = 64
MAX_TOML_DEPTH = 32
MAX_TOML_KEY_PARTS = 16

_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)
# TOML's four string forms and its comments, longest first so that '''/""" are not read as empty strings.
_TOML_STRING = re.compile(r'"""(?:[^\\]|\\.)*?"""|\'\'\'.*?\'\'\'|"(?:[^"\\\n]|\\.)*"|\'[^\'\n]*\'|#[^\n]*', re.S)
# A dotted run of bare or (already replaced) quoted key parts: a.b."c".d
# (Possessive, and only from the start of a run: a long run without dots fails in one step, not quadratically.)
_TOML_DOTTED = re.compile(r"(?<![A-Za-z0-9_-])[A-Za-z0-9_-]++(?:[ \t]*+\.[ \t]*+[A-Za-z0-9_-]++)+")


def bracket_depth(text: bytes) -> int:
    """The deepest nesting of [] and {} in ``text`` (strings already removed); unbalanced text still gets a number."""
    arr = np.frombuffer(text, np.uint8)
    step = np.zeros(arr.shape, np.int32)
    step[(arr == ord("[")) | (arr == ord("{"))] = 1
    step[(arr == ord("]")) | (arr == ord("}"))] = -1
    return int(np.cumsum(step).max(initial=0))


def json_depth(raw: bytes | str) -> int:
    """How deeply ``raw`` (JSON text) nests arrays and objects."""
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogatepass")
    return bracket_depth(_JSON_STRING.sub(b'""', raw))


def json_too_deep(raw: bytes | str, limit: int = MAX_JSON_DEPTH) -> str | None:
    """None when ``raw`` nests at most ``limit`` levels, else the problem in words."""
    depth = json_depth(raw)
    if depth > limit:
        return f"JSON nested {depth} levels deep (at most {limit})"
    return None


def toml_too_deep(text: str, depth_limit: int = MAX_TOML_DEPTH, key_limit: int = MAX_TOML_KEY_PARTS) -> str | None:
    """None when ``text`` (TOML) nests arrays and inline tables at most ``depth_limit`` levels and no dotted key
    has more than ``key_limit`` parts, else the problem in words."""
    bare = _TOML_STRING.sub(lambda m: "" if m.group().startswith("#") else "s", text)
    depth = bracket_depth(bare.encode("utf-8", "surrogatepass"))
    if depth > depth_limit:
        return f"arrays or inline tables nested {depth} levels deep (at most {depth_limit})"
    parts = max((m.group().count(".") + 1 for m in _TOML_DOTTED.finditer(bare)), default=0)
    if parts > key_limit:
        return f"a dotted key of {parts} parts (at most {key_limit})"
    return None
