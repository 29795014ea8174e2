"""Fuzz app.config: generated TOML documents (known and unknown sections, keys, every TOML value type), character
mutations of the shipped example config, random bytes, and flag overrides. The only outcomes allowed are a
Config (which must round-trip through from_dict) or ConfigError. Cases: XNORCAM_FUZZ_EXAMPLES each."""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app import config as configmod
from app.config import Config, ConfigError
from tests.reliability.support import FUZZ_COUNTS, FUZZ_EXAMPLES, ROOT

FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

EXAMPLE = ROOT / "deploy" / "config.example.toml"
SECTIONS = {name: [f.name for f in dataclasses.fields(cls)] for name, cls in configmod._SECTIONS.items()}
SECTION_NAMES = st.sampled_from(sorted(SECTIONS)) | st.text(min_size=1, max_size=8)
SCALARS = (
    st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.sampled_from([0, 1, -1, 15, 16, 4096, 4097, 0.0, -0.0, 1e-9, 0.5, 1.0, 1.5, 3600.0, 1e6, 1e300])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from(["", "auto", "demo", "picamera2", "images:", "images:/tmp", "opencv:0", "demo:x", "drm", "none",
                       "window", "person", "unicorn"])
    | st.text(max_size=12)
    | st.dates()
    | st.datetimes()
)
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(min_size=1, max_size=6) | st.sampled_from(["person"]), inner, max_size=3),
                      max_leaves=6)


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a TOML basic string (lone surrogates make invalid TOML: also fine)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(x)}" for k, x in v.items()) + "}"
    return v.isoformat()  # date / datetime


@st.composite
def documents(draw) -> str:
    lines = []
    for section in draw(st.lists(SECTION_NAMES, max_size=4, unique=True)):
        if draw(st.integers(0, 9)) == 0:
            lines.insert(0, f"{json.dumps(section)} = {toml_value(draw(VALUES))}")  # a section that is not a table
            continue
        lines.append(f"[{json.dumps(section)}]")
        known = SECTIONS.get(section, [])
        keys = st.sampled_from(known) | st.text(min_size=1, max_size=8) if known else st.text(min_size=1, max_size=8)
        for key in draw(st.lists(keys, max_size=5, unique=True)):
            lines.append(f"{json.dumps(key)} = {toml_value(draw(VALUES))}")
    return "\n".join(lines) + "\n"


@st.composite
def mutated_example(draw) -> bytes:
    raw = bytearray(EXAMPLE.read_bytes())
    for _ in range(draw(st.integers(1, 6))):
        pos = draw(st.integers(0, len(raw) - 1))
        op = draw(st.sampled_from(["delete", "insert", "replace"]))
        char = draw(st.sampled_from(list(b"=[]\"'.#\n0123456789-+e_ \\{},")) | st.integers(0, 255))
        if op == "delete":
            del raw[pos]
        elif op == "insert":
            raw.insert(pos, char)
        else:
            raw[pos] = char
    return bytes(raw)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz-config") / "config.toml"


def check_outcome(name: str, load) -> None:
    counts = FUZZ_COUNTS[name]
    counts["total"] += 1
    try:
        cfg = load()
    except ConfigError as exc:
        assert str(exc)
        counts["refused"] += 1
        return
    counts["accepted"] += 1
    assert isinstance(cfg, Config)
    # An accepted config holds only valid values: it goes through the strict loader again unchanged.
    assert configmod.from_dict(dataclasses.asdict(cfg)) == cfg


@pytest.mark.fuzz
@FUZZ
@given(source=st.one_of(documents().map(str.encode), mutated_example(), st.binary(max_size=512)))
def test_config_load_returns_a_config_or_config_error(source, scratch):
    scratch.write_bytes(source)
    check_outcome("config.load", lambda: configmod.load(scratch))


def rule_values(key: str):
    """Values shaped for one setting's rule, so that the accepting path is fuzzed as much as the refusing one."""
    kind, detail = configmod._RULES[key]
    if kind in ("float", "optfloat", "int"):
        lo, hi = detail[0], detail[1]
        near = st.sampled_from([lo, hi, lo - 1, hi + 1, (lo + hi) / 2, 0, -0.0, float("nan")])
        numbers = st.integers(int(lo) - 2, int(min(hi, 2**40)) + 2) if kind == "int" else st.floats(lo - 1, hi + 1)
        return near | numbers | (st.none() if kind == "optfloat" else st.nothing())
    if kind == "bool":
        return st.booleans() | st.sampled_from([0, 1, "true"])
    if kind == "choice":
        return st.sampled_from([*detail, "", "DRM"])
    if kind == "sourcespec":
        return st.sampled_from(["auto", "demo", "picamera2", "images:x", "opencv:0", "images:", "demo:1", "webcam", ""])
    if kind == "names":
        return st.lists(st.sampled_from(["person", "car", ""]) | st.integers(), max_size=3)
    if kind == "classmap":
        return st.dictionaries(st.sampled_from(["person", "car"]), st.floats(-0.5, 1.5) | st.text(max_size=3), max_size=2)
    return st.text(max_size=12) | st.integers()


@st.composite
def overrides(draw) -> dict:
    out = {}
    keys = [draw(st.text(max_size=12)) if draw(st.integers(0, 9)) == 0 else draw(st.sampled_from(sorted(configmod._RULES)))
            for _ in range(draw(st.integers(0, 3)))]
    for key in keys:
        shaped = key in configmod._RULES and draw(st.integers(0, 3)) > 0
        out[key] = draw(rule_values(key) if shaped else VALUES)
    return out


@pytest.mark.fuzz
@FUZZ
@given(overrides=overrides())
def test_overrides_return_a_config_or_config_error(overrides):
    check_outcome("config.with_overrides", lambda: configmod.with_overrides(Config(), overrides))


def test_the_toml_writer_round_trips_the_defaults():
    """The generator writes real TOML: every default value, written out, loads back as the defaults."""
    assert isinstance(configmod.load(EXAMPLE), Config)
    doc = "\n".join(f"[{s}]\n" + "\n".join(f"{k} = {toml_value(v)}" for k, v in dataclasses.asdict(Config())[s].items()
                                            if v is not None) for s in SECTIONS)
    assert configmod.from_dict(tomllib.loads(doc)) == Config()
