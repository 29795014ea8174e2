"""A bad model file or config is refused before the camera opens, with the exit code the unit will not restart on."""

from __future__ import annotations

import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from app.modelfile import ModelFormatError, read_model
from tests.reliability import modelbytes
from tests.reliability.support import ROOT, run_app, unit_restart_prevent_codes

EXIT_USAGE, EXIT_MODEL, EXIT_CONFIG = 2, 65, 78


def test_unit_prevents_restart_on_exactly_the_refusal_codes():
    from app import __main__ as cli

    assert unit_restart_prevent_codes() == {EXIT_USAGE, EXIT_MODEL, EXIT_CONFIG, cli.EXIT_NO_CAMERA}
    assert (cli.EXIT_USAGE, cli.EXIT_MODEL, cli.EXIT_CONFIG) == (EXIT_USAGE, EXIT_MODEL, EXIT_CONFIG)
    assert cli.EXIT_NO_CAMERA == 69  # EX_UNAVAILABLE: no Pi camera after waiting for one


def truncated(raw: bytes) -> bytes:
    return raw[: len(raw) * 2 // 3]


def bit_flipped(raw: bytes) -> bytes:
    out = bytearray(raw)
    out[modelbytes.data_start(raw) + 100] ^= 0x10
    return bytes(out)


def wrong_version(raw: bytes) -> bytes:
    magic, _, header, data = modelbytes.split(raw)
    return modelbytes.build(header, data, version=2)


def wrong_shape(raw: bytes) -> bytes:
    """The head weight transposed in the header: same byte count, wrong layout."""
    _, _, header, data = modelbytes.split(raw)
    desc = header["layers"][-1]["tensors"]["weight"]
    desc["shape"] = desc["shape"][::-1]
    return modelbytes.build(header, data)


def nan_bearing(raw: bytes) -> bytes:
    _, _, header, data = modelbytes.split(raw)
    off, nbytes = modelbytes.tensor_range(header, len(header["layers"]) - 1, "bias")
    data = bytearray(data)
    data[off : off + 4] = struct.pack("<f", float("nan"))
    return modelbytes.build(header, bytes(data))


def inconsistent_chain(raw: bytes) -> bytes:
    """A layer claiming more input channels than the one before gives (a valid-looking, wrong network)."""
    _, _, header, data = modelbytes.split(raw)
    header["input"]["channels"] = 3
    return modelbytes.build(header, data)


CORRUPTIONS = {
    "truncated": (truncated, "truncated"),
    "bit-flipped": (bit_flipped, "checksum"),
    "wrong-version": (wrong_version, "version 2"),
    "wrong-shape": (wrong_shape, "has shape"),
    "nan": (nan_bearing, "non-finite"),
    "chain": (inconsistent_chain, "in_ch"),
}


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_corrupt_model_is_refused_in_process(name, model_path, tmp_path):
    corrupt, words = CORRUPTIONS[name]
    bad = tmp_path / f"{name}.xnc"
    bad.write_bytes(corrupt(model_path.read_bytes()))
    with pytest.raises(ModelFormatError) as err:
        read_model(bad)
    assert words in str(err.value) and str(bad) in str(err.value)


def test_flipped_data_byte_is_refused_for_its_checksum(model_path, tmp_path):
    raw = model_path.read_bytes()
    start = modelbytes.data_start(raw)
    rng = np.random.default_rng(6)
    for pos in rng.integers(start, len(raw) - modelbytes.DIGEST, size=20):
        out = bytearray(raw)
        out[pos] ^= 1 << int(rng.integers(0, 8))
        bad = tmp_path / "flip.xnc"
        bad.write_bytes(bytes(out))
        with pytest.raises(ModelFormatError, match="checksum"):
            read_model(bad)


@pytest.mark.parametrize("name", ["truncated", "bit-flipped", "wrong-version", "wrong-shape", "nan"])
def test_corrupt_model_exits_65_before_the_camera_opens(name, model_path, tmp_path, fake_camera):
    make_env, marker = fake_camera
    corrupt, words = CORRUPTIONS[name]
    bad = tmp_path / f"{name}.xnc"
    bad.write_bytes(corrupt(model_path.read_bytes()))
    r = run_app("--source", "picamera2", "--model", bad, "--preview", "none", env=make_env())
    assert r.returncode == EXIT_MODEL, r.stderr
    assert r.returncode in unit_restart_prevent_codes()
    assert "model file refused" in r.stderr and words in r.stderr and str(bad) in r.stderr
    assert not marker.exists(), "the camera was opened before the model was checked"


BAD_CONFIGS = {
    "unknown key": ('[source]\nspec = "picamera2"\n[log]\nmax_bytes = 5\n', "log.max_bytes"),
    "wrong type": ('[source]\nspec = "picamera2"\nhang_timeout_s = "soon"\n', "source.hang_timeout_s"),
    "nan": ('[source]\nspec = "picamera2"\nfps = nan\n', "source.fps"),
    "not toml": ('[source\nspec = "picamera2"\n', "not valid TOML"),
    "backoff order": ('[source]\nspec = "picamera2"\nbackoff_initial_s = 9.0\nbackoff_max_s = 1.0\n', "backoff_max_s"),
    "model classes": ('[source]\nspec = "picamera2"\n[detector]\nclasses = ["unicorn"]\n', "unicorn"),
    "NUL in a path": ('[source]\nspec = "picamera2"\n[log]\npath = "/tmp/a\\u0000b"\n', "log.path"),
    "NUL in the model path": ('[source]\nspec = "picamera2"\n[detector]\nmodel = "m\\u0000.xnc"\n', "detector.model"),
    "log.max_mb rounds to 0 bytes": ('[source]\nspec = "picamera2"\n[log]\nmax_mb = 1e-7\n', "log.max_mb"),
    "deep array": ('[source]\nspec = "picamera2"\nx = ' + "[" * 100_000 + "]" * 100_000 + "\n", "levels deep"),
    "deep dotted key": ('[source]\nspec = "picamera2"\n' + "a" + ".a" * 200_000 + " = 1\n", "dotted key"),
}


@pytest.mark.parametrize("name", BAD_CONFIGS)
def test_bad_config_exits_78_before_the_camera_opens(name, model_path, tmp_path, fake_camera):
    make_env, marker = fake_camera
    text, words = BAD_CONFIGS[name]
    cfg = tmp_path / "config.toml"
    cfg.write_text(text)
    r = run_app("--config", cfg, "--model", model_path, "--preview", "none", env=make_env())
    assert r.returncode == EXIT_CONFIG, r.stderr
    assert r.returncode in unit_restart_prevent_codes()
    assert "configuration refused" in r.stderr and words in r.stderr
    assert not marker.exists(), "the camera was opened before the config was checked"


BAD_TRACK_CONFIGS = {
    "self-intersecting zone": ("[events]\nzones = { door = [[0, 0], [1, 1], [1, 0], [0, 1]] }\n",
                               "events.zones.door"),
    "zone out of range": ("[events]\nzones = { door = [[0, 0], [1, 0], [1, 1.5]] }\n", "events.zones.door"),
    "N > M": ("[tracker]\nconfirm_hits = 4\nconfirm_frames = 3\n", "tracker.confirm_hits"),
    "negative lost time": ("[tracker]\nlost_after_s = -2\n", "tracker.lost_after_s"),
    "negative update time": ("[events]\nupdate_every_s = -1\n", "events.update_every_s"),
    "unknown restricting zone": ("[events]\nonly_in_zones = [\"door\"]\n", "events.only_in_zones"),
}


@pytest.mark.parametrize("name", BAD_TRACK_CONFIGS)
def test_bad_tracking_config_exits_78_with_one_line_naming_the_key(name, model_path, tmp_path, fake_camera):
    make_env, marker = fake_camera
    text, key = BAD_TRACK_CONFIGS[name]
    cfg = tmp_path / "config.toml"
    cfg.write_text('[source]\nspec = "picamera2"\n' + text)
    r = run_app("--config", cfg, "--model", model_path, "--preview", "none", env=make_env())
    assert r.returncode == EXIT_CONFIG, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "configuration refused" in lines[0] and key in lines[0], r.stderr
    assert not marker.exists(), "the camera was opened before the config was checked"


def test_non_utf8_config_exits_78(tmp_path, fake_camera):
    make_env, marker = fake_camera
    cfg = tmp_path / "config.toml"
    cfg.write_bytes(b'[source]\nspec = "\xff\xfe"\n')
    r = run_app("--config", cfg, env=make_env())
    assert r.returncode == EXIT_CONFIG and "UTF-8" in r.stderr
    assert not marker.exists()


@pytest.mark.parametrize("args", [["--fps", "fast"], ["--log-files", "0"], ["--source", "camera"], ["--bogus"]])
def test_bad_command_line_exits_2_before_the_camera_opens(args, model_path, fake_camera):
    make_env, marker = fake_camera
    r = run_app("--source", "picamera2", "--model", model_path, *args, env=make_env())
    assert r.returncode == EXIT_USAGE, r.stderr
    assert r.returncode in unit_restart_prevent_codes()
    assert not marker.exists()


def test_rebuild_helper_makes_files_the_reader_accepts(model_path, tmp_path):
    """The corruptions above differ from a valid file only where they say (else they would prove nothing)."""
    _, version, header, data = modelbytes.split(model_path.read_bytes())
    header["metadata"] = {**header.get("metadata", {}), "note": "rebuilt"}
    path = tmp_path / "rebuilt.xnc"
    path.write_bytes(modelbytes.build(header, data, version=version))
    assert read_model(path).metadata["note"] == "rebuilt"


@pytest.mark.parametrize("field", ["anchor", "score_threshold", "nms_iou"])
def test_huge_json_numbers_are_refused_not_overflowed(field, model_path, tmp_path):
    """Found by the model fuzz: a 1100-bit JSON integer raised OverflowError instead of ModelFormatError."""
    _, version, header, data = modelbytes.split(model_path.read_bytes())
    if field == "anchor":
        header["anchors"][0][0] = 2**1100
    else:
        header["decode"][field] = 2**1100
    bad = tmp_path / "huge.xnc"
    bad.write_bytes(modelbytes.build(header, data, version))
    with pytest.raises(ModelFormatError, match="anchor" if field == "anchor" else field):
        read_model(bad)


@pytest.mark.parametrize("kind", ["char-device", "fifo", "directory"])
def test_model_path_that_is_not_a_regular_file_exits_65_promptly(kind, tmp_path, fake_camera):
    """/dev/zero would be read until memory runs out, a FIFO would block forever (even SIGTERM cannot end a
    blocked open()): both must be refused like any other bad model file."""
    make_env, marker = fake_camera
    if kind == "char-device":
        path = "/dev/zero"
    elif kind == "fifo":
        path = tmp_path / "model.fifo"
        os.mkfifo(path)
    else:
        path = tmp_path
    r = run_app("--source", "picamera2", "--model", path, "--preview", "none", env=make_env(), timeout=60)
    assert r.returncode == EXIT_MODEL, r.stderr
    assert "model file refused" in r.stderr and str(path) in r.stderr
    assert not marker.exists()


@pytest.mark.parametrize("case", ["notes", "model", "token", "stdout closed"])
def test_a_log_that_cannot_be_ours_exits_78_before_the_camera_opens(case, model_path, tmp_path, fake_camera):
    make_env, marker = fake_camera
    target = {"notes": tmp_path / "notes.json", "model": tmp_path / "person.xnc", "token": tmp_path / "token"}.get(case)
    content = {"notes": b'{"a": 1}\n{"b": 2}', "model": model_path.read_bytes(), "token": b"s3cr3t"}.get(case)
    if target is not None:
        target.write_bytes(content)
    args = ["--source", "picamera2", "--model", model_path, "--preview", "none", "--log", target or "-"]
    if case == "stdout closed":
        r = subprocess.run([sys.executable, "-m", "app", *map(str, args)], cwd=ROOT, env=make_env(),
                           stderr=subprocess.PIPE, text=True, timeout=120, preexec_fn=lambda: os.close(1))
    else:
        r = run_app(*args, env=make_env())
    assert r.returncode == EXIT_CONFIG, r.stderr
    assert "configuration refused" in r.stderr and "Traceback" not in r.stderr
    assert not marker.exists(), "the camera was opened before the log was checked"
    if target is not None:
        assert target.read_bytes() == content
