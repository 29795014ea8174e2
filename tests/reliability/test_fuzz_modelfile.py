"""Fuzz app.modelfile.read_model with mutated valid files: truncations, bit flips (with and without a fresh
checksum), header JSON edits, tensor byte overwrites, random bytes. The only outcomes allowed are a valid
Model (which must then also run) or ModelFormatError. Cases: XNORCAM_FUZZ_EXAMPLES each (100 in CI)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.detector import Detector
from app.modelfile import Model, ModelFormatError, read_model, validate
from tests.reliability import modelbytes
from tests.reliability.support import FUZZ_COUNTS, FUZZ_EXAMPLES

FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

INTERESTING_INTS = st.sampled_from([0, 1, -1, 2, 3, 63, 64, 65, 191, 192, 4096, 4097, 2**31, 2**32, 2**63, 2**64, -2**63,
                                    10**30, 2**1100])
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | INTERESTING_INTS | st.integers() | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)


@pytest.fixture(scope="module")
def valid(model_path):
    return model_path.read_bytes()


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz-model") / "case.xnc"


def edit_header(data, header: dict) -> str:
    """Walk to a random node of the header and replace, delete or add something there."""
    node, path = header, []
    while isinstance(node, (dict, list)) and node and data.draw(st.integers(0, 3)) > 0:
        key = data.draw(st.sampled_from(sorted(node) if isinstance(node, dict) else list(range(len(node)))))
        if not isinstance(node[key], (dict, list)) or not node[key]:
            break
        node, path = node[key], [*path, key]
    action = data.draw(st.sampled_from(["replace", "delete", "add"]))
    if isinstance(node, dict) and node:
        key = data.draw(st.sampled_from(sorted(node)))
    elif isinstance(node, list) and node:
        key = data.draw(st.integers(0, len(node) - 1))
    else:
        return "noop"
    if action == "delete":
        del node[key]
    elif action == "add" and isinstance(node, dict):
        node[data.draw(st.text(max_size=8))] = data.draw(JSON_VALUES)
    elif action == "add":
        node.insert(key, data.draw(JSON_VALUES))
    else:
        node[key] = data.draw(JSON_VALUES)
    return f"header-{action}"


INTERESTING_NUMBERS = st.one_of(
    INTERESTING_INTS,
    st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e30, 3e38, -0.0, 0.5, 1.0000001, 1e-45]),
    st.integers(min_value=2**1023, max_value=2**1100) | st.integers(max_value=-(2**1023), min_value=-(2**1100)),
    st.floats(),
    st.integers(),
)
# Header fields that are not tensor descriptors: fewer of them, and each means something to the network.
SEMANTIC = ("anchors", "decode", "input", "data_size", "params")


def number_paths(node, path=()):
    """Paths to every number (not bool) in the header: the fields where type and range checks matter most."""
    if isinstance(node, dict):
        items = node.items()
    elif isinstance(node, list):
        items = enumerate(node)
    else:
        return [path] if isinstance(node, (int, float)) and not isinstance(node, bool) else []
    return [p for k, v in items for p in number_paths(v, (*path, k))]


def edit_number(data, header: dict) -> str:
    paths = number_paths(header)
    semantic = [p for p in paths if any(k in SEMANTIC for k in p)]
    path = data.draw(st.sampled_from(semantic if semantic and data.draw(st.booleans()) else paths))
    node = header
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = data.draw(INTERESTING_NUMBERS)
    return "header-number"


def mutate(data, raw: bytes) -> tuple[str, bytes]:
    kind = data.draw(st.sampled_from(["truncate", "flip", "flip-resealed", "header", "header-number", "tensor", "prefix",
                                      "random", "random-with-magic", "extend"]))
    if kind == "truncate":
        return kind, raw[: data.draw(st.integers(0, len(raw) - 1))]
    if kind in ("flip", "flip-resealed"):
        out = bytearray(raw)
        span = len(raw) - (modelbytes.DIGEST if kind == "flip-resealed" else 0)
        hot = data.draw(st.booleans())  # half the time aim at the preamble and header, where parsing happens
        limit = min(span, modelbytes.data_start(raw)) if hot else span
        for _ in range(data.draw(st.integers(1, 8))):
            out[data.draw(st.integers(0, limit - 1))] ^= 1 << data.draw(st.integers(0, 7))
        return kind, modelbytes.reseal(bytes(out)) if kind == "flip-resealed" else bytes(out)
    if kind in ("header", "header-number", "tensor", "prefix"):
        magic, version, header, body = modelbytes.split(raw)
        if kind.startswith("header"):
            kind = edit_header(data, header) if kind == "header" else edit_number(data, header)
            return kind, modelbytes.build(json.dumps(header, allow_nan=True).encode(), body, version)
        if kind == "tensor":
            layer = data.draw(st.integers(0, len(header["layers"]) - 1))
            names = sorted(header["layers"][layer]["tensors"])
            if not names:
                return "tensor-none", modelbytes.build(header, body, version)
            off, nbytes = modelbytes.tensor_range(header, layer, data.draw(st.sampled_from(names)))
            start = off + data.draw(st.integers(0, max(0, nbytes - 4)))
            patch = data.draw(st.sampled_from([b"\x00\x00\xc0\x7f", b"\x00\x00\x80\x7f", b"\xff\xff\xff\xff"])
                              | st.binary(min_size=1, max_size=16))
            patch = patch[: len(body) - start]
            body = bytearray(body)
            body[start : start + len(patch)] = patch
            return kind, modelbytes.build(header, bytes(body), version)
        hlen = data.draw(INTERESTING_INTS.filter(lambda v: 0 <= v < 2**32) | st.integers(0, 2**32 - 1))
        out = bytearray(raw)
        out[12:16] = hlen.to_bytes(4, "little")
        return kind, modelbytes.reseal(bytes(out))
    if kind == "extend":
        return kind, raw + data.draw(st.binary(min_size=1, max_size=64))
    noise = data.draw(st.binary(max_size=2048))
    if kind == "random-with-magic":
        return kind, modelbytes.reseal(modelbytes.PREFIX.pack(b"XNORCAM\x00", 1, len(noise)) + noise + bytes(32))
    return kind, noise


@pytest.mark.fuzz
@FUZZ
@given(data=st.data())
def test_read_model_returns_a_valid_model_or_model_format_error(data, valid, scratch):
    kind, raw = mutate(data, valid)
    if raw == valid:
        kind = "unchanged"  # e.g. the same bit flipped twice
    scratch.write_bytes(raw)
    counts = FUZZ_COUNTS["read_model"]
    counts["total"] += 1
    try:
        model = read_model(scratch)
    except ModelFormatError as exc:
        assert str(scratch) in str(exc)
        counts["refused"] += 1
        return
    # Anything else raised fails the test. An accepted file must be a consistent model that runs.
    counts["accepted"] += 1
    counts[f"accepted:{kind}"] += 1
    assert isinstance(model, Model)
    validate(model)
    if model.input_width * model.input_height <= 512 * 512:
        det = Detector(model=model)
        out = det.detect(np.full((60, 80), 90, np.uint8))
        assert out.dtype == np.float32 and out.ndim == 2 and out.shape[1] == 6
        assert np.all(np.isfinite(out))
        counts["accepted-and-ran"] += 1


def test_mutations_reach_past_the_checksum(valid, scratch):
    """The resealed mutations must get to the checks behind the checksum, or the fuzz tests little."""
    messages = set()
    for seed in range(40):
        rng = np.random.default_rng(seed)
        magic, version, header, body = modelbytes.split(valid)
        header["layers"][int(rng.integers(0, len(header["layers"])))]["params"]["in_ch"] = int(rng.integers(0, 9))
        scratch.write_bytes(modelbytes.build(header, body, version))
        try:
            read_model(scratch)
        except ModelFormatError as exc:
            messages.add(str(exc).split(": ", 1)[1].split(":")[0])
    assert not any("checksum" in m for m in messages) and len(messages) >= 3, messages
