"""A newcomer's first command, `make run`, as they would see it.

On a desktop (a real X server, Xvfb, with no window manager) whose OpenCV is the headless wheel the
project installs: the command `make run` runs opens the web preview in the desktop's browser (a real
Chromium window, named by $BROWSER as a desktop would name its own), and the screen shows the demo
with its boxes drawn where the detector found people. On a machine without a display, the first
lines it prints say where the picture is. A preview that cannot work is one line naming the fix.

Screenshots go to the test's temporary folder; XNORCAM_DOCS_SCREENSHOT=1 also writes
docs/desktop-preview.jpg (the README's picture).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.boxcheck import boxes_drawn, recent_boxes
from tests.browser import FLAGS, Page, find_chromium

ROOT = Path(__file__).resolve().parents[1]
SIZE = (1024, 640)


def make_run_command(log: Path) -> list[str]:
    """The python command `make run` runs (from `make -n`), on a free port and logging frame lines to ``log``."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    out = subprocess.run(["make", "-n", "run", "WEB=127.0.0.1:0"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    lines = [line for line in out.splitlines() if " -m app " in line]
    assert len(lines) == 1, out
    cmd = shlex.split(lines[0])
    assert "--web" in cmd and cmd[cmd.index("--web") + 1] == "127.0.0.1:0"
    assert cmd[cmd.index("--preview") + 1] == "auto"
    cmd[0] = sys.executable  # the same interpreter as .venv/bin/python when run by make test
    # the boxes are checked against the frame lines: log them to a file, not only the events to stdout
    i = cmd.index("--log")
    del cmd[i:i + 2]
    cmd = [c for c in cmd if c != "--only-events"]
    return [*cmd, "--log", str(log)]


def test_make_run_serves_the_picture_and_says_where_it_is_first(tmp_path):
    cmd = make_run_command(tmp_path / "log.jsonl")
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "DISPLAY", "WAYLAND_DISPLAY")}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        while not any("web preview: http://" in line for line in lines):
            line = proc.stdout.readline()
            assert line, "".join(lines)
            lines.append(line)
        assert len(lines) <= 3, "".join(lines)  # among the first lines
        url = re.search(r"(http://127\.0\.0\.1:\d+/)", lines[-1]).group(1)
        assert "ssh -L" in lines[-1]  # and how to reach it from another machine
        while "xnorcam.sinks: preview:" not in lines[-1]:
            lines.append(proc.stdout.readline())
            assert lines[-1], "".join(lines)
        assert "preview: none (no display" in lines[-1] and "the picture is on the web preview" in lines[-1]
        import urllib.request

        with urllib.request.urlopen(url + "status", timeout=10) as r:
            assert r.status == 200
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        proc.stdout.close()


def test_preview_window_with_headless_opencv_is_one_line_naming_the_fix(tmp_path):
    from app.sinks import cv2_has_gui

    if cv2_has_gui():
        pytest.skip("this OpenCV has GUI support")
    env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
    r = subprocess.run([sys.executable, "-m", "app", "--source", "demo", "--preview", "window"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "opencv-python-headless" in r.stderr and "--web 127.0.0.1:8080" in r.stderr
    conf = tmp_path / "config.toml"
    conf.write_text('[preview]\nmode = "window"\n')
    r = subprocess.run([sys.executable, "-m", "app", "--config", str(conf), "--source", "demo"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 78 and "preview 'window'" in r.stderr and len(r.stderr.strip().splitlines()) == 1


# --- the desktop, under Xvfb ------------------------------------------------------------


def read_xwd(path: Path) -> np.ndarray:
    """Xvfb's framebuffer (-fbdir): an XWD image, 24-bit depth in 32-bit pixels, as BGR."""
    data = path.read_bytes()
    for order in (">", "<"):
        header = struct.unpack(order + "25I", data[:100])
        if header[1] == 7:  # XWD file version
            break
    else:
        raise AssertionError("not an XWD file")
    header_size, width, height = header[0], header[4], header[5]
    byte_order, bpp, bytes_per_line, ncolors = header[7], header[11], header[12], header[19]
    assert bpp == 32, bpp
    offset = header_size + ncolors * 12
    px = np.frombuffer(data, np.uint8, count=bytes_per_line * height, offset=offset)
    px = px.reshape(height, bytes_per_line)[:, :width * 4].reshape(height, width, 4)
    return np.ascontiguousarray(px[:, :, :3] if byte_order == 0 else px[:, :, [3, 2, 1]])


@pytest.fixture
def xvfb(tmp_path):
    if shutil.which("Xvfb") is None:
        pytest.skip("Xvfb is not installed (apt-get install xvfb; .ci/run installs it)")
    fbdir = tmp_path / "fb"
    fbdir.mkdir()
    r, w = os.pipe()
    proc = subprocess.Popen(["Xvfb", "-displayfd", str(w), "-screen", "0", f"{SIZE[0]}x{SIZE[1]}x24",
                             "-fbdir", str(fbdir), "-nolisten", "tcp", "-noreset"], pass_fds=(w,),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(w)
    with os.fdopen(r) as fh:
        display = fh.readline().strip()
    assert display.isdigit(), "Xvfb did not start"
    yield f":{display}", fbdir / "Xvfb_screen0"
    proc.terminate()
    proc.wait(timeout=10)


@pytest.mark.skipif(find_chromium() is None, reason="chromium is not installed (apt-get install chromium)")
def test_make_run_on_a_desktop_shows_the_demo_with_its_boxes(tmp_path, xvfb):
    from app.sinks import cv2_has_gui

    if cv2_has_gui():
        pytest.skip("this OpenCV has GUI support: make run opens an OpenCV window instead")
    display, framebuffer = xvfb
    profile = tmp_path / "profile"
    # The desktop's browser, as $BROWSER names it: a Chromium window of the screen's size at its top left.
    browser = tmp_path / "browser.sh"
    pid_file = tmp_path / "browser.pid"
    browser.write_text(f"#!/bin/sh\necho $$ > {shlex.quote(str(pid_file))}\nexec " + shlex.join([find_chromium(), *FLAGS, f"--user-data-dir={profile}",
                                                         "--remote-debugging-port=0", "--window-position=0,0",
                                                         "--test-type",  # no infobar about --no-sandbox
                                                         f"--window-size={SIZE[0]},{SIZE[1]}"])
                       + ' --app="$1" >/dev/null 2>&1\n')
    browser.chmod(0o755)
    log = tmp_path / "log.jsonl"
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WAYLAND_DISPLAY")}
    env.update(DISPLAY=display, BROWSER=str(browser))
    proc = subprocess.Popen(make_run_command(log), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    page = None
    try:
        lines = []
        while not lines or "xnorcam.sinks: preview:" not in lines[-1]:
            line = proc.stderr.readline()
            assert line, "".join(lines)
            lines.append(line)
        assert "preview: browser" in lines[-1] and "opencv-python-headless" in lines[-1]
        # the browser opened by the app: find its DevTools port, then its page
        marker = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 120
        while not (marker.exists() and marker.read_text().split("\n")[0].strip().isdigit()):
            assert time.monotonic() < deadline, "the app opened no browser"
            time.sleep(0.2)
        port = int(marker.read_text().split("\n")[0])
        import json
        import urllib.request

        while True:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
                pages = [t for t in json.loads(r.read()) if t.get("type") == "page" and "127.0.0.1" in t["url"]]
            if pages:
                break
            assert time.monotonic() < deadline, "the browser shows no page of the app"
            time.sleep(0.2)
        page = Page(pages[0]["webSocketDebuggerUrl"])
        page.wait_for("document.getElementById('stream') && document.getElementById('stream').naturalWidth > 0",
                      timeout=300)
        rect = page.rect("#stream")
        # where the page's viewport is on the screen: the window's place plus its own bars above the page
        left, top = page.eval("[window.screenX + window.outerWidth - window.innerWidth,"
                              " window.screenY + window.outerHeight - window.innerHeight]")
        x0, y0 = round(left + rect["x"]), round(top + rect["y"])
        x1, y1 = round(x0 + rect["width"]), round(y0 + rect["height"])
        assert 0 <= x0 < x1 <= SIZE[0] and 0 <= y0 < y1 <= SIZE[1], (x0, y0, x1, y1)
        for _ in range(60):
            screen, t = read_xwd(framebuffer), time.monotonic()
            if boxes_drawn(screen[y0:y1, x0:x1], recent_boxes(log, t)):
                break
            time.sleep(0.5)
        else:
            cv2.imwrite(str(tmp_path / "no-boxes.png"), screen)
            raise AssertionError(f"no boxes on the screen where the stream is ({tmp_path / 'no-boxes.png'})")
        cv2.imwrite(str(tmp_path / "desktop.png"), screen)
        if os.environ.get("XNORCAM_DOCS_SCREENSHOT") == "1":
            cv2.imwrite(str(ROOT / "docs" / "desktop-preview.jpg"), screen, [cv2.IMWRITE_JPEG_QUALITY, 88])
    finally:
        if page is not None:
            page.close()
        proc.terminate()
        proc.wait(timeout=20)
        proc.stderr.close()
        if pid_file.exists():  # the browser the app opened (the shell it ran exec'd into Chromium)
            try:
                os.kill(int(pid_file.read_text()), 15)
            except (ProcessLookupError, ValueError):
                pass
