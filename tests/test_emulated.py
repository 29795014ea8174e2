"""make test-emulated (tests/emulated/arm64.sh): its frame check, its shell, and the run itself when asked for.

The run debootstraps an arm64 Debian, installs xnorcam in it with deploy/install.sh and
runs the app under the aarch64 emulator: root, debootstrap and the network, about 15
minutes with a warm cache. So make test leaves it out; XNORCAM_EMULATED=1 with the
cached root present runs it here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "emulated" / "arm64.sh"
CHECK = ROOT / "tests" / "emulated" / "check_frames.py"
CACHE = Path(os.environ.get("XNORCAM_EMULATED_CACHE", ROOT / ".emulated"))


def frame(seq: int, boxes: list[list[float]], score: float = 0.8) -> dict:
    return {"v": 1, "seq": seq, "width": 320, "height": 240,
            "detections": [{"label": "person", "score": score, "box": list(b)} for b in boxes]}


def write(path: Path, lines: list[dict]) -> str:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return str(path)


def check(arm: str, host: str, images: int, frames: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CHECK), arm, host, str(images), str(frames)], capture_output=True,
                          text=True, timeout=60)


BOXES = {0: [[10.0, 20.0, 60.0, 200.0]], 1: [[100.0, 30.0, 150.0, 220.0], [200.0, 10.0, 250.0, 230.0]]}


def test_frame_check_accepts_the_same_people_and_refuses_others(tmp_path):
    host = write(tmp_path / "host.jsonl", [frame(s, BOXES[s % 2]) for s in range(4)])
    # arm64: every frame of a loop over the two images, with a frame dropped (seq 3) and a box moved by a pixel.
    arm_frames = [frame(s, BOXES[s % 2]) for s in (0, 1, 2, 4, 5)]
    arm_frames[2]["detections"][0]["box"][0] += 1.0
    ok = check(write(tmp_path / "arm.jsonl", arm_frames), host, 2, 5)
    assert ok.returncode == 0, ok.stderr
    assert "5 compared" in ok.stdout and "7 people" in ok.stdout

    moved = [frame(s, BOXES[s % 2]) for s in range(5)]
    moved[3]["detections"][1]["box"][2] += 12.0
    bad = check(write(tmp_path / "moved.jsonl", moved), host, 2, 5)
    assert bad.returncode == 1 and "seq 3" in bad.stderr

    missing = [frame(s, BOXES[s % 2]) for s in range(5)]
    missing[4]["detections"] = []
    bad = check(write(tmp_path / "missing.jsonl", missing), host, 2, 5)
    assert bad.returncode == 1 and "0 detections on arm64, 1 here" in bad.stderr

    short = check(write(tmp_path / "short.jsonl", moved[:3]), host, 2, 5)
    assert short.returncode == 1 and "3 frame lines, expected 5" in short.stderr

    nobody = write(tmp_path / "nobody.jsonl", [frame(s, []) for s in range(4)])
    empty = check(write(tmp_path / "empty.jsonl", [frame(s, []) for s in range(5)]), nobody, 2, 5)
    assert empty.returncode == 1 and "nothing compared" in empty.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed (.ci/run installs it)")
def test_script_is_shellcheck_clean():
    r = subprocess.run(["shellcheck", "--severity=style", str(SCRIPT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_script_refuses_an_unknown_release():
    r = subprocess.run(["bash", str(SCRIPT), "buster"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "usage" in r.stderr


def _why_not_run() -> str | None:
    if os.environ.get("XNORCAM_EMULATED") != "1":
        return "the emulated arm64 run takes 5 minutes from its cache, 9-29 without: make test-emulated, or XNORCAM_EMULATED=1"
    if not (CACHE / "bookworm-base" / ".xnorcam-base-ok").exists():
        return f"no cached bookworm root in {CACHE} (make test-emulated builds it)"
    if os.geteuid() != 0:
        return "needs root (chroot, binfmt_misc)"
    if shutil.which("debootstrap") is None or shutil.which("chroot") is None:
        return "debootstrap or chroot is missing"
    return None


@pytest.mark.slow
@pytest.mark.skipif(_why_not_run() is not None, reason=_why_not_run() or "")
def test_the_whole_stack_on_emulated_arm64_bookworm():
    r = subprocess.run(["bash", str(SCRIPT), "bookworm"], capture_output=True, text=True, timeout=3600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "bookworm arm64: passed" in r.stdout
