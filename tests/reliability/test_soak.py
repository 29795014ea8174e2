"""The soak benchmark in short: 1500 unthrottled demo frames through the whole pipeline, same invariants as
``make soak`` (RSS growth <= 5 MB after warm-up, constant threads, captured == logged + dropped, rotated log
files adding up exactly). Plus the lossless image-folder variant and the soak's own log checker."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from tests.reliability.support import ROOT

SOAK = ROOT / "benchmarks" / "soak.py"
FIXTURE_IMAGES = ROOT / "tests" / "fixtures" / "person" / "images"


def soak(*args, timeout=240):
    r = subprocess.run([sys.executable, str(SOAK), *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                       timeout=timeout)
    lines = r.stdout.strip().splitlines()
    assert lines and lines[-1].startswith("{"), f"soak printed no figures (rc {r.returncode}): {r.stderr[-3000:]}"
    return r, json.loads(lines[-1])


@pytest.fixture(scope="module")
def soak_module():
    spec = importlib.util.spec_from_file_location("soak", SOAK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_short_soak_on_the_demo(model_path):
    r, f = soak("--frames", 1500, "--warmup-frames", 300, "--model", model_path)
    assert r.returncode == 0 and f["ok"], (f, r.stderr[-2000:])
    for key in ("frames", "seconds", "fps", "rss_start_mb", "rss_end_mb", "rss_growth_mb", "threads_start",
                "threads_end", "captured", "logged", "dropped", "log_lines_on_disk", "rotated_files", "ok"):
        assert key in f
    assert f["frames"] == f["logged"] == 1500 and f["stopped_by"] == "max frames"
    assert f["captured"] == f["logged"] + f["dropped"]
    assert f["dropped"] > 0  # an unthrottled source outruns detection: the slot must drop, and count it
    assert f["rss_growth_mb"] <= 5.0 and f["threads_start"] == f["threads_end"] > 1
    assert f["log_lines_on_disk"] == f["log_lines_written"] and f["log_failures"] == 0
    assert f["rotated_files"] >= 5


def test_short_soak_on_images_is_lossless(model_path):
    r, f = soak("--frames", 120, "--warmup-frames", 40, "--source", f"images:{FIXTURE_IMAGES}", "--model", model_path,
                "--log-max-kb", 4)
    assert r.returncode == 0 and f["ok"], (f, r.stderr[-2000:])
    # Nothing dropped while running; at shutdown the frame in the slot and the one the reader was handing over
    # are counted as dropped (captured, never processed).
    assert f["dropped"] <= 2 and f["captured"] == f["logged"] + f["dropped"]
    assert f["rotated_files"] >= 3


def test_short_soak_with_reconnect_churn(model_path):
    """A camera failing every 40 reads: dozens of reopens leak no memory or threads and lose no frame."""
    r, f = soak("--frames", 1500, "--warmup-frames", 300, "--model", model_path, "--fault-every", 40)
    assert r.returncode == 0 and f["ok"], (f, r.stderr[-2000:])
    # Each reopened source fails on its 40th read, so 39 good reads per error: how many errors there were
    # follows from how many frames were captured, whatever the machine's speed. 1500 frames need >= 37.
    assert f["source_errors"] >= max(37, (f["captured"] - 38) // 39)
    # Every error is followed by a reopen, except one the stop lands on during its backoff wait
    # (CaptureThread._supervise breaks out there): reopens is errors or errors - 1, never fewer.
    assert f["source_errors"] - 1 <= f["reopens"] <= f["source_errors"]
    assert f["event_lines"] >= f["source_errors"] and f["log_lines_on_disk"] == f["logged"] + f["event_lines"]
    assert f["captured"] == f["logged"] + f["dropped"] and f["rss_growth_mb"] <= 5.0


def test_soak_fails_when_a_check_fails(model_path):
    r, f = soak("--frames", 60, "--warmup-frames", 20, "--model", model_path, "--rss-limit-mb", "-1")
    assert r.returncode == 1 and not f["ok"]
    assert any("RSS grew" in x for x in f["failures"])


def test_log_checker_finds_every_kind_of_damage(soak_module, tmp_path):
    path = tmp_path / "log.jsonl"
    good = [json.dumps({"v": 1, "seq": s}) + "\n" for s in range(6)]
    (tmp_path / "log.jsonl.2").write_text("".join(good[:2]))
    (tmp_path / "log.jsonl.1").write_text("".join(good[2:4]))
    path.write_text("".join(good[4:]) + json.dumps({"v": 1, "event": "source_error"}) + "\n")
    ok = soak_module.check_logs(path, max_bytes=1000)
    assert ok == {"files": 3, "frame_lines": 6, "event_lines": 1, "problems": []}
    (tmp_path / "log.jsonl.1").write_text(good[3] + good[2])  # out of order
    assert "seq 2 after 3" in " ".join(soak_module.check_logs(path)["problems"])
    (tmp_path / "log.jsonl.1").write_text(good[2] + '{"v":1,"se\n' + good[3])  # a torn line inside
    assert "not JSON" in " ".join(soak_module.check_logs(path)["problems"])
    (tmp_path / "log.jsonl.1").write_text("".join(good[2:4]))
    path.write_text("".join(good[4:]) + '{"v":1,"seq":9')  # unterminated
    assert "not terminated" in " ".join(soak_module.check_logs(path)["problems"])
    path.write_text("".join(good[4:]))
    assert "rotation size" in " ".join(soak_module.check_logs(path, max_bytes=10)["problems"])
