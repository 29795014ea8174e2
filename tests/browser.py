"""A real browser for the tests: Debian's Chromium, driven over the DevTools protocol with the standard library.

    with Chromium() as browser:           # headless; skips the test when no chromium is installed
        page = browser.open("http://127.0.0.1:8080/")
        page.wait_for("document.readyState === 'complete'")
        png = page.screenshot()           # PNG bytes of the viewport (or of a clip)
        page.eval("document.title")

``Chromium(headless=False, display=":99")`` runs a visible window instead (under
Xvfb). Each browser gets a fresh profile in a temporary folder and the flags
that keep it off the network. ``find_chromium()`` returns its path or None.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-default-browser-check", "--disable-extensions",
         "--disable-features=Translate,MediaRouter,OptimizationHints", "--password-store=basic",
         "--use-mock-keychain", "--mute-audio"]


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    return None


def command(url: str | None = None, *, headless: bool = True, profile: str, port: int = 0,
            size: tuple[int, int] = (1280, 800), extra: list[str] | None = None) -> list[str]:
    """The chromium command line used here (and by the Xvfb test's $BROWSER)."""
    binary = find_chromium() or "chromium"
    cmd = [binary, *FLAGS, f"--user-data-dir={profile}", f"--remote-debugging-port={port}",
           f"--window-size={size[0]},{size[1]}", "--window-position=0,0"]
    if headless:
        cmd.append("--headless")
    cmd += extra or []
    if url:
        cmd.append(url)
    return cmd


class WebSocket:
    """The client side of RFC 6455, text frames only: enough for the DevTools protocol."""

    def __init__(self, url: str, timeout: float = 30.0) -> None:
        assert url.startswith("ws://")
        hostport, _, path = url[5:].partition("/")
        host, _, port = hostport.rpartition(":")
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET /{path} HTTP/1.1\r\nHost: {hostport}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
                          .encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("websocket handshake: connection closed")
            head += chunk
        status = head.split(b"\r\n", 1)[0]
        if b" 101 " not in status:
            raise ConnectionError(f"websocket handshake refused: {status!r}")
        self.buffer = head.split(b"\r\n\r\n", 1)[1]

    def _read(self, n: int) -> bytes:
        while len(self.buffer) < n:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("websocket closed")
            self.buffer += chunk
        out, self.buffer = self.buffer[:n], self.buffer[n:]
        return out

    def send(self, text: str) -> None:
        data = text.encode()
        head = bytearray([0x81])
        n = len(data)
        if n < 126:
            head.append(0x80 | n)
        elif n < 1 << 16:
            head += bytes([0x80 | 126]) + struct.pack(">H", n)
        else:
            head += bytes([0x80 | 127]) + struct.pack(">Q", n)
        mask = os.urandom(4)
        head += mask
        self.sock.sendall(bytes(head) + bytes(b ^ mask[i % 4] for i, b in enumerate(data)))

    def recv(self) -> str:
        message = b""
        while True:
            b0, b1 = self._read(2)
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack(">H", self._read(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self._read(8))[0]
            payload = self._read(n)
            opcode = b0 & 0x0F
            if opcode == 8:
                raise ConnectionError("websocket closed by the browser")
            if opcode in (9, 10):  # ping / pong: the browser does not ping its debugger, ignore
                continue
            message += payload
            if b0 & 0x80:
                return message.decode()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class Page:
    def __init__(self, ws_url: str) -> None:
        self.ws = WebSocket(ws_url)
        self._id = 0

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self._id += 1
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self._id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def eval(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30.0, poll: float = 0.2) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = self.eval(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {timeout:g} s for {expression}")
            time.sleep(poll)

    def navigate(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def screenshot(self, clip: dict[str, float] | None = None) -> bytes:
        params: dict[str, Any] = {"format": "png"}
        if clip:
            params["clip"] = {**clip, "scale": 1}
        return base64.b64decode(self.call("Page.captureScreenshot", **params)["data"])

    def rect(self, selector: str) -> dict[str, float]:
        """The element's box in CSS pixels of the viewport: x, y, width, height."""
        return self.eval(f"(() => {{ const r = document.querySelector({json.dumps(selector)})"
                         f".getBoundingClientRect(); return {{x: r.x, y: r.y, width: r.width, height: r.height}}; }})()")

    def close(self) -> None:
        self.ws.close()


class Chromium:
    """A Chromium process with a fresh profile; ``open(url)`` gives a ``Page``."""

    def __init__(self, headless: bool = True, display: str | None = None, size: tuple[int, int] = (1280, 800),
                 url: str | None = None, extra: list[str] | None = None) -> None:
        self.binary = find_chromium()
        if self.binary is None:
            import pytest

            pytest.skip("chromium is not installed (apt-get install chromium; .ci/run installs it)")
        self.profile = tempfile.mkdtemp(prefix="xnorcam-chromium-")
        env = dict(os.environ)
        if display:
            env["DISPLAY"] = display
        self.proc = subprocess.Popen(command(url or "about:blank", headless=headless, profile=self.profile,
                                             size=size, extra=extra),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        self.port = self._debug_port()

    def _debug_port(self, timeout: float = 60.0) -> int:
        marker = Path(self.profile) / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace")[-2000:] if self.proc.stderr else ""
                raise RuntimeError(f"chromium exited with {self.proc.returncode}: {err}")
            if marker.exists():
                lines = marker.read_text().split("\n")
                if lines and lines[0].strip().isdigit():
                    return int(lines[0])
            time.sleep(0.1)
        raise TimeoutError("chromium did not open its DevTools port")

    def targets(self) -> list[dict[str, Any]]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json/list", timeout=10) as r:
            return json.loads(r.read())

    def first_page(self, timeout: float = 30.0) -> Page:
        deadline = time.monotonic() + timeout
        while True:
            pages = [t for t in self.targets() if t.get("type") == "page"]
            if pages:
                return Page(pages[0]["webSocketDebuggerUrl"])
            if time.monotonic() > deadline:
                raise TimeoutError("chromium shows no page")
            time.sleep(0.2)

    def open(self, url: str) -> Page:
        page = self.first_page()
        page.call("Page.enable")
        page.navigate(url)
        return page

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self.proc.stderr:
            self.proc.stderr.close()
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
