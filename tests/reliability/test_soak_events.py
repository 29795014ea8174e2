"""The events soak in short (benchmarks/soak_events.py): 3000 frames of people appearing and vanishing, crowds
beyond the track table, false boxes; tables, memory and the snapshot folder stay bounded."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.reliability.support import ROOT

SOAK = ROOT / "benchmarks" / "soak_events.py"


def soak(*args):
    r = subprocess.run([sys.executable, str(SOAK), *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    lines = r.stdout.strip().splitlines()
    assert lines and lines[-1].startswith("{"), f"no figures (rc {r.returncode}): {r.stderr[-3000:]}"
    return r, json.loads(lines[-1])


def test_short_events_soak_stays_bounded():
    r, f = soak("--frames", 3000, "--warmup-frames", 1000, "--snapshot-files", 10, "--snapshot-mb", 0.5)
    assert r.returncode == 0 and f["ok"], (f, r.stderr[-2000:])
    assert f["scene"]["crowds"] >= 1 and f["refused_boxes"] > 0  # the table was full at least once
    assert f["max_track_table"] == f["max_tracks"] and f["max_kept_frames"] <= f["max_tracks"]
    assert f["events"]["enter"] == f["events"]["leave"] > 50 and f["events"]["cross"] > 0 and f["events"]["update"] > 0
    assert f["snapshots_written"] == 2 * f["events"]["enter"] and f["snapshots_deleted"] > 0
    assert f["snapshot_files_max"] <= 10 and f["snapshot_mb_max"] <= 0.5
    assert f["rss_growth_mb"] <= 5.0 and f["log_rotations"] > 0


def test_the_soak_reports_a_broken_limit():
    r, f = soak("--frames", 300, "--warmup-frames", 100, "--rss-limit-mb", -1)
    assert r.returncode == 1 and not f["ok"] and "RSS grew" in f["failures"][0] and "FAIL" in r.stderr
