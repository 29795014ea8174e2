"""End to end: `python -m app` on real photos of people, through the real Detector.

The person-box check needs the TRAINED default model models/person.xnc; it is
skipped (with the reason) until that file exists. The log checks run with a
random-weight model when the trained one is absent. The photos are large, clear
single people from the held-out split of the model (tests/fixtures/person/LICENSE.md):
this checks that the app delivers the model's boxes intact, not model quality
(that is `python -m evaluation`).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "person"
TRAINED = ROOT / "models" / "person.xnc"
TIME_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def run_app(*args):
    env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
    return subprocess.run(
        [sys.executable, "-m", "app", *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def check_frame_line(obj: dict) -> None:
    """The documented schema (version 1) of a frame line."""
    assert set(obj) == {"v", "time", "mono_ms", "seq", "width", "height", "detections", "fps", "latency_ms",
                        "dropped", "detect_ms"}
    assert obj["v"] == 1
    assert TIME_RE.match(obj["time"])
    assert isinstance(obj["mono_ms"], float) and obj["mono_ms"] > 0
    assert isinstance(obj["seq"], int) and obj["seq"] >= 0
    assert isinstance(obj["width"], int) and isinstance(obj["height"], int)
    assert isinstance(obj["fps"], (int, float)) and obj["fps"] >= 0
    assert isinstance(obj["latency_ms"], float) and obj["latency_ms"] >= 0
    assert isinstance(obj["detect_ms"], float) and obj["detect_ms"] >= 0
    assert isinstance(obj["dropped"], int) and obj["dropped"] >= 0
    for d in obj["detections"]:
        assert set(d) == {"label", "score", "box"}
        assert isinstance(d["label"], str) and 0.0 <= d["score"] <= 1.0
        x1, y1, x2, y2 = d["box"]
        assert 0 <= x1 <= x2 <= obj["width"] and 0 <= y1 <= y2 <= obj["height"]
    scores = [d["score"] for d in obj["detections"]]
    assert scores == sorted(scores, reverse=True)


def yolo_boxes(label_file: Path, w: int, h: int) -> list[list[float]]:
    boxes = []
    for line in label_file.read_text().split("\n"):
        if line.strip():
            _, cx, cy, bw, bh = map(float, line.split())
            boxes.append([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h])
    return boxes


def iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    if TRAINED.exists():
        return TRAINED
    from app.modelfile import write_model
    from app.randmodel import random_model

    path = tmp_path_factory.mktemp("e2e") / "random.xnc"
    write_model(path, random_model(seed=0))
    return path


def test_images_run_writes_n_valid_lines(tmp_path, model_path):
    log = tmp_path / "out.jsonl"
    n = 5  # more than the 3 images: --loop plays them again
    r = run_app("--source", f"images:{FIXTURES / 'images'}", "--fps", "0", "--loop", "--model", model_path,
                "--preview", "none", "--log", log, "--max-frames", n)
    assert r.returncode == 0, r.stderr
    objs = [o for o in map(json.loads, log.read_text().splitlines()) if "event" not in o]  # track events aside
    assert len(objs) == n
    for obj in objs:
        check_frame_line(obj)
    assert [o["seq"] for o in objs] == list(range(n))  # fps 0: lossless, nothing dropped
    assert all((o["width"], o["height"]) == (320, 320) for o in objs)


@pytest.mark.skipif(not TRAINED.exists(), reason="needs the trained default model models/person.xnc (not shipped yet)")
def test_trained_model_finds_the_labelled_people(tmp_path):
    log = tmp_path / "out.jsonl"
    images = sorted((FIXTURES / "images").glob("*.jpg"))
    r = run_app("--source", f"images:{FIXTURES / 'images'}", "--fps", "0", "--preview", "none", "--log", log)
    assert r.returncode == 0, r.stderr
    objs = [o for o in map(json.loads, log.read_text().splitlines()) if "event" not in o]
    assert len(objs) == len(images)
    best = {}
    for img, obj in zip(images, objs, strict=True):  # images play in sorted order, seq 0, 1, 2
        check_frame_line(obj)
        truth = yolo_boxes(FIXTURES / "labels" / (img.stem + ".txt"), obj["width"], obj["height"])
        people = [d["box"] for d in obj["detections"] if d["label"] == "person"]
        best[img.name] = max((iou(p, t) for p in people for t in truth), default=0.0)
    hits = [name for name, v in best.items() if v > 0.3]
    assert len(hits) >= 2, f"best IoU per image: {best}"
