"""What tests/reliability/probe.py found, as tests: OpenCV crashing (SIGSEGV) on file names that are not UTF-8,
FFmpeg blocking for good on a FIFO given as a video source. Each runs where a crash cannot take pytest down."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from app.config import ConfigError
from app.sources import opencv_name_problem, preflight
from tests.reliability.support import ROOT, child_env, run_app

DEMO = sorted((ROOT / "app" / "assets" / "demo").glob("*.jpg"))[0]
LATIN1 = [b"caf\xe9", b"\xff\xfe", b"na\xefve\x80"]


def in_child(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=child_env(),
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("stem", LATIN1)
@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_an_image_named_in_latin1_plays(tmp_path, stem, suffix):
    import cv2

    name = os.fsdecode(bytes(tmp_path) + b"/" + stem + suffix.encode())
    ok, buf = cv2.imencode(suffix, cv2.imread(str(DEMO)))
    with open(name, "wb") as f:
        f.write(buf.tobytes())
    r = in_child(f"""
        from app.sources import load_image
        import os
        image, why = load_image(os.fsdecode({os.fsencode(name)!r}))
        assert image is not None and image.ndim == 3, why
        print("decoded", image.shape)
    """)
    assert r.returncode == 0 and "decoded" in r.stdout, (r.returncode, r.stderr[-500:])


def test_the_app_plays_an_images_folder_of_latin1_names(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for stem in LATIN1:
        with open(bytes(folder) + b"/" + stem + b".jpg", "wb") as f:
            f.write(DEMO.read_bytes())
    log = tmp_path / "log.jsonl"
    r = run_app("--source", f"images:{folder}", "--fps", "0", "--preview", "none", "--log", log)
    assert r.returncode == 0, (r.returncode, r.stderr[-500:])
    assert len([x for x in log.read_text().splitlines() if '"event"' not in x]) == len(LATIN1)


@pytest.mark.parametrize("what", ["video source", "recording"])
def test_a_latin1_video_name_is_refused_not_a_crash(tmp_path, what):
    name = os.fsdecode(bytes(tmp_path) + b"/caf\xe9.mp4")
    assert opencv_name_problem(name) and opencv_name_problem(str(tmp_path / "cafe.mp4")) is None
    if what == "video source":
        with open(name, "wb") as f:
            f.write(b"\x00" * 64)
        r = run_app("--source", f"opencv:{name}", "--preview", "none", "--max-frames", 1)
        code = 78
    else:
        r = run_app("--source", "demo", "--preview", "none", "--record", name, "--max-frames", 1)
        code = 2
    assert r.returncode == code, (r.returncode, r.stderr[-500:])
    assert len(r.stderr.strip().splitlines()) == 1 and "not UTF-8" in r.stderr


def test_a_contact_sheet_of_latin1_names_is_drawn_and_written(tmp_path):
    image = os.fsdecode(bytes(tmp_path) + b"/caf\xe9.jpg")
    with open(image, "wb") as f:
        f.write(DEMO.read_bytes())
    out = os.fsdecode(bytes(tmp_path) + b"/sheet\xe9.png")
    r = in_child(f"""
        import os
        import numpy as np
        from pathlib import Path
        from evaluation.score import Scored
        from evaluation.sheet import draw_sheet
        import cv2
        image = Path(os.fsdecode({os.fsencode(image)!r}))
        h, w = cv2.imread({str(DEMO)!r}).shape[:2]
        s = Scored(image, np.zeros((0, 4), np.float32), np.zeros((0,), np.int64), np.zeros((0, 6), np.float32), (h, w))
        assert draw_sheet([s], 0.5, os.fsdecode({os.fsencode(out)!r})) == 1
    """)
    assert r.returncode == 0, (r.returncode, r.stderr[-500:])
    with open(os.fsencode(out), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("kind", ["fifo", "dir", "socket"])
def test_a_video_source_that_is_not_a_file_is_refused_at_start(tmp_path, kind):
    import socket

    target = tmp_path / "v.mp4"
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "dir":
        target.mkdir()
    else:
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(target))
        s.close()
    with pytest.raises(ConfigError, match="a video source is a file, a camera device or a URL"):
        preflight(f"opencv:{target}")


def test_the_app_refuses_a_fifo_video_source_within_seconds(tmp_path):
    fifo = tmp_path / "v.mp4"
    os.mkfifo(fifo)
    r = run_app("--source", f"opencv:{fifo}", "--preview", "none", "--max-frames", 1, timeout=30)
    assert r.returncode == 78 and "is a FIFO" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_a_character_device_stays_a_valid_video_source():
    """/dev/video0 is how a webcam is named: devices are not refused by the FIFO rule."""
    preflight("opencv:/dev/null")  # a character device: passes the start checks (OpenCV then says what it can)


@pytest.mark.parametrize("name", ["per\udce9son", "per\nson", "a\x00b", "tab\there", "del\x7f"])
def test_a_model_whose_class_name_would_crash_the_overlay_or_split_a_line_is_refused(tmp_path, name):
    """JSON allows a lone surrogate (\\udce9), which cv2.putText crashes on (SIGSEGV) when the label is drawn;
    control characters would reach journal lines. Exit 65, one line."""
    from tests.reliability import modelbytes

    raw = (ROOT / "models" / "person.xnc").read_bytes()
    magic, version, header, data = modelbytes.split(raw)
    header["class_names"] = [name]
    model = tmp_path / "m.xnc"
    model.write_bytes(modelbytes.build(header, data, version=version, magic=magic))
    r = run_app("--model", model, "--source", "demo", "--fps", "0", "--preview", "none", "--max-frames", 3,
                "--record", tmp_path / "r.mp4")
    assert r.returncode == 65 and len(r.stderr.strip().splitlines()) == 1, (r.returncode, r.stderr[-400:])
    assert "class name" in r.stderr


def _dataset(tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(ROOT / "tests" / "fixtures" / "person", data)
    return data


def _evaluate(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "evaluation", *map(str, args)], cwd=ROOT, env=child_env(),
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("which", ["data.yaml", "a label"])
def test_evaluation_refuses_a_fifo_for_data_instead_of_blocking(tmp_path, which):
    data = _dataset(tmp_path)
    target = data / "data.yaml" if which == "data.yaml" else sorted((data / "labels").glob("*.txt"))[0]
    target.unlink(missing_ok=True)
    os.mkfifo(target)
    r = _evaluate("--data", data, timeout=60)
    assert r.returncode == 65 and "not a regular file" in r.stderr, (r.returncode, r.stderr[-400:])


def test_evaluation_skips_an_image_that_is_a_fifo(tmp_path):
    data = _dataset(tmp_path)
    img = sorted((data / "images").iterdir())[0]
    (data / "labels" / (img.stem + ".txt")).unlink(missing_ok=True)
    img.unlink()
    os.mkfifo(img)
    r = _evaluate("--data", data, timeout=120)
    assert r.returncode == 0, (r.returncode, r.stderr[-400:])


def test_evaluation_refuses_an_image_with_absurdly_many_boxes(tmp_path):
    from evaluation.datasets import MAX_BOXES_PER_IMAGE

    data = _dataset(tmp_path)
    label = sorted((data / "labels").glob("*.txt"))[0]
    label.write_text("0 0.5 0.5 0.1 0.1\n" * (MAX_BOXES_PER_IMAGE + 1))
    r = _evaluate("--data", data, timeout=120)
    assert r.returncode == 65 and f"at most {MAX_BOXES_PER_IMAGE}" in r.stderr, (r.returncode, r.stderr[-400:])
