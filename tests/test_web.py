"""The web preview's protocol (app/web.py): raw sockets and urllib against the real server on 127.0.0.1.

In process: a WebPreview fed synthetic frames by a thread, as the pipeline feeds it.
Through ``python -m app``: the config refusals (exit 78) and SIGTERM with viewers connected.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest

from app import web as webmod
from app.config import ConfigError, WebConfig, from_dict
from app.sources import Frame
from app.web import BOUNDARY, EventTee, WebPreview, read_secret

ROOT = Path(__file__).resolve().parents[1]
SECRET = "correct-horse-battery-staple"
BOX = np.array([[40, 30, 140, 200, 0.9, 0]], np.float32)


def frame(i: int, shape=(240, 320)) -> Frame:
    px = np.full(shape, (i * 7) % 200 + 20, np.uint8)
    px[(i * 3) % shape[0], :] = 255  # a moving line: every frame differs
    return Frame(px, i, time.monotonic())


class Feeder:
    """Calls web.show() like the pipeline does, ``fps`` times a second, until stopped; counts the calls."""

    def __init__(self, web: WebPreview, fps: float = 30.0) -> None:
        self.web, self.period, self.shown = web, 1.0 / fps, 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stop.is_set():
            self.web.show(frame(self.shown), None, BOX, None, None)
            self.shown += 1
            self.stop.wait(self.period)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)


def start(tmp_path=None, **cfg) -> tuple[WebPreview, Feeder]:
    web = WebPreview(WebConfig(enabled=True, listen="127.0.0.1:0", **cfg), ["person"],
                     secret=SECRET if cfg.get("auth", "none") != "none" else "",
                     snapshot_dir=str(tmp_path) if tmp_path else "",
                     status=lambda: {"fps": 12.5, "detect_ms": 80.0, "dropped": 3})
    web.start()
    return web, Feeder(web)


@pytest.fixture
def served(tmp_path):
    running = []

    def make(**cfg):
        web, feeder = start(tmp_path, **cfg)
        running.append((web, feeder))
        return web

    yield make
    for web, feeder in running:
        feeder.close()
        web.close()


def url(web: WebPreview, path: str) -> str:
    host, port = web.address
    return f"http://{host}:{port}{path}"


def get(web: WebPreview, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url(web, path), headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def raw(web: WebPreview, data: bytes, timeout: float = 10.0) -> bytes:
    """Send ``data`` as is; everything the server answers until it closes."""
    with socket.create_connection(web.address, timeout=timeout) as s:
        try:
            s.sendall(data)
        except OSError:
            pass  # the server may close before taking all of an oversized request
        out = b""
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            out += chunk
    return out


class StreamReader:
    """One viewer of /stream.mjpg over a raw socket, parsing the multipart parts as a browser would."""

    def __init__(self, web: WebPreview, headers: str = "") -> None:
        self.sock = socket.create_connection(web.address, timeout=10)
        self.sock.sendall(f"GET /stream.mjpg HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode())
        self.buf = b""
        self.frames: list[bytes] = []
        self.head = self._until(b"\r\n\r\n")

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("stream closed")
        self.buf += chunk

    def _until(self, marker: bytes) -> bytes:
        while marker not in self.buf:
            self._fill()
        out, self.buf = self.buf.split(marker, 1)
        return out

    def part(self) -> bytes:
        boundary = self._until(b"\r\n")
        assert boundary == b"--" + BOUNDARY.encode(), boundary
        headers = dict(line.split(b": ", 1) for line in self._until(b"\r\n\r\n").split(b"\r\n"))
        assert headers[b"Content-Type"] == b"image/jpeg"
        n = int(headers[b"Content-Length"])
        while len(self.buf) < n + 2:
            self._fill()
        jpeg, self.buf = self.buf[:n], self.buf[n:]
        assert self.buf[:2] == b"\r\n"
        self.buf = self.buf[2:]
        self.frames.append(jpeg)
        return jpeg

    def close(self) -> None:
        self.sock.close()


def wait_until(cond, timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or cond}")
        time.sleep(0.02)


# --- the stream ------------------------------------------------------------------------


def test_mjpeg_parts_parse_and_decode_to_annotated_frames(served):
    web = served(fps=20.0, width=160)
    viewer = StreamReader(web)
    assert viewer.head.startswith(b"HTTP/1.0 200")
    assert f"Content-Type: multipart/x-mixed-replace; boundary={BOUNDARY}".encode() in viewer.head
    images = [cv2.imdecode(np.frombuffer(viewer.part(), np.uint8), cv2.IMREAD_COLOR) for _ in range(5)]
    viewer.close()
    for img in images:
        assert img is not None and img.shape == (120, 160, 3)  # scaled down to web.width, aspect kept
    # the box is drawn: its left edge (class colour 0, green) near x = 40/2, rows 15..100; grey inside it
    from app.overlay import class_colour

    assert class_colour(0)[1] == 255 and max(class_colour(0)[0], class_colour(0)[2]) < 60
    img = images[-1].astype(int)
    greenness = img[:, :, 1] - np.maximum(img[:, :, 0], img[:, :, 2])
    assert (greenness[20:95, 17:24].max(axis=1) > 50).mean() > 0.9
    assert greenness[20:95, 40:60].max() < 30
    assert len({bytes(i.tobytes()) for i in images}) > 1  # a moving picture


def test_encodes_only_while_someone_watches_and_at_most_fps(served):
    web = served(fps=5.0)
    time.sleep(0.8)
    assert web.frames_offered > 10 and web.encoded == 0  # frames shown, nobody watching: no JPEG at all
    viewer = StreamReader(web)
    t0 = time.monotonic()
    for _ in range(4):
        viewer.part()
    elapsed = time.monotonic() - t0
    viewer.close()
    wait_until(lambda: web.viewers == 0, what="the viewer to leave")
    encoded = web.encoded
    assert encoded <= 5.0 * elapsed + 3  # the rate cap, not the feeder's 30 a second
    time.sleep(0.8)
    assert web.encoded <= encoded + 1  # stops again once nobody watches


def test_ten_viewers_one_never_reads_frames_continue_and_drops_are_counted(served, monkeypatch):
    monkeypatch.setattr(webmod, "WRITE_TIMEOUT_S", 2.0)
    web = served(fps=25.0, max_clients=10, quality=95, width=320)
    stuck = socket.socket()
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.connect(web.address)
    stuck.sendall(b"GET /stream.mjpg HTTP/1.1\r\nHost: x\r\n\r\n")  # and never reads a byte
    viewers = [StreamReader(web) for _ in range(9)]
    wait_until(lambda: web.viewers == 10, what="ten viewers")
    stop = threading.Event()

    def read(v: StreamReader) -> None:
        try:
            while not stop.is_set():
                v.part()
        except OSError:
            assert stop.is_set()  # only closing ends a reader

    threads = [threading.Thread(target=read, args=(v,), daemon=True) for v in viewers]
    for t in threads:
        t.start()
    wait_until(lambda: min(len(v.frames) for v in viewers) >= 10, timeout=20, what="10 frames for every reader")
    # the stuck viewer's send blocks, times out (WRITE_TIMEOUT_S) and it is dropped; the others go on
    wait_until(lambda: web.viewers == 9, timeout=20, what="the stuck viewer to be dropped")
    seen = [len(v.frames) for v in viewers]
    wait_until(lambda: all(len(v.frames) > n + 5 for v, n in zip(viewers, seen, strict=True)), timeout=20,
               what="frames to continue for every reader after the drop")
    status = json.loads(get(web, "/status")[2])
    assert status["web"]["dropped_frames"] > 0 and status["web"]["dropped_frames"] == web.dropped_frames
    stop.set()
    for v in viewers:
        v.close()
    stuck.close()


def test_detection_never_waits_on_a_viewer_that_never_reads(monkeypatch):
    """A real Pipeline with a lossless source: every frame is detected while a viewer sits in a blocked send."""
    from app.capture import Capture
    from app.pipeline import Pipeline
    from tests.fakes.fake_detector import FakeDetector
    from tests.fakes.fake_source import FakeSource

    monkeypatch.setattr(webmod, "WRITE_TIMEOUT_S", 600.0)  # the stuck viewer stays stuck for the whole run
    web = WebPreview(WebConfig(enabled=True, listen="127.0.0.1:0", fps=30.0, quality=100), ["person"])
    web.start()
    try:
        stuck = socket.socket()
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.connect(web.address)
        stuck.sendall(b"GET /stream.mjpg HTTP/1.1\r\n\r\n")
        noise = np.random.default_rng(0).integers(0, 255, (240, 320), np.uint8)  # JPEG-hostile: big frames

        class Noisy(FakeSource):
            def read(self):
                px = super().read()
                return None if px is None else np.roll(noise, self.n, axis=1)

        cap = Capture(lambda: Noisy(period=0.0, limit=400, shape=(240, 320)), lossless=True)
        pipeline = Pipeline(cap, FakeDetector(BOX), web=web)
        wait_until(lambda: web.viewers == 1, what="the stuck viewer")
        cap.start()
        stats = pipeline.run(threading.Event())
        cap.stop()
        assert stats.processed == 400 and stats.dropped == 0
        assert web.frames_offered == 400
        assert web.viewers == 1  # still connected, still not reading
        assert web.encoded >= 2  # the encoder went on while that viewer's send was blocked
        stuck.close()
    finally:
        web.close()


def test_max_clients_refuses_the_next_viewer(served):
    web = served(max_clients=2)
    a, b = StreamReader(web), StreamReader(web)
    wait_until(lambda: web.viewers == 2)
    status, headers, body = get(web, "/stream.mjpg")
    assert status == 503 and "Retry-After" in headers and b"too many viewers" in body
    a.close()
    wait_until(lambda: web.viewers == 1, what="a viewer to leave")
    c = StreamReader(web)
    assert c.head.startswith(b"HTTP/1.0 200")
    for v in (b, c):
        v.close()


# --- the other endpoints --------------------------------------------------------------


def test_page_status_events_and_snapshot(served, tmp_path):
    web = served()
    status, headers, body = get(web, "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    for needle in (b'id="stream"', b'src="stream.mjpg"', b'id="fps"', b'id="events"'):
        assert needle in body
    st = json.loads(get(web, "/status")[2])
    assert st["fps"] == 12.5 and st["detect_ms"] == 80.0 and st["dropped"] == 3 and st["uptime_s"] >= 0
    assert st["web"]["max_clients"] == 4 and st["web"]["viewers"] == 0
    code, headers, jpeg = get(web, "/snapshot.jpg")
    assert code == 200 and headers["Content-Type"] == "image/jpeg"
    assert cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR).shape == (240, 320, 3)
    # events, newest first; a snapshot in the folder becomes a thumbnail URL that serves it
    name = "20261128T032906.123Z-track7-enter.jpg"
    (tmp_path / name).write_bytes(jpeg)
    log_lines = []

    class Log:
        lines = 0

        def event(self, record):
            log_lines.append(record)
            return True

    tee = EventTee(Log(), web)
    tee.event({"event": "enter", "track": 7, "snapshot": str(tmp_path / name)})
    tee.event({"event": "leave", "track": 7, "snapshot": "/elsewhere/" + name})
    events = json.loads(get(web, "/events")[2])["events"]
    assert [e["event"] for e in events] == ["leave", "enter"] and len(log_lines) == 2
    assert "thumbnail" not in events[0]  # not in the snapshot folder: never served
    assert events[1]["thumbnail"] == f"snapshots/{name}"
    assert get(web, "/" + events[1]["thumbnail"])[2] == jpeg
    assert tee.lines == 0  # the log's own counters show through
    assert get(web, "/nothing")[0] == 404


TRAVERSALS = [
    "/snapshots/../../etc/passwd",
    "/snapshots/..%2f..%2fetc%2fpasswd",
    "/snapshots/%2e%2e/%2e%2e/etc/passwd",
    "/snapshots/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "/snapshots/%252e%252e%252fetc%252fpasswd",
    "/snapshots/..%5c..%5cetc%5cpasswd",
    "/snapshots//etc/passwd",
    "/snapshots/%2fetc%2fpasswd",
    "/snapshots/20261128T032906.123Z-x.jpg%00.png",
    "/snapshots/20261128T032906.123Z-..%2f..%2f..%2fetc%2fpasswd.jpg",
    "/snapshots/%c0%ae%c0%ae%c0%afetc%c0%afpasswd",
    "/snapshots/outside.jpg",
    "/snapshots/20261128T032906.123Z-link.jpg",
    "/snapshots/",
    "/snapshots/.",
    "/../../../../etc/passwd",
]


@pytest.mark.parametrize("path", TRAVERSALS)
def test_path_traversal_is_refused(served, tmp_path, path):
    web = served()
    secret_outside = tmp_path.parent / "outside.jpg"
    secret_outside.write_bytes(b"NOT-FOR-THE-WEB")
    link = tmp_path / "20261128T032906.123Z-link.jpg"  # a name the store would write, linking out
    if not link.exists():
        link.symlink_to(secret_outside)
    (tmp_path / "outside.jpg").write_bytes(b"NOT-FOR-THE-WEB")  # in the folder, but not a snapshot name
    answer = raw(web, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    status = int(answer.split(b" ", 2)[1])
    assert status in (400, 404), answer[:200]
    assert b"root:" not in answer and b"NOT-FOR-THE-WEB" not in answer


# --- authentication --------------------------------------------------------------------


def test_wrong_token_gives_401_and_is_rate_limited(served, caplog):
    caplog.set_level("DEBUG")
    web = served(auth="token", secret_file="(read already)")
    assert get(web, "/status")[0] == 401  # no credentials: asked, not counted
    assert web.auth.rejected == 0
    code, headers, _ = get(web, "/status", {"Authorization": "Bearer wrong-token-123"})
    assert code == 401 and headers["WWW-Authenticate"].startswith("Bearer")
    assert get(web, "/status", {"Authorization": f"Bearer {SECRET}"})[0] == 200
    for _ in range(webmod.AUTH_FAILURES - 1):
        assert get(web, "/status?token=nope-nope-nope")[0] == 401
    code, headers, _ = get(web, "/status", {"Authorization": f"Bearer {SECRET}"})
    assert code == 429 and int(headers["Retry-After"]) > 0  # locked out, even with the right token now
    assert get(web, "/stream.mjpg", {"Authorization": "Bearer still-wrong-123"})[0] == 429
    assert web.auth.rejected == webmod.AUTH_FAILURES and web.auth.limited == 2
    web.auth.clock = lambda: time.monotonic() + webmod.AUTH_WINDOW_S + 1  # the window passes
    assert get(web, "/status", {"Authorization": f"Bearer {SECRET}"})[0] == 200
    assert SECRET not in caplog.text and "nope-nope" not in caplog.text


def test_token_in_the_url_becomes_a_cookie(served):
    web = served(auth="token", secret_file="(read already)")
    answer = raw(web, f"GET /?token={SECRET} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    head = answer.split(b"\r\n\r\n")[0].decode()
    assert head.startswith("HTTP/1.0 303") and "Location: ./" in head
    cookie = re.search(r"Set-Cookie: (xnorcam_token=[^;]+);.*HttpOnly.*SameSite=Strict", head)
    assert cookie
    assert get(web, "/", {"Cookie": cookie.group(1)})[0] == 200
    assert get(web, "/events", {"Cookie": "xnorcam_token=forged-cookie-1"})[0] == 401
    viewer = StreamReader(web, f"Cookie: {cookie.group(1)}\r\n")
    assert viewer.head.startswith(b"HTTP/1.0 200")
    viewer.part()
    viewer.close()


def test_basic_auth(served):
    web = served(auth="basic", secret_file="(read already)", user="cam")

    def basic(user, password):
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}

    code, headers, _ = get(web, "/")
    assert code == 401 and headers["WWW-Authenticate"].startswith('Basic realm="xnorcam"')
    assert get(web, "/", basic("cam", SECRET))[0] == 200
    assert get(web, "/", basic("xnorcam", SECRET))[0] == 401
    assert get(web, "/", basic("cam", SECRET + "x"))[0] == 401
    assert get(web, "/", {"Authorization": "Basic %%%not-base64"})[0] == 401
    assert get(web, "/", {"Authorization": f"Bearer {SECRET}"})[0] == 401  # a token is not basic auth


def test_secret_file_rules(tmp_path):
    good = tmp_path / "secret"
    good.write_text(SECRET + "\n")
    good.chmod(0o600)
    assert read_secret(str(good)) == SECRET
    good.chmod(0o640)
    with pytest.raises(ConfigError, match=r"web.secret_file.*0640.*chmod 600") as e:
        read_secret(str(good))
    assert SECRET not in str(e.value)
    good.chmod(0o600)
    with pytest.raises(ConfigError, match="owned by uid"):
        read_secret(str(good), euid=os.geteuid() + 1)
    link = tmp_path / "link"
    link.symlink_to(good)
    with pytest.raises(ConfigError, match="symbolic link"):
        read_secret(str(link))
    short = tmp_path / "short"
    short.write_text("abc")
    short.chmod(0o600)
    with pytest.raises(ConfigError, match="at least 12"):
        read_secret(str(short))
    with pytest.raises(ConfigError, match="cannot be read"):
        read_secret(str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="not a regular file"):
        read_secret(str(tmp_path))


def test_config_web_section():
    assert from_dict({}).web.enabled is False and from_dict({}).web.listen == "127.0.0.1:8080"
    assert from_dict({"web": {"enabled": True, "listen": "[::1]:0"}}).web.listen == "[::1]:0"
    assert from_dict({"web": {"enabled": True, "listen": "0.0.0.0:80", "auth": "basic",
                              "secret_file": "/etc/xnorcam/web-secret"}}).web.auth == "basic"
    for bad, key in [({"listen": "0.0.0.0:8080", "enabled": True}, "web.listen"),
                     ({"listen": "192.168.1.5:8080", "enabled": True}, "web.listen"),
                     ({"listen": "camera.local:8080", "enabled": True}, "web.listen"),
                     ({"listen": "8080"}, "web.listen"), ({"listen": "127.0.0.1:70000"}, "web.listen"),
                     ({"auth": "token", "enabled": True}, "web.secret_file"),
                     ({"auth": "digest"}, "web.auth"), ({"fps": 0}, "web.fps"), ({"user": "a:b"}, "web.user"),
                     ({"max_clients": 0}, "web.max_clients"), ({"port": 80}, "web.port")]:
        with pytest.raises(ConfigError, match=re.escape(key)):
            from_dict({"web": bad})


# --- hostile requests --------------------------------------------------------------------


def test_oversized_and_malformed_requests_are_closed_cleanly(served, monkeypatch):
    monkeypatch.setattr(webmod._Handler, "timeout", 1.0)
    web = served()
    cases = [
        (b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", 414),
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET / HTTP/9.9\r\n\r\n", 505),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(64) + b"\r\n\r\n", 400),  # TLS to a plain port
        (b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(150)) + b"\r\n", 431),
        (b"GET / HTTP/1.1\r\nX: " + b"y" * 70000 + b"\r\n\r\n", 431),
        (b"POST /status HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello", 501),
        (b"GET /status HTTP/1.1\r\nContent-Length: 100000000\r\n\r\n", 413),
        (b"GET /sta", None),  # half a request, then silence: closed after the read timeout
    ]
    for request, expected in cases:
        t0 = time.monotonic()
        answer = raw(web, request, timeout=15)
        if expected is None:
            assert answer == b"" and time.monotonic() - t0 < 10
        else:
            assert answer.startswith(b"HTTP/1.0 %d" % expected), (request[:40], answer[:100])
    assert get(web, "/status")[0] == 200  # and the server is still there


# --- through python -m app ------------------------------------------------------------------


def app_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "app", "--source", "demo", "--preview", "none", *args]


def env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}


def refused(tmp_path: Path, toml: str, *args: str) -> subprocess.CompletedProcess:
    cfg = tmp_path / "config.toml"
    cfg.write_text(toml)
    return subprocess.run(app_cmd("--config", str(cfg), *args), cwd=ROOT, env=env(), capture_output=True,
                          text=True, timeout=120)


def test_app_refuses_an_open_address_without_a_good_secret(tmp_path):
    r = refused(tmp_path, '[web]\nenabled = true\nlisten = "0.0.0.0:8080"\n')
    assert r.returncode == 78 and "web.listen" in r.stderr and "authentication" in r.stderr
    secret = tmp_path / "secret"
    secret.write_text(SECRET)
    secret.chmod(0o644)
    r = refused(tmp_path, f'[web]\nenabled = true\nlisten = "0.0.0.0:8080"\nauth = "token"\n'
                          f'secret_file = "{secret}"\n')
    assert r.returncode == 78 and "web.secret_file" in r.stderr and "chmod 600" in r.stderr
    assert SECRET not in r.stderr + r.stdout
    r = subprocess.run(app_cmd("--web", "0.0.0.0:8080"), cwd=ROOT, env=env(), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "web.listen" in r.stderr


def test_sigterm_stops_the_server_within_two_seconds(tmp_path):
    proc = subprocess.Popen(app_cmd("--web", "127.0.0.1:0", "--log", str(tmp_path / "log.jsonl")), cwd=ROOT,
                            env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        port = None
        lines = []
        deadline = time.monotonic() + 120
        while port is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            lines.append(line)
            m = re.search(r"web preview: http://127\.0\.0\.1:(\d+)/", line)
            port = int(m.group(1)) if m else None
            assert line or proc.poll() is None, "".join(lines)
        assert port, "".join(lines)
        web = type("W", (), {"address": ("127.0.0.1", port)})()
        viewer = StreamReader(web)  # first frame comes once the kernels are warm
        viewer.part()
        stuck = socket.socket()
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.connect(("127.0.0.1", port))
        stuck.sendall(b"GET /stream.mjpg HTTP/1.1\r\n\r\n")
        time.sleep(1.0)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=10)
        took = time.monotonic() - t0
        assert code == 0 and took < 2.0, (code, took)
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        viewer.close()
        stuck.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()

