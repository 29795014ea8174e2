"""systemd notification protocol (sd_notify) without a dependency.

systemd passes the address of an AF_UNIX datagram socket in ``$NOTIFY_SOCKET``
(a path, or ``@name`` for the abstract namespace) and, when ``WatchdogSec=`` is
set, the watchdog period in ``$WATCHDOG_USEC``. Each message is one datagram of
``KEY=value`` lines.

Every method is a no-op when not running under systemd, none ever raises and
none ever blocks: a lost notification must never stop the camera. Failed sends
are counted in ``send_failures`` so they can be reported without being fatal.

``watchdog()`` is meant to be called from the pipeline loop once per processed
frame. It pings at most every ``watchdog_interval`` seconds (a quarter of the
period, so a slow frame or two does not trigger a restart) and never from a
thread of its own: when the loop stalls, the pings stop and systemd restarts
the service. That is the whole point of the watchdog.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Mapping

# systemd limits a notification datagram; a status line never needs more.
_MAX_STATUS_CHARS = 512


def _socket_address(raw: str | None) -> str | bytes | None:
    """Turn ``$NOTIFY_SOCKET`` into a ``sendto`` address, or None if unusable."""
    if not raw:
        return None
    if raw.startswith("@"):
        # Abstract namespace: the leading '@' stands for a NUL byte.
        return b"\0" + raw[1:].encode()
    if raw.startswith("/"):
        return raw
    # vsock: and other transports are not used on a Pi.
    return None


def _watchdog_seconds(environ: Mapping[str, str]) -> float:
    """The watchdog period in seconds, or 0.0 when it is off or not ours."""
    usec = environ.get("WATCHDOG_USEC", "")
    pid = environ.get("WATCHDOG_PID", "")
    if pid:
        try:
            if int(pid) != os.getpid():
                return 0.0  # set for another process (e.g. our parent)
        except ValueError:
            return 0.0
    try:
        value = int(usec)
    except ValueError:
        return 0.0
    return value / 1e6 if value > 0 else 0.0


class Notifier:
    """Sends READY/WATCHDOG/STATUS/EXTEND_TIMEOUT_USEC/STOPPING to systemd.

    ``Notifier()`` (no address) is the null notifier used off systemd.
    """

    def __init__(
        self,
        address: str | bytes | None = None,
        watchdog_period: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._address = address
        self._period = max(0.0, float(watchdog_period)) if address is not None else 0.0
        self._clock = clock
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._last_ping: float | None = None
        self.sent = 0
        self.send_failures = 0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        env = os.environ if environ is None else environ
        address = _socket_address(env.get("NOTIFY_SOCKET"))
        return cls(address, _watchdog_seconds(env))

    @property
    def enabled(self) -> bool:
        """True when a systemd notification socket is configured."""
        return self._address is not None

    @property
    def watchdog_enabled(self) -> bool:
        return self._period > 0.0

    @property
    def watchdog_period(self) -> float:
        """Seconds systemd waits for a ping before it kills us (0: no watchdog)."""
        return self._period

    @property
    def watchdog_interval(self) -> float:
        """Minimum seconds between two pings (0: no watchdog)."""
        return self._period / 4.0

    def ready(self) -> bool:
        return self._send("READY=1")

    def status(self, text: str) -> bool:
        # A newline would start a new KEY=value line inside the datagram.
        line = " ".join(str(text).split())[:_MAX_STATUS_CHARS]
        return self._send(f"STATUS={line}")

    def extend_timeout(self, seconds: float) -> bool:
        try:
            usec = int(float(seconds) * 1e6)
        except (TypeError, ValueError):
            self.send_failures += 1
            return False
        if usec <= 0:
            return False
        return self._send(f"EXTEND_TIMEOUT_USEC={usec}")

    def stopping(self) -> bool:
        return self._send("STOPPING=1")

    def watchdog(self) -> bool:
        """Ping the watchdog if a quarter period has passed since the last ping."""
        if not self.watchdog_enabled:
            return False
        now = self._clock()
        if self._last_ping is not None and now - self._last_ping < self.watchdog_interval:
            return False
        self._last_ping = now
        return self._send("WATCHDOG=1")

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    def _send(self, message: str) -> bool:
        if self._address is None:
            return False
        try:
            with self._lock:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                    # A datagram queue holds only net.unix.max_dgram_qlen (10)
                    # messages; if systemd lags, drop a ping rather than block
                    # the frame loop.
                    self._sock.setblocking(False)
                self._sock.sendto(message.encode("utf-8", "replace"), self._address)
        except (OSError, ValueError):
            self.send_failures += 1
            return False
        self.sent += 1
        return True

    def __enter__(self) -> Notifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
