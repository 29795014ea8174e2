"""Strict TOML config: defaults, every key of the example file, errors that name the key."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from app import config as cfgmod
from app.config import Config, ConfigError, from_dict, load, with_overrides

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "deploy" / "config.example.toml"


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "config.toml"
    p.write_text(text)
    return p


def test_builtin_defaults_when_default_file_absent(monkeypatch, tmp_path):
    monkeypatch.setattr(cfgmod, "DEFAULT_CONFIG_PATH", tmp_path / "missing.toml")
    c = load()
    assert c == Config()
    assert c.source.spec == "auto" and c.detector.threads == 1 and c.preview.mode == "auto"


def test_default_file_is_used_when_present(monkeypatch, tmp_path):
    p = write(tmp_path, '[source]\nspec = "demo"\n')
    monkeypatch.setattr(cfgmod, "DEFAULT_CONFIG_PATH", p)
    assert load().source.spec == "demo"


def test_example_config_loads_and_documents_every_key():
    c = load(EXAMPLE)
    assert c.log.path == "/var/log/xnorcam/detections.jsonl"
    text = EXAMPLE.read_text()
    # Every key the loader knows appears in the example, set or commented out.
    for dotted in cfgmod._RULES:
        section, key = dotted.split(".")
        assert f"[{section}]" in text
        assert re.search(rf"^#? ?{key} = ", text, re.M), f"{dotted} is not documented in {EXAMPLE.name}"


def test_example_optional_keys_load_when_uncommented(tmp_path):
    text = EXAMPLE.read_text()
    for key in ("score_threshold", "nms_iou"):
        text, n = re.subn(rf"^# ({key} = )", r"\1", text, flags=re.M)
        assert n == 1
    c = load(write(tmp_path, text))
    assert c.detector.score_threshold == pytest.approx(0.35)
    assert c.detector.nms_iou == pytest.approx(0.45)


@pytest.mark.parametrize(
    "toml, names",
    [
        ('[source]\nspecc = "demo"\n', ["source.specc", "'demo'", "spec"]),
        ("[camera]\nx = 1\n", ["[camera]", "source"]),
        ('[detector]\nthreads = "2"\n', ["detector.threads", "'2'", "integer"]),
        ("[detector]\nthreads = 0\n", ["detector.threads", "0", ">= 1"]),
        ("[detector]\nthreads = true\n", ["detector.threads", "True", "integer"]),
        ("[detector]\nscore_threshold = 1.5\n", ["detector.score_threshold", "1.5", "<= 1"]),
        ("[detector]\nscore_threshold = 0\n", ["detector.score_threshold", "0", "> 0"]),
        ("[detector]\nnms_iou = nan\n", ["detector.nms_iou", "nan"]),
        ("[detector]\nclass_thresholds = { person = 2 }\n", ["detector.class_thresholds.person", "2"]),
        ("[detector]\nclasses = \"person\"\n", ["detector.classes", "'person'", "list"]),
        ('[preview]\nmode = "hdmi"\n', ["preview.mode", "'hdmi'", "'drm'", "'window'", "'none'"]),
        ('[source]\nspec = "webcam"\n', ["source.spec", "'webcam'", "images:<dir or glob>"]),
        ('[source]\nspec = "images:"\n', ["source.spec", "needs a target"]),
        ('[source]\nspec = "demo:x"\n', ["source.spec", "takes no"]),
        ("[source]\nfps = -1\n", ["source.fps", "-1", ">= 0"]),
        ("[log]\nfiles = 0\n", ["log.files", "0"]),
        ("[log]\nonly_detections = 1\n", ["log.only_detections", "true or false"]),
        ("[source]\nbackoff_initial_s = 5.0\nbackoff_max_s = 1.0\n", ["source.backoff_max_s", "backoff_initial_s"]),
        ("source = 3\n", ["source", "3", "table"]),
        ("[tracker]\nconfirm_hits = 6\nconfirm_frames = 5\n", ["tracker.confirm_hits", "6", "confirm_frames (5)"]),
        ("[tracker]\nlost_after_s = -1\n", ["tracker.lost_after_s", "-1", ">= 0"]),
        ("[tracker]\nconfirm_frames = 33\n", ["tracker.confirm_frames", "33", "<= 32"]),
        ("[events]\nupdate_every_s = -0.5\n", ["events.update_every_s", "-0.5", ">= 0"]),
        ("[events]\nzones = { door = [[0, 0], [1, 1], [1, 0], [0, 1]] }\n",
         ["events.zones.door", "self-intersecting", "edges 1 and 3"]),
        ("[events]\nzones = { door = [[0, 0], [1.2, 0], [1, 1]] }\n", ["events.zones.door", "1.2", "0..1"]),
        ("[events]\nzones = { door = [[0, 0], [1, 0]] }\n", ["events.zones.door", "3 to 64 points"]),
        ("[events]\nzones = { door = [[0, 0], [0.5, 0.5], [1, 1]] }\n", ["events.zones.door", "self-intersecting"]),
        ("[events]\nzones = { door = [[0, 0], [1, 0], [1, 1], [1, 1]] }\n", ["events.zones.door", "repeats"]),
        ("[events]\nzones = { door = [[0, 0], [1, \"a\"], [1, 1]] }\n", ["events.zones.door", "not a point"]),
        ("[events]\nzones = [[0, 0], [1, 0], [1, 1]]\n", ["events.zones", "table of name"]),
        ("[events]\nonly_in_zones = [\"door\"]\n", ["events.only_in_zones", "'door'", "(none)"]),
        ("[events]\nline = [[0, 0.5], [0, 0.5]]\n", ["events.line", "same point"]),
        ("[events]\nline = [[0, 0.5], [1, 0.5], [1, 1]]\n", ["events.line", "[[x1, y1], [x2, y2]]"]),
        ("[events]\nline = [[0, -0.5], [1, 0.5]]\n", ["events.line", "-0.5", "0..1"]),
        ("[events]\nsnapshot_max_mb = 0\n", ["events.snapshot_max_mb", ">= 0.001"]),
        ("[log]\nonly_events = \"yes\"\n", ["log.only_events", "true or false"]),
    ],
)
def test_bad_values_are_refused_naming_key_value_and_allowed(tmp_path, toml, names):
    p = write(tmp_path, toml)
    with pytest.raises(ConfigError) as err:
        load(p)
    message = str(err.value)
    assert str(p) in message
    for part in names:
        assert part in message, f"{part!r} missing from: {message}"


def test_zones_line_and_tracker_settings_load(tmp_path):
    c = load(write(tmp_path, """
[tracker]
confirm_hits = 2
confirm_frames = 2
lost_after_s = 0
[events]
zones = { door = [[0, 0.4], [0.3, 0.4], [0.3, 1], [0, 1]], "far side" = [[0.5, 0], [1, 0], [0.75, 0.5]] }
only_in_zones = ["door"]
line = [[0.5, 0], [0.5, 1]]
"""))
    assert (c.tracker.confirm_hits, c.tracker.confirm_frames, c.tracker.lost_after_s) == (2, 2, 0.0)
    assert c.events.zones == {"door": ((0.0, 0.4), (0.3, 0.4), (0.3, 1.0), (0.0, 1.0)),
                              "far side": ((0.5, 0.0), (1.0, 0.0), (0.75, 0.5))}
    assert c.events.only_in_zones == ("door",) and c.events.line == ((0.5, 0.0), (0.5, 1.0))
    assert from_dict({"events": {"line": []}}).events.line == ()


@pytest.mark.parametrize("poly", [
    [[0, 0], [1, 0], [1, 1], [0, 1]],  # square
    [[0.1, 0.1], [0.9, 0.1], [0.5, 0.5], [0.9, 0.9], [0.1, 0.9]],  # concave (an arrow)
    [[0, 0], [1, 0], [0, 1]],
])
def test_simple_polygons_are_accepted(poly):
    assert len(cfgmod.check_polygon("z", poly)) == len(poly)


@pytest.mark.parametrize("poly", [
    [[0, 0], [1, 1], [1, 0], [0, 1]],  # a bow tie
    [[0.1, 0.1], [0.9, 0.1], [0.5, 0.5], [0.9, 0.9], [0.1, 0.9], [0.5, 0.5]],  # touches itself at a vertex
    [[0, 0], [1, 0], [1, 1], [0.5, 0], [0, 1]],  # a vertex on another edge
    [[0, 0], [1, 0], [0.5, 0], [0.5, 1]],  # an edge folds back over the one before
])
def test_self_intersecting_polygons_are_refused(poly):
    with pytest.raises(ConfigError, match="self-intersecting"):
        cfgmod.check_polygon("z", poly)


def test_not_toml_and_unreadable_files(tmp_path):
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(write(tmp_path, "[source\n"))
    with pytest.raises(ConfigError, match="cannot be read"):
        load(tmp_path / "nope.toml")


def test_values_are_converted_and_frozen(tmp_path):
    c = load(write(tmp_path, '[source]\nfps = 3\n[detector]\nclasses = ["person"]\nclass_thresholds = {person = 0.6}\n'))
    assert c.source.fps == 3.0 and isinstance(c.source.fps, float)
    assert c.detector.classes == ("person",)
    assert c.detector.class_thresholds == {"person": 0.6}
    with pytest.raises(AttributeError):
        c.source.fps = 1.0  # type: ignore[misc]


def test_overrides_are_validated_like_the_file():
    c = with_overrides(Config(), {"source.spec": "images:x", "detector.threads": 3, "detector.score_threshold": 0.5})
    assert (c.source.spec, c.detector.threads, c.detector.score_threshold) == ("images:x", 3, 0.5)
    with pytest.raises(ConfigError, match="detector.threads"):
        with_overrides(Config(), {"detector.threads": 0})
    with pytest.raises(ConfigError, match="unknown setting"):
        with_overrides(Config(), {"detector.nope": 1})


def test_from_dict_refuses_non_table():
    with pytest.raises(ConfigError):
        from_dict([])  # type: ignore[arg-type]


def test_device_fifo_directory_and_huge_files_are_refused_unread(tmp_path):
    """/dev/zero would be read until memory ran out, and a FIFO would block past SIGTERM."""
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    for path in ("/dev/zero", fifo, tmp_path):
        with pytest.raises(ConfigError, match="not a regular file"):
            load(path)
    huge = tmp_path / "huge.toml"
    huge.write_bytes(b"#" * (cfgmod.MAX_CONFIG_BYTES + 1))
    with pytest.raises(ConfigError, match="too large"):
        load(huge)


# --- every path-typed key, every number whose rounding would change its meaning ---------------------------------

PATH_KEYS = ["detector.model", "preview.record", "log.path", "events.snapshot_dir", "mqtt.password_file",
             "mqtt.ca_file", "mqtt.cert_file", "mqtt.key_file", "web.secret_file"]


def test_every_key_that_names_a_file_is_a_path_rule():
    named = {k for k in cfgmod._RULES if k.endswith(("_file", "_dir", ".path", ".model", ".record"))}
    assert named == set(PATH_KEYS)
    assert {k for k, (kind, _) in cfgmod._RULES.items() if kind == "path"} == set(PATH_KEYS)


@pytest.mark.parametrize("key", [*PATH_KEYS, "source.spec"])
@pytest.mark.parametrize("bad", ["a\0b", "\0", "x\ny", "tab\there", "del\x7f", "a" * 5000])
def test_a_path_the_os_cannot_take_is_refused_naming_the_key(tmp_path, key, bad):
    section, name = key.split(".")
    value = f"images:{bad}" if key == "source.spec" else bad
    path = tmp_path / "c.toml"
    path.write_text(f"[{section}]\n{name} = {json.dumps(value)}\n")
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as e:
        cfgmod.load(path)
    assert "\n" not in str(e.value) and len(str(e.value)) < 600
    with pytest.raises(ConfigError):
        cfgmod.with_overrides(Config(), {key: value})


@pytest.mark.parametrize("key, tiny", [("log.max_mb", 1e-7), ("log.max_mb", 1e-300), ("source.fps", 1e-300),
                                       ("source.fps", 0.001), ("events.snapshot_max_mb", 1e-7),
                                       ("source.hang_timeout_s", 1e-300), ("source.backoff_initial_s", 1e-300),
                                       ("watchdog.status_interval_s", 1e-300), ("preview.record_fps", 1e-300),
                                       ("mqtt.status_interval_s", 1e-300), ("mqtt.reconnect_min_s", 1e-300),
                                       ("web.fps", 1e-300)])
def test_a_value_that_would_round_to_off_or_a_busy_loop_is_refused(key, tiny):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        cfgmod.with_overrides(Config(), {key: tiny})


def test_zero_still_means_off_and_the_smallest_real_values_work():
    cfg = cfgmod.with_overrides(Config(), {"log.max_mb": 0, "source.fps": 0})
    assert cfg.log.max_mb == 0 and cfg.source.fps == 0
    cfg = cfgmod.with_overrides(Config(), {"log.max_mb": 0.001, "source.fps": 0.01})
    assert int(cfg.log.max_mb * 1024 * 1024) > 1000  # the bytes the log rotates at: not 0, "never"
