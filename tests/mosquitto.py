"""A real mosquitto broker for the tests, on 127.0.0.1, a free port and a config file of its own.

``Broker(tmp_path, users={...}, tls=...)`` writes ``mosquitto.conf`` (and a password file made with
``mosquitto_passwd``) under ``tmp_path``; ``start()``, ``stop()``, ``restart()`` (same port),
``pause()``/``resume()`` (SIGSTOP/SIGCONT: a broker that keeps the connection and answers nothing).
``Listener`` is a paho subscriber that records every message with its retain flag. ``make_ca`` makes a
throwaway CA and certificates signed by it with the ``openssl`` command. Tests that need the broker skip
with the reason where mosquitto cannot be found (``.ci/run`` installs it).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

MOSQUITTO = shutil.which("mosquitto") or next(
    (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)), None)
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd")

needs_mosquitto = pytest.mark.skipif(
    MOSQUITTO is None, reason="mosquitto is not installed (.ci/run installs it: apt-get install mosquitto)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, step: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


class Broker:
    def __init__(self, folder: Path, users: dict[str, str] | None = None, tls: dict[str, Path] | None = None,
                 port: int | None = None) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.users = users
        self.tls = tls
        self.proc: subprocess.Popen | None = None
        self.conf = self.folder / "mosquitto.conf"
        self.log = self.folder / "mosquitto.log"
        # Run as whoever runs the tests: as root, mosquitto would otherwise become user "mosquitto" and lose
        # access to the test's folder.
        lines = [f"user {pwd.getpwuid(os.geteuid()).pw_name}",
                 f"listener {self.port} 127.0.0.1", "persistence false", f"log_dest file {self.log}",
                 "log_type error", "log_type warning", "log_type notice", "log_type information",
                 "connection_messages true", "max_queued_messages 100000", "max_inflight_messages 20"]
        if users is None:
            lines.append("allow_anonymous true")
        else:
            pw = self.folder / "passwd"
            pw.write_text("")
            for user, password in users.items():
                subprocess.run([MOSQUITTO_PASSWD, "-b", str(pw), user, password], check=True, capture_output=True)
            pw.chmod(0o600)
            lines += ["allow_anonymous false", f"password_file {pw}"]
        if tls:
            lines += [f"cafile {tls['ca']}", f"certfile {tls['cert']}", f"keyfile {tls['key']}"]
            if tls.get("require_certificate"):
                lines.append("require_certificate true")
        self.conf.write_text("\n".join(lines) + "\n")

    def start(self) -> Broker:
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        if not wait_for(self._listening, 10):
            self.stop()
            raise RuntimeError(f"mosquitto did not start: {self.log.read_text() if self.log.exists() else ''}")
        return self

    def _listening(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"mosquitto exited: {self.proc.stderr.read().decode() if self.proc.stderr else ''}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)  # a paused broker cannot act on SIGTERM
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc.stderr:
            self.proc.stderr.close()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def pause(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def __enter__(self) -> Broker:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class Listener:
    """A subscriber to ``topics`` (default everything) that keeps (topic, payload, retain) in arrival order."""

    def __init__(self, port: int, topics: tuple[str, ...] = ("#",), **connect) -> None:
        import paho.mqtt.client as paho

        self.messages: list[tuple[str, bytes, bool]] = []
        self.lock = threading.Lock()
        self.subscribed = threading.Event()
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"listener-{port}-{id(self)}")
        if connect.get("username"):
            self.client.username_pw_set(connect["username"], connect.get("password"))
        if connect.get("tls"):
            self.client.tls_set_context(connect["tls"])

        def on_connect(client, userdata, flags, rc, props):
            client.subscribe([(t, 1) for t in topics])

        def on_subscribe(client, userdata, mid, rcs, props):
            self.subscribed.set()

        def on_message(client, userdata, msg):
            with self.lock:
                self.messages.append((msg.topic, bytes(msg.payload), bool(msg.retain)))

        self.client.on_connect, self.client.on_subscribe, self.client.on_message = on_connect, on_subscribe, on_message
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()
        if not self.subscribed.wait(10):
            raise RuntimeError("the listener could not subscribe")

    def on(self, topic: str) -> list[bytes]:
        with self.lock:
            return [p for t, p, _ in self.messages if t == topic]

    def last(self, topic: str) -> bytes | None:
        got = self.on(topic)
        return got[-1] if got else None

    def wait(self, predicate: Callable[[Listener], bool], timeout: float = 15.0) -> bool:
        return wait_for(lambda: predicate(self), timeout)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()

    def __enter__(self) -> Listener:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def make_ca(folder: Path, name: str = "ca") -> dict[str, Path]:
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate, all signed by it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    p = {k: folder / f"{name}-{k}.pem" for k in ("ca", "ca_key", "cert", "key", "client_cert", "client_key")}

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=folder)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN=xnorcam test {name}",
            "-keyout", str(p["ca_key"]), "-out", str(p["ca"]))
    ext = folder / f"{name}-san.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for cert, key, cn in (("cert", "key", "127.0.0.1"), ("client_cert", "client_key", "xnorcam-client")):
        csr = folder / f"{name}-{cert}.csr"
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={cn}", "-keyout", str(p[key]), "-out", str(csr))
        openssl("x509", "-req", "-in", str(csr), "-CA", str(p["ca"]), "-CAkey", str(p["ca_key"]), "-CAcreateserial",
                "-days", "2", "-extfile", str(ext), "-out", str(p[cert]))
    for k in ("key", "client_key", "ca_key"):
        p[k].chmod(0o600)
    return p
