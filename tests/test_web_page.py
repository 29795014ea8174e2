"""The web preview as a person sees it: Debian's Chromium (headless) opens the page of a real
``python -m app`` run on 127.0.0.1, with the demo source and with an images: source.

Checked on screenshots and on the page: the stream shows a moving picture (two screenshots of the
stream element differ), the boxes are drawn where the detector put them (pixels of the box colour
inside the boxes the log reports for those moments), the status panel shows a non-zero fps, and an
event's snapshot thumbnail appears. Screenshots go to the test's temporary folder;
XNORCAM_DOCS_SCREENSHOT=1 also writes docs/web-preview.jpg (the README's picture).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.boxcheck import boxes_drawn, recent_boxes
from tests.browser import Chromium, find_chromium

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(find_chromium() is None,
                                reason="chromium is not installed (apt-get install chromium; .ci/run installs it)")


def start_app(tmp_path: Path, *args: str) -> tuple[subprocess.Popen, str, Path]:
    """``python -m app`` with the web preview on a free port; returns it, the page's URL and the log."""
    log = tmp_path / "log.jsonl"
    env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
    proc = subprocess.Popen([sys.executable, "-m", "app", "--preview", "none", "--web", "127.0.0.1:0",
                             "--snapshots", str(tmp_path / "snapshots"), "--log", str(log), *args],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        lines.append(line)
        m = re.search(r"web preview: (http://127\.0\.0\.1:\d+/)", line)
        if m:
            return proc, m.group(1), log
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError("no web preview URL:\n" + "".join(lines))


def stop_app(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    proc.stderr.close()


def decode(png: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)


@pytest.fixture
def photos(tmp_path):
    """A time-lapse folder: each photo of people 8 times in a row, so that their tracks are confirmed."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for k, photo in enumerate(sorted((ROOT / "tests" / "fixtures" / "person" / "images").glob("*.jpg"))):
        for i in range(8):
            shutil.copy(photo, folder / f"{k}-{i:02d}.jpg")
    return folder


@pytest.mark.parametrize("source", ["demo", "images"])
def test_the_page_shows_the_live_boxes_the_status_and_event_thumbnails(tmp_path, photos, source):
    args = ["--source", "demo"] if source == "demo" else ["--source", f"images:{photos}", "--loop", "--fps", "4"]
    proc, url, log = start_app(tmp_path, *args)
    try:
        with Chromium() as browser:
            page = browser.open(url)
            page.wait_for("document.readyState === 'complete'", timeout=60)
            # the stream is showing frames (an <img> of multipart JPEG: naturalWidth once the first came)
            page.wait_for("document.getElementById('stream').naturalWidth > 0", timeout=120)
            fps = page.wait_for("(() => { const v = parseFloat(document.getElementById('fps').textContent);"
                                " return v > 0 ? v : 0; })()", timeout=60)
            assert fps > 0
            rect = page.rect("#stream")
            assert rect["width"] > 200 and rect["height"] > 100
            clip = {"x": rect["x"], "y": rect["y"], "width": rect["width"], "height": rect["height"]}
            first = decode(page.screenshot(clip))
            time.sleep(1.5)
            second = decode(page.screenshot(clip))
            diff = np.abs(first.astype(int) - second.astype(int)).mean()
            if source == "demo":
                assert diff > 2.0, f"the stream did not change: mean difference {diff:.2f}"
            else:  # stills: the picture changes when the next photo comes (every 2 s)
                assert not np.array_equal(first, second), "the stream did not change"
            # boxes in the box colour where the log says the detector found people at those moments
            # (the demo has moments without people: look again for a while)
            for _ in range(40):
                shot, t_shot = decode(page.screenshot(clip)), time.monotonic()
                if boxes_drawn(shot, recent_boxes(log, t_shot)):
                    break
                time.sleep(0.5)
            else:
                cv2.imwrite(str(tmp_path / "no-boxes.png"), shot)
                raise AssertionError(f"no box of the box colour inside a reported box on the stream ({tmp_path})")
            # an event thumbnail appears (the enter snapshot of a confirmed track) and has loaded
            page.wait_for("[...document.querySelectorAll('#events img.thumb')]"
                          ".some(i => i.complete && i.naturalWidth > 0)", timeout=150)
            status_text = page.eval("document.getElementById('status').innerText")
            whole = page.screenshot()
            (tmp_path / f"page-{source}.png").write_bytes(whole)
            if source == "demo" and os.environ.get("XNORCAM_DOCS_SCREENSHOT") == "1":
                cv2.imwrite(str(ROOT / "docs" / "web-preview.jpg"), decode(whole), [cv2.IMWRITE_JPEG_QUALITY, 88])
            assert "fps" in status_text and "model" in status_text
    finally:
        stop_app(proc)
