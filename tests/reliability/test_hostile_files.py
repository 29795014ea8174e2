"""Hostile files under the size caps: deep nesting (a model header, the TOML config, COCO annotations), models
that the format allows but that would exhaust a 512 MB Pi, and files far larger than a model. Each is refused
with the documented exit code and one line, before anything large is read or allocated.

The property tests at the end (marked fuzz) generate the two families: nesting of every depth and shape, and
models of absurd but format-valid shapes; ``make fuzz`` runs them with 2000 cases each."""

from __future__ import annotations

import json
import os
import tracemalloc

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from app import config as configmod
from app.config import ConfigError
from app.limits import MAX_JSON_DEPTH, MAX_TOML_DEPTH, MAX_TOML_KEY_PARTS
from app.modelfile import MAX_ACTIVATION_BYTES, MAX_FILE_BYTES, ModelFormatError, activation_bytes, read_model
from evaluation.datasets import LabelError, load_coco
from tests.reliability import modelbytes
from tests.reliability.support import FUZZ_COUNTS, FUZZ_EXAMPLES, run_app

FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def nested(depth: int, kind: str = "array", leaf: str = "1") -> str:
    """JSON text ``depth`` levels deep: arrays, objects, or both in turn."""
    if kind == "array":
        return "[" * depth + leaf + "]" * depth
    if kind == "object":
        return '{"a":' * depth + leaf + "}" * depth
    opens = "".join('[' if i % 2 else '{"a":' for i in range(depth))
    closes = "".join("]" if i % 2 else "}" for i in reversed(range(depth)))
    return opens + leaf + closes


def one_line(stderr: str) -> str:
    lines = [x for x in stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


# ------------------------------------------------------------------ deep nesting: the model header


def with_deep_metadata(valid: bytes, text: str) -> bytes:
    """The valid model with ``text`` (raw JSON) as a metadata value, and a correct checksum."""
    _, _, header, data = modelbytes.split(valid)
    header["metadata"] = {"deep": "@@DEEP@@"}
    raw = json.dumps(header).encode().replace(b'"@@DEEP@@"', text.encode())
    return modelbytes.build(raw, data)


@pytest.mark.parametrize("depth, kind", [(100_000, "array"), (100_000, "object"), (50_000, "mixed"),
                                         (MAX_JSON_DEPTH + 1, "array"), (2_000, "object")])
def test_deeply_nested_model_header_is_refused(tmp_path, model_path, depth, kind):
    path = tmp_path / "deep.xnc"
    path.write_bytes(with_deep_metadata(model_path.read_bytes(), nested(depth, kind)))
    with pytest.raises(ModelFormatError, match="nested .* levels deep"):
        read_model(path)


def test_moderate_nesting_in_the_metadata_is_still_read(tmp_path, model_path):
    path = tmp_path / "ok.xnc"
    path.write_bytes(with_deep_metadata(model_path.read_bytes(), nested(MAX_JSON_DEPTH - 4, "mixed")))
    assert read_model(path).metadata["deep"]


def test_app_refuses_a_deep_model_header_with_65_and_one_line(tmp_path, model_path):
    path = tmp_path / "deep.xnc"
    path.write_bytes(with_deep_metadata(model_path.read_bytes(), nested(100_000)))  # 200 KB more than the model
    r = run_app("--model", path, "--source", "demo", "--max-frames", "1")
    assert r.returncode == 65
    assert "levels deep" in one_line(r.stderr)


# ------------------------------------------------------------------ deep nesting: the TOML config

DEEP_TOML = {
    "array": "x = " + "[" * 100_000 + "]" * 100_000 + "\n",
    "inline tables": "x = " + "{a = " * 50_000 + "1" + "}" * 50_000 + "\n",
    "array in a section": "[source]\nspec = " + "[" * 5_000 + "1" + "]" * 5_000 + "\n",
    "dotted key 8000": "a" + ".a" * 8_000 + " = 1\n",
    "dotted key 200k": "a" + ".a" * 200_000 + " = 1\n",
    "dotted table header": "[" + "a." * 5_000 + "a]\nx = 1\n",
    "quoted dotted key": '"a"' + '."a"' * 8_000 + " = 1\n",
    "spaced dotted key": "a" + " . a" * 8_000 + " = 1\n",
    "dotted keys in inline tables": "x = " + "{a.a.a.a.a = " * 100 + "1" + "}" * 100 + "\n",
    "just over the limits": "x = " + "[" * (MAX_TOML_DEPTH + 1) + "]" * (MAX_TOML_DEPTH + 1) + "\n",
    "a key just over the limit": "a" + ".a" * MAX_TOML_KEY_PARTS + " = 1\n",
}


@pytest.mark.parametrize("name", sorted(DEEP_TOML))
def test_deeply_nested_toml_is_refused_before_parsing(tmp_path, name):
    path = tmp_path / "config.toml"
    path.write_text(DEEP_TOML[name])
    tracemalloc.start()
    try:
        with pytest.raises(ConfigError, match="levels deep|dotted key of"):
            configmod.load(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20  # the 8000-level key took 264 MB to parse


def test_nesting_in_strings_and_comments_is_not_counted(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text('# [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[\n'
                    '[source]\nspec = "images:/srv/' + "[" * 100 + '"\n'
                    "[log]\npath = '/var/log/xnorcam/a.b.c.d.e.f.g.h.i.j.k.l.m.n.o.p.q.r.s.t.jsonl'\n"
                    '[events.zones]\ndoor = [[0.0, 0.0], [0.5, 0.0], [0.5, 1.0]]\n')
    cfg = configmod.load(path)
    assert cfg.source.spec.endswith("[" * 100) and "door" in cfg.events.zones


@pytest.mark.parametrize("name", ["array", "dotted key 200k"])
def test_app_refuses_a_deep_config_with_78_and_one_line(tmp_path, name):
    path = tmp_path / "config.toml"
    path.write_text(DEEP_TOML[name])
    r = run_app("--config", path, "--source", "demo", "--max-frames", "1", timeout=60)
    assert r.returncode == 78
    assert "configuration refused" in one_line(r.stderr)


# ------------------------------------------------------------------ deep nesting: COCO annotations


def coco_with(tmp_path, where: str, deep: str):
    doc = {"images": [{"id": 1, "file_name": "x.jpg", "width": 10, "height": 10}],
           "categories": [{"id": 1, "name": "person"}], "annotations": []}
    if where == "annotations":
        doc["annotations"] = "@@DEEP@@"
    elif where == "extra":
        doc["info"] = "@@DEEP@@"
    else:
        doc["images"][0]["extra"] = "@@DEEP@@"
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(doc).replace('"@@DEEP@@"', deep))
    return path


@pytest.mark.parametrize("where", ["annotations", "extra", "image"])
@pytest.mark.parametrize("kind", ["array", "object"])
def test_deeply_nested_coco_is_refused_naming_the_file(tmp_path, where, kind):
    path = coco_with(tmp_path, where, nested(100_000, kind))
    with pytest.raises(LabelError, match="nested .* levels deep") as e:
        load_coco(path, tmp_path)
    assert str(path) in str(e.value)


def test_eval_refuses_deep_coco_with_65_and_one_line(tmp_path, rand_model_file, capsys):
    import evaluation.__main__ as ev

    (tmp_path / "annotations").mkdir()
    (tmp_path / "images").mkdir()
    coco_with(tmp_path, "extra", nested(100_000)).rename(tmp_path / "annotations" / "instances_x.json")
    assert ev.main(["--model", str(rand_model_file), "--data", str(tmp_path)]) == 65
    assert "levels deep" in one_line(capsys.readouterr().err)


# ------------------------------------------------------------------ absurd models and huge files


def resized(valid: bytes, width: int, height: int) -> bytes:
    """The valid model with another input size (the network is fully convolutional: still format-valid)."""
    _, _, header, data = modelbytes.split(valid)
    header["input"]["width"], header["input"]["height"] = width, height
    return modelbytes.build(header, data)


@pytest.mark.parametrize("size", [(4096, 4096), (4096, 1024), (2048, 2048), (1536, 1536)])
def test_a_model_too_large_for_the_pi_is_refused_naming_the_limit(tmp_path, model_path, size):
    path = tmp_path / "huge.xnc"
    path.write_bytes(resized(model_path.read_bytes(), *size))
    assert path.stat().st_size < 1_000_000
    with pytest.raises(ModelFormatError, match=f"limit of {MAX_ACTIVATION_BYTES // 2**20} MiB"):
        read_model(path)


def test_a_larger_input_within_the_limit_is_still_accepted(tmp_path, model_path):
    path = tmp_path / "big.xnc"
    path.write_bytes(resized(model_path.read_bytes(), 640, 480))
    m = read_model(path)
    assert activation_bytes(m) <= MAX_ACTIVATION_BYTES and m.input_width == 640


def test_app_refuses_an_absurd_model_with_65_naming_the_limit(tmp_path, model_path):
    path = tmp_path / "huge.xnc"
    path.write_bytes(resized(model_path.read_bytes(), 4096, 4096))
    r = run_app("--model", path, "--source", "demo", "--max-frames", "1")
    assert r.returncode == 65
    assert "MiB" in one_line(r.stderr) and "512 MB" in r.stderr


def sparse(path, size: int, head: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(head)
        fh.truncate(size)


@pytest.mark.parametrize("case", ["bad magic", "good magic, too large", "good magic, header past the end"])
def test_a_large_file_is_refused_without_being_read(tmp_path, case):
    path = tmp_path / "big.xnc"
    good = modelbytes.PREFIX.pack(b"XNORCAM\x00", 1, 1000)
    if case == "bad magic":
        sparse(path, 200 * 2**20, b"PK\x03\x04" + b"\x00" * 12)
    elif case == "good magic, too large":
        sparse(path, max(3 * 2**30, MAX_FILE_BYTES + 1), good)
    else:
        sparse(path, 100 * 2**20, modelbytes.PREFIX.pack(b"XNORCAM\x00", 1, 2**31))
    tracemalloc.start()
    try:
        with pytest.raises(ModelFormatError):
            read_model(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20, f"read {peak} bytes of a file that is no model"


# ------------------------------------------------------------------ property tests (make fuzz)


@st.composite
def deep_texts(draw) -> tuple[str, int]:
    """(JSON text, its depth): nesting of every depth up to 200k, of arrays, objects, both, with strings."""
    depth = draw(st.sampled_from([1, 2, MAX_JSON_DEPTH, MAX_JSON_DEPTH + 1, 1000, 100_000, 200_000])
                 | st.integers(1, 5000))
    kind = draw(st.sampled_from(["array", "object", "mixed"]))
    leaf = draw(st.sampled_from(["1", '"]]]"', "null", '"\\\\"', "[]", "{}"]))
    extra = 1 if leaf in ("[]", "{}") else 0
    return nested(depth, kind, leaf), depth + extra


@pytest.mark.fuzz
@FUZZ
@given(case=deep_texts(), where=st.sampled_from(["model", "toml", "coco"]))
@example(case=(nested(200_000, "object", "1"), 200_000), where="toml")  # larger than the config's size cap
def test_nesting_of_any_depth_is_read_or_refused_never_raised(case, where, tmp_path_factory, model_path):
    text, depth = case
    counts = FUZZ_COUNTS["nesting"]
    counts["total"] += 1
    d = tmp_path_factory.mktemp("nest")
    if where == "model":
        path = d / "m.xnc"
        path.write_bytes(with_deep_metadata(model_path.read_bytes(), text))
        load, refusal = (lambda: read_model(path)), ModelFormatError
        limit = MAX_JSON_DEPTH - 2  # the metadata sits two levels down
    elif where == "toml":
        path = d / "c.toml"
        path.write_text(f"[mqtt]\nhost = {text}\n")
        load, refusal = (lambda: configmod.load(path)), ConfigError
        limit = MAX_TOML_DEPTH
    else:
        path = coco_with(d, "extra", text)
        load, refusal = (lambda: load_coco(path, d)), LabelError
        limit = MAX_JSON_DEPTH - 1
    try:
        load()
        counts[f"{where}:read"] += 1
        assert depth <= limit or where == "toml"  # a TOML value that deep is refused by the checks anyway
    except refusal as exc:
        counts[f"{where}:refused"] += 1
        assert "\n" not in str(exc)
        if where == "toml" and path.stat().st_size > configmod.MAX_CONFIG_BYTES:
            assert "too large" in str(exc)  # the size cap is checked first: 200k levels of objects exceed 1 MiB
        elif depth > limit + 2:
            assert "deep" in str(exc)


@st.composite
def absurd_shapes(draw) -> tuple[int, int]:
    side = st.sampled_from([1, 2, 8, 63, 64, 191, 192, 640, 1023, 1024, 2048, 4095, 4096]) | st.integers(1, 4096)
    return draw(side), draw(side)


@pytest.mark.fuzz
@FUZZ
@given(shape=absurd_shapes())
def test_models_of_absurd_shapes_fit_the_limit_or_are_refused(shape, tmp_path_factory, model_path):
    counts = FUZZ_COUNTS["absurd shapes"]
    counts["total"] += 1
    path = tmp_path_factory.mktemp("absurd") / "m.xnc"
    path.write_bytes(resized(model_path.read_bytes(), *shape))
    try:
        m = read_model(path)
    except ModelFormatError as exc:
        counts["refused"] += 1
        assert "\n" not in str(exc)
        return
    counts["accepted"] += 1
    assert activation_bytes(m) <= MAX_ACTIVATION_BYTES
    assert os.path.getsize(path) <= MAX_FILE_BYTES
