"""The web preview: a small page served by xnorcam itself, for cameras without a screen.

    /                 the page: the live stream, a status panel, the latest events with thumbnails
    /stream.mjpg      multipart MJPEG of the annotated frames
    /snapshot.jpg     the latest annotated frame
    /events           the recent events as JSON (newest first)
    /status           fps, detect ms, drops, uptime, model, the web's own counters, as JSON
    /snapshots/NAME   an event snapshot from ``events.snapshot_dir`` (names as the store writes them)

The standard library's threading HTTP server, one thread per connection, costs
the Pi nothing while nobody watches: the pipeline's ``show`` only keeps a
reference to the newest frame and its boxes (no drawing, no copy), and JPEG is
drawn and encoded on the encoder thread only while a stream viewer or a
``/snapshot.jpg`` request waits, at most ``fps`` times a second and scaled down
to ``width``. Each viewer is sent the newest JPEG when it is ready for one: a
slow viewer skips frames (counted as ``dropped_frames``), it never queues them;
a viewer that stops reading is dropped after ``WRITE_TIMEOUT_S``. Detection
never waits on the web.

Authentication (``web.auth``): ``token`` takes ``Authorization: Bearer SECRET``,
``?token=SECRET`` (which sets a cookie and redirects to the bare URL) or that
cookie; ``basic`` takes HTTP basic auth as ``web.user``. Secrets are compared
in constant time and never logged (the server logs no query strings). After
``AUTH_FAILURES`` wrong secrets from one address within ``AUTH_WINDOW_S``, that
address gets 429 until the window has passed. The secret file must belong to
the user running the app and be readable by nobody else (``ConfigError``
otherwise, exit 78).
"""

from __future__ import annotations

import base64
import collections
import errno
import hmac
import json
import logging
import os
import socket
import stat
import threading
import time
import urllib.parse
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import cv2
import numpy as np

from app import overlay
from app.config import ConfigError, WebConfig, is_loopback, parse_listen
from app.snapshots import NAME_RE as SNAPSHOT_NAME_RE

log = logging.getLogger("xnorcam.web")

BOUNDARY = "xnorcamframe"
WRITE_TIMEOUT_S = 5.0  # a viewer that takes no bytes for this long is dropped
READ_TIMEOUT_S = 10.0
STREAM_SNDBUF = 64 << 10  # a request must arrive whole within this
MAX_CONNECTIONS_EXTRA = 16  # connections beyond the stream viewers (page, JSON, thumbnails)
AUTH_FAILURES = 5
AUTH_WINDOW_S = 60.0
MIN_SECRET_CHARS = 12
MAX_SECRET_BYTES = 4096
COOKIE = "xnorcam_token"


# --- the secret ------------------------------------------------------------------


def read_secret(path: str, euid: int | None = None) -> str:
    """The secret in ``path``: owned by this user, no access for group or others, at least 12 characters.

    Raises ConfigError naming ``web.secret_file`` (the secret itself is never in a message).
    """
    key = "web.secret_file"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ConfigError(f"{key} = {path!r}: is a symbolic link; name the file itself") from None
        from app.sandbox import hint

        raise ConfigError(f"{key} = {path!r}: cannot be read ({exc.strerror or exc})"
                          f"{hint(path, exc.errno, writing=False)}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{key} = {path!r}: not a regular file")
        me = os.geteuid() if euid is None else euid
        if st.st_uid != me:
            raise ConfigError(f"{key} = {path!r}: owned by uid {st.st_uid}, expected the service user (uid {me})")
        if st.st_mode & 0o077:
            raise ConfigError(f"{key} = {path!r}: mode {stat.S_IMODE(st.st_mode):04o} lets other users read it; "
                              f"chmod 600 {path}")
        raw = os.read(fd, MAX_SECRET_BYTES + 1)
    finally:
        os.close(fd)
    if len(raw) > MAX_SECRET_BYTES:
        raise ConfigError(f"{key} = {path!r}: larger than {MAX_SECRET_BYTES} bytes; a secret is one line")
    try:
        secret = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ConfigError(f"{key} = {path!r}: not UTF-8 text") from None
    if len(secret) < MIN_SECRET_CHARS or any(c in secret for c in "\r\n"):
        raise ConfigError(f"{key} = {path!r}: the secret must be one line of at least {MIN_SECRET_CHARS} characters")
    return secret


class Auth:
    """Checks a request's credentials in constant time; counts wrong ones per address (rate limit)."""

    def __init__(self, mode: str = "none", secret: str = "", user: str = "xnorcam",
                 failures: int = AUTH_FAILURES, window_s: float = AUTH_WINDOW_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.mode = mode
        self._secret = secret.encode()
        self._basic = f"{user}:{secret}".encode()
        self.failures_allowed = failures
        self.window_s = window_s
        self.clock = clock
        self.rejected = 0
        self.limited = 0
        self._lock = threading.Lock()
        self._failed: dict[str, collections.deque[float]] = {}

    def challenge(self) -> str:
        return 'Basic realm="xnorcam", charset="UTF-8"' if self.mode == "basic" else 'Bearer realm="xnorcam"'

    def limited_for(self, address: str) -> float:
        """Seconds until ``address`` may try again (0 = now)."""
        with self._lock:
            times = self._prune(address)
            if times is not None and len(times) >= self.failures_allowed:
                return max(0.0, times[0] + self.window_s - self.clock())
        return 0.0

    def _prune(self, address: str) -> collections.deque[float] | None:
        times = self._failed.get(address)
        if times is None:
            return None
        horizon = self.clock() - self.window_s
        while times and times[0] <= horizon:
            times.popleft()
        if not times:
            del self._failed[address]
            return None
        return times

    def failed(self, address: str) -> None:
        with self._lock:
            if len(self._failed) > 1024:  # many addresses: forget the ones whose window has passed
                for a in list(self._failed):
                    self._prune(a)
            self._failed.setdefault(address, collections.deque(maxlen=self.failures_allowed)).append(self.clock())
            self.rejected += 1

    def check(self, headers: Any, query: dict[str, list[str]]) -> bool | None:
        """True: good credentials; False: wrong ones were presented; None: none were presented."""
        if self.mode == "none":
            return True
        presented: list[bytes] = []
        authz = headers.get("Authorization", "")
        scheme, _, value = authz.partition(" ")
        if self.mode == "basic":
            if scheme.lower() == "basic" and value:
                try:
                    presented.append(base64.b64decode(value.strip(), validate=True))
                except ValueError:
                    presented.append(b"")
            expected = self._basic
        else:
            if scheme.lower() == "bearer" and value:
                presented.append(value.strip().encode())
            presented += [t.encode() for t in query.get("token", [])[:1]]
            cookie = _cookie(headers.get("Cookie", ""), COOKIE)
            if cookie is not None:
                presented.append(cookie.encode())
            expected = self._secret
        if not presented:
            return None
        ok = False
        for given in presented:
            ok |= hmac.compare_digest(given, expected)
        return ok


def _cookie(header: str, name: str) -> str | None:
    for part in header.split(";"):
        k, sep, v = part.strip().partition("=")
        if sep and k == name:
            return urllib.parse.unquote(v)
    return None


# --- the preview ------------------------------------------------------------------


class WebPreview:
    """The web preview as a pipeline sink (``show``, ``event``, ``close``) plus its server.

    ``status`` returns the pipeline's numbers for ``/status``; ``snapshot_dir``
    is where ``/snapshots/NAME`` reads (``""``: no snapshots served).
    """

    name = "web"
    needs_canvas = False  # drawn on the encoder thread, only while someone watches
    stop_requested = False

    def __init__(self, cfg: WebConfig, class_names: Sequence[str], *, secret: str = "", snapshot_dir: str = "",
                 status: Callable[[], dict[str, Any]] | None = None, info: dict[str, Any] | None = None) -> None:
        self.cfg = cfg
        self.class_names = list(class_names)
        self.snapshot_dir = os.path.abspath(snapshot_dir) if snapshot_dir else ""
        self.status_source = status or (lambda: {})
        self.info = dict(info or {})
        self.auth = Auth(cfg.auth, secret, cfg.user)
        self.period = 1.0 / cfg.fps
        self.started = time.monotonic()
        self._cond = threading.Condition()
        self._latest: tuple[Any, np.ndarray, overlay.Hud | None, overlay.Marks | None] | None = None
        self._latest_seq = 0
        self._jpeg: bytes | None = None
        self._jpeg_seq = 0
        self._viewers = 0
        self._waiters = 0  # /snapshot.jpg requests waiting for a fresh JPEG
        self._stop = threading.Event()
        self._events: collections.deque[dict[str, Any]] = collections.deque(maxlen=cfg.events)
        self._events_lock = threading.Lock()
        self._server: _Server | None = None
        self._threads: list[threading.Thread] = []
        # counters (read by /status and the tests)
        self.frames_offered = 0
        self.encoded = 0
        self.encode_failures = 0
        self.dropped_frames = 0
        self.refused = 0
        self.streams_served = 0

    # --- pipeline side (never blocks, never draws) ---

    def show(self, frame: Any, canvas: np.ndarray | None, detections: np.ndarray, hud: overlay.Hud | None,
             marks: overlay.Marks | None = None) -> None:
        with self._cond:
            self._latest = (frame, detections, hud, marks)
            self._latest_seq += 1
            self.frames_offered += 1
            if self._viewers or self._waiters:
                self._cond.notify_all()

    def event(self, record: dict[str, Any]) -> None:
        from app.sinks import utc_now_iso

        item = {"time": utc_now_iso(), **record}
        thumb = self.thumbnail_url(record.get("snapshot"))
        if thumb:
            item["thumbnail"] = thumb
        with self._events_lock:
            self._events.appendleft(item)

    def thumbnail_url(self, path: Any) -> str | None:
        if not path or not self.snapshot_dir or not isinstance(path, str):
            return None
        folder, name = os.path.split(os.path.abspath(path))
        if folder != self.snapshot_dir or not SNAPSHOT_NAME_RE.match(name):
            return None
        return "snapshots/" + name

    def recent_events(self) -> list[dict[str, Any]]:
        with self._events_lock:
            return list(self._events)

    # --- server ---

    def bind(self) -> str:
        """Listen on ``web.listen`` (ConfigError when it cannot); returns the URL. ``start`` serves."""
        host, port = parse_listen("web.listen", self.cfg.listen)
        server_cls = _Server6 if ":" in host else _Server
        try:
            self._server = server_cls((host, port), self)
        except OSError as exc:
            hint = ""
            if exc.errno == errno.EADDRINUSE:
                hint = "; pick another port (--web 127.0.0.1:8081, or make run WEB=127.0.0.1:8081)"
            if exc.errno in (errno.EAFNOSUPPORT, errno.EPERM, errno.EACCES) and os.environ.get("INVOCATION_ID"):
                hint = ("; under systemd the unit needs the network drop-in "
                        "(systemd/xnorcam-network.conf: run deploy/install.sh again)")
            raise ConfigError(f"web.listen = {self.cfg.listen!r}: cannot listen there "
                              f"({exc.strerror or exc}){hint}") from None
        return self.url

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None
        return self._server.server_address[:2]

    @property
    def url(self) -> str:
        host, port = self.address
        if host in ("0.0.0.0", "::"):
            host = socket.gethostname()
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}/"

    def start(self) -> None:
        if self._server is None:
            self.bind()
        server = self._server
        assert server is not None
        for name, target in (("web-server", lambda: server.serve_forever(poll_interval=0.2)),
                             ("web-encoder", self._encode_loop)):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def close(self) -> None:
        """Stop serving: every handler sees the stop within a fraction of a second."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        server, self._server = self._server, None
        if server is not None:
            if len(self._threads) > 0:
                server.shutdown()
            server.server_close()
            server.close_all()
        for t in self._threads:
            t.join(timeout=1.0)

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    @property
    def viewers(self) -> int:
        return self._viewers

    # --- the encoder thread ---

    def _encode_loop(self) -> None:
        last = 0
        next_at = 0.0
        while True:
            with self._cond:
                while not self._stop.is_set() and not (
                        (self._viewers or self._waiters) and self._latest is not None and self._latest_seq != last):
                    self._cond.wait(0.5)
            if self._stop.is_set():
                return
            delay = next_at - time.monotonic()
            if delay > 0 and self._stop.wait(delay):  # at most fps a second; then the newest frame
                return
            with self._cond:
                item, last = self._latest, self._latest_seq
            jpeg = self.encode(item)
            next_at = time.monotonic() + self.period
            if jpeg is None:
                continue
            with self._cond:
                self._jpeg = jpeg
                self._jpeg_seq += 1
                self.encoded += 1
                self._cond.notify_all()

    def encode(self, item: tuple[Any, np.ndarray, overlay.Hud | None, overlay.Marks | None]) -> bytes | None:
        """One annotated frame as JPEG, scaled down to ``web.width``; None (counted, warned once) on failure."""
        frame, detections, hud, marks = item
        try:
            canvas = overlay.render(frame.pixels, detections, self.class_names, hud, marks)
            h, w = canvas.shape[:2]
            if w > self.cfg.width:
                canvas = cv2.resize(canvas, (self.cfg.width, max(1, round(h * self.cfg.width / w))),
                                    interpolation=cv2.INTER_AREA)
            ok, buf = cv2.imencode(".jpg", canvas, [cv2.IMWRITE_JPEG_QUALITY, self.cfg.quality])
            if not ok:
                raise ValueError("cv2.imencode failed")
            return buf.tobytes()
        except Exception as exc:
            self.encode_failures += 1
            if self.encode_failures == 1:
                log.warning("web preview: encoding a frame failed (%s); the stream goes on", exc)
            return None

    # --- what handlers wait for ---

    def joined(self) -> bool:
        with self._cond:
            if self._viewers >= self.cfg.max_clients:
                self.refused += 1
                return False
            self._viewers += 1
            self.streams_served += 1
            self._cond.notify_all()
            return True

    def left(self, missed: int = 0) -> None:
        with self._cond:
            self._viewers -= 1
            self.dropped_frames += missed

    def skipped(self, n: int) -> None:
        if n > 0:
            with self._cond:
                self.dropped_frames += n

    @property
    def jpeg_seq(self) -> int:
        return self._jpeg_seq

    def next_jpeg(self, after: int, timeout: float = 0.5) -> tuple[bytes | None, int]:
        """The newest JPEG once it is newer than ``after``; (None, after) on timeout or stop."""
        with self._cond:
            if self._jpeg_seq <= after and not self._stop.is_set():
                self._cond.wait(timeout)
            if self._jpeg_seq <= after or self._stop.is_set():
                return None, after
            return self._jpeg, self._jpeg_seq

    def fresh_jpeg(self, timeout: float = 3.0) -> bytes | None:
        """A JPEG of a frame shown after this call (or the newest one, when no frame comes in time)."""
        with self._cond:
            self._waiters += 1
            after = self._jpeg_seq
            self._cond.notify_all()
        try:
            deadline = time.monotonic() + timeout
            with self._cond:
                while self._jpeg_seq <= after and not self._stop.is_set():
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(min(left, 0.5))
                return self._jpeg
        finally:
            with self._cond:
                self._waiters -= 1

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.info)
        try:
            out.update(self.status_source())
        except Exception:  # the page must not die of a status read racing a stop
            log.debug("status source failed", exc_info=True)
        out["uptime_s"] = round(time.monotonic() - self.started, 1)
        out["web"] = {
            "viewers": self._viewers,
            "max_clients": self.cfg.max_clients,
            "fps": self.cfg.fps,
            "width": self.cfg.width,
            "encoded": self.encoded,
            "dropped_frames": self.dropped_frames,
            "refused": self.refused,
            "auth": self.cfg.auth,
            "auth_rejected": self.auth.rejected,
            "auth_limited": self.auth.limited,
        }
        return out


class NullWeb:
    """No web preview: the interface of ``WebPreview`` as a pipeline sink."""

    name = "none"
    needs_canvas = False
    stop_requested = False

    def show(self, *args: Any, **kwargs: Any) -> None:
        pass

    def event(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class EventTee:
    """A log sink that also hands every event line (tracks, outages) to the web preview."""

    def __init__(self, log_sink: Any, web: Any) -> None:
        self.log = log_sink
        self.web = web

    def write(self, record: dict[str, Any]) -> bool:
        return self.log.write(record)

    def event(self, record: dict[str, Any]) -> bool:
        try:
            self.web.event(record)
        except Exception:
            log.debug("web event failed", exc_info=True)
        return self.log.event(record)

    def close(self) -> None:
        self.log.close()

    def __getattr__(self, name: str) -> Any:  # lines, failures, path, ...
        return getattr(self.log, name)


# --- HTTP ----------------------------------------------------------------------------


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 16

    def __init__(self, address: tuple[str, int], web: WebPreview) -> None:
        self.web = web
        self.max_connections = web.cfg.max_clients + MAX_CONNECTIONS_EXTRA
        self._active: set[socket.socket] = set()
        self._active_lock = threading.Lock()
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind looks the host up in DNS (getfqdn): slow, and pointless here.
        import socketserver

        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._active_lock:
            full = len(self._active) >= self.max_connections
            if not full:
                self._active.add(request)
        if full:
            self.web.refused += 1
            try:
                request.settimeout(0.5)
                request.sendall(b"HTTP/1.0 503 Service Unavailable\r\nRetry-After: 5\r\nContent-Length: 0\r\n"
                                b"Connection: close\r\n\r\n")
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._active_lock:
                self._active.discard(request)

    def close_all(self) -> None:
        """Shut every open connection: blocked sends and reads end at once."""
        with self._active_lock:
            open_now = list(self._active)
        for request in open_now:
            try:
                request.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("web request from %s failed", client_address[0], exc_info=True)


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "xnorcam"
    sys_version = ""
    protocol_version = "HTTP/1.0"
    default_request_version = "HTTP/1.0"  # an error for a garbled request line still has a status line
    timeout = READ_TIMEOUT_S

    # The default logs every request line, query strings (tokens) included, to stderr: log none of it.
    def log_message(self, format: str, *args: Any) -> None:
        pass

    def log_request(self, code: Any = "-", size: Any = "-") -> None:
        path = urllib.parse.urlsplit(getattr(self, "path", "") or "").path
        log.debug("%s %s %s -> %s", self.client_address[0], getattr(self, "command", "-"), path[:200], code)

    @property
    def web(self) -> WebPreview:
        return self.server.web

    def _send(self, code: int, body: bytes, ctype: str, extra: dict[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj: Any) -> None:
        self._send(200, json.dumps(obj, separators=(",", ":"), allow_nan=False).encode(), "application/json")

    def _plain(self, code: int, text: str, extra: dict[str, str] | None = None) -> None:
        self._send(code, (text + "\n").encode(), "text/plain; charset=utf-8", extra)

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        if self.headers.get("Content-Length", "0").strip() not in ("", "0") or self.headers.get("Transfer-Encoding"):
            self._plain(413, "a GET has no body")
            return
        parts = urllib.parse.urlsplit(self.path)
        path = parts.path
        query = urllib.parse.parse_qs(parts.query, max_num_fields=8)
        address = self.client_address[0]
        auth = self.web.auth
        if auth.mode != "none":
            wait = auth.limited_for(address)
            if wait > 0:
                auth.limited += 1
                self._plain(429, "too many wrong secrets: try again later", {"Retry-After": str(int(wait) + 1)})
                return
            verdict = auth.check(self.headers, query)
            if verdict is not True:
                if verdict is False:
                    auth.failed(address)
                    log.warning("web preview: wrong secret from %s", address)
                self._plain(401, "authentication required", {"WWW-Authenticate": auth.challenge()})
                return
            if "token" in query and path == "/":
                # Keep the token in a cookie and out of the address bar (and of the history).
                token = urllib.parse.quote(query["token"][0], safe="")
                self.send_response(303)
                self.send_header("Location", "./")
                self.send_header("Set-Cookie", f"{COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        if path == "/":
            self._send(200, PAGE.encode(), "text/html; charset=utf-8",
                       {"Content-Security-Policy": "default-src 'self'; style-src 'unsafe-inline'; "
                                                   "script-src 'unsafe-inline'; img-src 'self'"})
        elif path == "/stream.mjpg":
            self._stream()
        elif path == "/snapshot.jpg":
            jpeg = self.web.fresh_jpeg()
            if jpeg is None:
                self._plain(503, "no frame yet", {"Retry-After": "1"})
            else:
                self._send(200, jpeg, "image/jpeg")
        elif path == "/events":
            self._json({"events": self.web.recent_events()})
        elif path == "/status":
            self._json(self.web.status())
        elif path.startswith("/snapshots/"):
            self._snapshot(path[len("/snapshots/"):])
        elif path == "/favicon.ico":
            self._send(204, b"", "image/x-icon")
        else:
            self._plain(404, "not found")

    def _snapshot(self, raw: str) -> None:
        try:
            name = urllib.parse.unquote(raw, errors="strict")
        except UnicodeDecodeError:
            name = ""
        folder = self.web.snapshot_dir
        # Only names the snapshot store writes: no '/', no '..', no NUL, no other files of the folder.
        if not folder or not SNAPSHOT_NAME_RE.fullmatch(name):
            self._plain(404, "not found")
            return
        try:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            self._plain(404, "not found")
            return
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size > 16 << 20:
                self._plain(404, "not found")
                return
            with os.fdopen(fd, "rb", closefd=False) as fh:
                body = fh.read()
        finally:
            os.close(fd)
        self._send(200, body, "image/jpeg", {"Cache-Control": "private, max-age=3600"})

    def _stream(self) -> None:
        web = self.web
        if not web.joined():
            self._plain(503, f"too many viewers (at most {web.cfg.max_clients})", {"Retry-After": "5"})
            return
        last = 0
        try:
            self.connection.settimeout(WRITE_TIMEOUT_S)
            # A small send buffer: a stalled viewer holds little kernel memory and skips frames sooner.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, STREAM_SNDBUF)
            self.send_response(200)
            self.send_header("Content-Type", f"multipart/x-mixed-replace; boundary={BOUNDARY}")
            self.send_header("Cache-Control", "no-store")
            self.send_header("Pragma", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            if self.command == "HEAD":
                return
            while not web.stopping:
                jpeg, seq = web.next_jpeg(last)
                if jpeg is None:
                    continue
                if last:
                    web.skipped(seq - last - 1)
                last = seq
                self.wfile.write(b"--" + BOUNDARY.encode() + b"\r\nContent-Type: image/jpeg\r\nContent-Length: "
                                 + str(len(jpeg)).encode() + b"\r\n\r\n" + jpeg + b"\r\n")
        except OSError:  # the viewer went away, or took nothing for WRITE_TIMEOUT_S
            pass
        finally:
            web.left(max(0, web.jpeg_seq - last) if last else 0)  # what it missed while stuck
            self.close_connection = True


def describe(web: WebPreview) -> str:
    """The line that says where the picture is."""
    host, port = web.address
    line = f"web preview: {web.url}"
    if is_loopback(host):
        line += f" (this machine only; from another one: ssh -L {port}:127.0.0.1:{port} THIS-HOST, then that URL)"
    if web.cfg.auth == "token":
        line += " (add ?token=SECRET once)"
    return line


PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>xnorcam</title>
<style>
  body { margin: 0; font: 15px/1.4 system-ui, sans-serif; background: #111; color: #eee; }
  header { padding: 8px 12px; background: #222; display: flex; justify-content: space-between; }
  header b { color: #7fd; }
  main { display: flex; flex-wrap: wrap; gap: 12px; padding: 12px; }
  #view { flex: 1 1 480px; max-width: min(960px, calc((100vh - 80px) * 4 / 3)); }
  #stream { width: 100%; background: #000; display: block; image-rendering: auto; min-height: 120px; }
  #note { color: #fa6; min-height: 1.4em; }
  aside { flex: 0 1 320px; }
  dl { display: grid; grid-template-columns: auto 1fr; gap: 2px 12px; margin: 0 0 12px; }
  dt { color: #999; } dd { margin: 0; font-variant-numeric: tabular-nums; }
  ol { list-style: none; padding: 0; margin: 0; }
  li { display: flex; gap: 8px; align-items: center; padding: 4px 0; border-top: 1px solid #333; }
  li img { width: 96px; height: 72px; object-fit: cover; background: #333; }
  li small { color: #999; display: block; }
  h2 { font-size: 15px; margin: 0 0 6px; color: #ccc; }
</style>
</head>
<body>
<header><b>xnorcam</b><span id="clock"></span></header>
<main>
  <section id="view">
    <img id="stream" src="stream.mjpg" alt="live picture">
    <div id="note"></div>
  </section>
  <aside>
    <h2>Status</h2>
    <dl id="status">
      <dt>fps</dt><dd id="fps">-</dd>
      <dt>detect</dt><dd id="detect">-</dd>
      <dt>dropped</dt><dd id="dropped">-</dd>
      <dt>uptime</dt><dd id="uptime">-</dd>
      <dt>model</dt><dd id="model">-</dd>
      <dt>source</dt><dd id="source">-</dd>
      <dt>viewers</dt><dd id="viewers">-</dd>
    </dl>
    <h2>Latest events</h2>
    <ol id="events"><li>none yet</li></ol>
  </aside>
</main>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
function dur(s) {
  const h = Math.floor(s / 3600), m = Math.floor(s / 60) % 60, x = Math.floor(s % 60);
  return (h ? h + " h " : "") + (h || m ? m + " min " : "") + x + " s";
}
async function status() {
  try {
    const r = await fetch("status", {cache: "no-store"});
    if (!r.ok) throw new Error(r.status);
    const s = await r.json();
    $("fps").textContent = (s.fps ?? 0).toFixed(1);
    $("detect").textContent = (s.detect_ms ?? 0).toFixed(1) + " ms";
    $("dropped").textContent = String(s.dropped ?? 0);
    $("uptime").textContent = dur(s.uptime_s ?? 0);
    $("model").textContent = s.model ?? "-";
    $("source").textContent = s.source ?? "-";
    $("viewers").textContent = s.web.viewers + " of " + s.web.max_clients;
    $("clock").textContent = new Date().toLocaleTimeString();
  } catch (e) { $("clock").textContent = "no answer from the camera"; }
}
function eventText(e) {
  const who = e.track ? "#" + e.track + " " + (e.label ?? "") : "";
  let what = e.event;
  if (e.event === "leave") what += " after " + e.duration_s + " s";
  if (e.event === "cross") what += " " + e.direction;
  if (e.event === "source_error") what = "camera error: " + (e.message ?? "");
  return [who, what];
}
async function events() {
  try {
    const r = await fetch("events", {cache: "no-store"});
    if (!r.ok) return;
    const list = (await r.json()).events;
    const ol = $("events");
    ol.replaceChildren();
    if (!list.length) { const li = document.createElement("li"); li.textContent = "none yet"; ol.append(li); }
    for (const e of list) {
      const li = document.createElement("li");
      if (e.thumbnail) {
        const img = document.createElement("img");
        img.src = e.thumbnail; img.alt = e.event + " snapshot"; img.className = "thumb";
        li.append(img);
      }
      const [who, what] = eventText(e);
      const div = document.createElement("div");
      div.textContent = who + " " + what;
      const small = document.createElement("small");
      small.textContent = new Date(e.time).toLocaleTimeString();
      div.append(small);
      li.append(div);
      ol.append(li);
    }
  } catch (e) {}
}
$("stream").addEventListener("error", () => {
  $("note").textContent = "The stream is not available (too many viewers?). Retrying...";
  setTimeout(() => { $("stream").src = "stream.mjpg?" + Date.now(); }, 5000);
});
$("stream").addEventListener("load", () => { $("note").textContent = ""; });
status(); events();
setInterval(status, 1000);
setInterval(events, 2000);
</script>
</body>
</html>
"""
