"""MQTT: events, counts, presence, snapshots and a status line on the home network; Home Assistant discovery.

Topics, under ``P`` = ``mqtt.topic_prefix`` (default ``xnorcam/<hostname>``), per class ``L`` (its name,
lowercase, other characters as ``_``):

    P/availability      online | offline    retained; offline is also the last will (a crash, kill -9, a lost link)
    P/L/count           0, 1, 2 ...        retained; with tracks, the confirmed tracks of that class in view,
                                           without, the boxes of that class in the latest frame
    P/L/presence        ON | OFF           retained; ON at once, OFF once the count has been 0 for presence_hold_s
    P/L/snapshot        JPEG               retained; the latest enter/leave snapshot of that class
    P/events            JSON               every event line of the log (enter, update, cross, leave, outages)
    P/status            JSON               every status_interval_s: fps, detect_ms, dropped, uptime_s, mqtt counters

Home Assistant discovery (``D`` = ``mqtt.discovery_prefix``): ``D/<component>/<node>/<object>/config``,
retained, one device (``node`` = the client id) holding a binary_sensor (occupancy) and a count sensor per
class, an image entity per class when snapshots are on, and diagnostic sensors for fps and detect time.
``mqtt.discovery = false`` publishes empty payloads there, which removes the entities.

Threads. The pipeline never touches a socket: ``MqttTee`` (the log sink's wrapper) hands each frame line
and event line to ``MqttPublisher``, which only takes a lock, updates a few numbers and appends to its
``Outbox``. The outbox keeps events in a bounded deque (the oldest are dropped past ``queue_max`` and
counted) and the retained state as the latest value per topic, every entry numbered in the order it
was made. One thread of this module owns the paho client: it connects (backing off from
``reconnect_min_s`` to ``reconnect_max_s``), hands the outbox to paho in that order, at most
``WINDOW`` messages unacknowledged, and after every (re)connect republishes discovery, availability
and the retained state. With QoS 1 (the default) paho keeps an unacknowledged message and sends it
again after a reconnect, so a broker restart loses nothing beyond the counted overflow. A broker that
closes the connection is noticed at once; one that goes silent (a power cut) within about twice
``keepalive_s`` (paho's ping goes unanswered), then the connection is dropped and made again.

A refused login before the first successful connection is a configuration error: the app stops with
exit 78 and one line. After one, it is logged and retried like any failure. The password is read from
``mqtt.password_file``, which must belong to the service user and be readable by nobody else; it never
appears in a message.
"""

from __future__ import annotations

import collections
import errno
import json
import logging
import os
import re
import socket
import ssl
import stat
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho

from app import __version__
from app.config import ConfigError, MqttConfig
from app.sandbox import hint
from app.sinks import SCHEMA_VERSION, utc_now_iso

log = logging.getLogger("xnorcam.mqtt")

WINDOW = 20  # messages handed to paho and not yet acknowledged (paho's own in-flight limit)
ONLINE, OFFLINE = "online", "offline"
ON, OFF = "ON", "OFF"
MAX_PASSWORD_BYTES = 4096
CONNECT_TIMEOUT_S = 10.0  # from the TCP connect to the broker's CONNACK
CLOSE_TIMEOUT_S = 3.0  # at stop: the time given to flush what is queued, then offline
# MQTT 3.1.1 CONNACK refusals that no retry can fix, as paho's reason codes (134, 135); mosquitto 2
# answers a wrong password with 135.
AUTH_REFUSALS = {134: "bad user name or password", 135: "not authorised (a wrong password, or a user without access)"}


def slug(text: str) -> str:
    """A topic level or id from a name: lowercase, [a-z0-9_-], never empty."""
    return re.sub(r"[^a-z0-9_-]+", "_", text.lower()).strip("_") or "x"


def hostname() -> str:
    return slug(socket.gethostname().split(".")[0])


def client_id(cfg: MqttConfig) -> str:
    return cfg.client_id or f"xnorcam-{hostname()}"


def topic_prefix(cfg: MqttConfig) -> str:
    return cfg.topic_prefix or f"xnorcam/{hostname()}"


# --- start-up checks ---------------------------------------------------------------


@dataclass(frozen=True)
class Login:
    """What the connection needs beyond the config: the password and the TLS context."""

    password: str | None = None
    tls: ssl.SSLContext | None = None


def read_password(path: str, key: str = "mqtt.password_file") -> str:
    """The password in ``path``, which must be a file of the service user that nobody else can read."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ConfigError(f"{key} {path}: cannot be read ({exc.strerror}){hint(path, exc.errno, False)}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{key} {path}: not a regular file")
    uid = os.geteuid()
    if st.st_uid != uid:
        raise ConfigError(f"{key} {path}: owned by uid {st.st_uid}, not by the service user (uid {uid}); it must "
                          f"be readable only by that user: chown it to them and chmod 600")
    if st.st_mode & 0o077:
        raise ConfigError(f"{key} {path}: mode {stat.S_IMODE(st.st_mode):04o} lets others read or change it; it must "
                          f"be readable only by the service user: chmod 600")
    if st.st_size > MAX_PASSWORD_BYTES:
        raise ConfigError(f"{key} {path}: {st.st_size} bytes is too large for a password (at most {MAX_PASSWORD_BYTES})")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_PASSWORD_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{key} {path}: cannot be read ({exc.strerror}){hint(path, exc.errno, False)}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{key} {path}: not UTF-8 text") from None
    password = text[:-1] if text.endswith("\n") else text
    password = password[:-1] if password.endswith("\r") else password
    if not password or "\n" in password:
        raise ConfigError(f"{key} {path}: expected the password alone on one line (the file is empty or has "
                          f"several lines)")
    return password


def _readable(key: str, path: str) -> None:
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise ConfigError(f"{key} {path}: cannot be read ({exc.strerror}){hint(path, exc.errno, False)}") from None


def _no_passphrase() -> bytes:
    raise ConfigError("mqtt.key_file: the private key is encrypted; it must be stored without a passphrase "
                      "(readable only by the service user)")


def tls_context(cfg: MqttConfig) -> ssl.SSLContext:
    """A client context that verifies the broker against ``ca_file`` (and its name), with the client certificate."""
    _readable("mqtt.ca_file", cfg.ca_file)
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=None)
    try:
        ctx.load_verify_locations(cafile=cfg.ca_file)
    except (ssl.SSLError, ValueError) as exc:
        raise ConfigError(f"mqtt.ca_file {cfg.ca_file}: not a PEM CA certificate ({_ssl_reason(exc)})") from None
    if cfg.cert_file:
        _readable("mqtt.cert_file", cfg.cert_file)
        if cfg.key_file:
            _readable("mqtt.key_file", cfg.key_file)
        try:
            ctx.load_cert_chain(cfg.cert_file, cfg.key_file or None, password=_no_passphrase)
        except ssl.SSLError as exc:
            what = f"mqtt.cert_file {cfg.cert_file}" + (f" with mqtt.key_file {cfg.key_file}" if cfg.key_file else "")
            raise ConfigError(f"{what}: not a PEM certificate and its private key ({_ssl_reason(exc)})") from None
    return ctx


def _ssl_reason(exc: Exception) -> str:
    return getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def prepare(cfg: MqttConfig) -> Login:
    """Read the password file and the TLS files at start: any problem is a ConfigError (exit 78, one line)."""
    password = read_password(cfg.password_file) if cfg.password_file else None
    tls = tls_context(cfg) if cfg.ca_file else None
    return Login(password, tls)


# --- topics and discovery ------------------------------------------------------------


@dataclass(frozen=True)
class Topics:
    prefix: str

    @property
    def availability(self) -> str:
        return f"{self.prefix}/availability"

    @property
    def events(self) -> str:
        return f"{self.prefix}/events"

    @property
    def status(self) -> str:
        return f"{self.prefix}/status"

    def count(self, label: str) -> str:
        return f"{self.prefix}/{label}/count"

    def presence(self, label: str) -> str:
        return f"{self.prefix}/{label}/presence"

    def snapshot(self, label: str) -> str:
        return f"{self.prefix}/{label}/snapshot"


def discovery_messages(cfg: MqttConfig, class_names: Sequence[str], *, snapshots: bool, model: str = "",
                       version: str = __version__) -> list[tuple[str, dict[str, Any]]]:
    """Home Assistant discovery: (config topic, payload) for every entity of this camera."""
    node = slug(client_id(cfg))
    topics = Topics(topic_prefix(cfg))
    device = {
        "identifiers": [node],
        "name": f"xnorcam {hostname()}",
        "manufacturer": "xnorcam",
        "model": f"binary detector ({model or 'person.xnc'})",
        "sw_version": version,
    }
    common = {
        "device": device,
        "origin": {"name": "xnorcam", "sw_version": version},
        "availability_topic": topics.availability,
        "payload_available": ONLINE,
        "payload_not_available": OFFLINE,
        "qos": min(cfg.qos, 1),
    }
    out: list[tuple[str, dict[str, Any]]] = []

    def add(component: str, object_id: str, payload: dict[str, Any]) -> None:
        uid = f"{node}_{object_id}"
        out.append((f"{cfg.discovery_prefix}/{component}/{node}/{object_id}/config",
                    {**payload, "unique_id": uid, **common}))

    for name in class_names:
        label = slug(name)
        title = name[:1].upper() + name[1:]
        add("binary_sensor", f"{label}_presence", {
            "name": f"{title} presence", "device_class": "occupancy", "state_topic": topics.presence(label),
            "payload_on": ON, "payload_off": OFF,
        })
        add("sensor", f"{label}_count", {
            "name": f"{title} count", "state_topic": topics.count(label), "state_class": "measurement",
            "icon": "mdi:account-multiple",
        })
        if snapshots:
            add("image", f"{label}_snapshot", {
                "name": f"{title} snapshot", "image_topic": topics.snapshot(label), "content_type": "image/jpeg",
            })
    expire = max(int(cfg.status_interval_s * 3) + 1, 10)
    add("sensor", "fps", {
        "name": "Frames per second", "state_topic": topics.status, "value_template": "{{ value_json.fps }}",
        "unit_of_measurement": "fps", "state_class": "measurement", "entity_category": "diagnostic",
        "expire_after": expire, "icon": "mdi:speedometer",
    })
    add("sensor", "detect_ms", {
        "name": "Detect time", "state_topic": topics.status, "value_template": "{{ value_json.detect_ms }}",
        "unit_of_measurement": "ms", "device_class": "duration", "state_class": "measurement",
        "entity_category": "diagnostic", "expire_after": expire,
    })
    return out


# --- the outbox: what the pipeline hands over, in order ---------------------------------


class SnapshotRef:
    """A snapshot's path; the JPEG is read by the MQTT thread, never by the pipeline."""

    __slots__ = ("path",)

    def __init__(self, path: str) -> None:
        self.path = path

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SnapshotRef) and other.path == self.path


class Outbox:
    """What waits for the broker, numbered in the order it was made; thread-safe (the pipeline puts, the MQTT thread takes).

    Events and state changes (counts, presence, availability, discovery) wait in one bounded deque, so
    they go out in the order they happened; past ``max_events`` the oldest entry is dropped (an event
    is counted in ``dropped``; a state change is not lost, its topic's latest value is sent instead).
    The latest value of every retained topic is kept apart: ``resend_state`` sends them all again after
    a reconnect. Snapshots and the status line are coalesced: only the latest is sent.
    """

    def __init__(self, max_events: int) -> None:
        self.max_events = max(1, int(max_events))
        self._lock = threading.Lock()
        self._queue: collections.deque[tuple[int, str, Any, bool, bool]] = collections.deque()
        self._state: dict[str, list[Any]] = {}  # topic -> [seq, payload, retain]: the latest value
        self._dirty: set[str] = set()  # topics whose latest value is to be sent
        self._seq = 0
        self.dropped = 0
        self.events_in = 0

    def _append(self, topic: str, payload: Any, retain: bool, is_event: bool) -> None:
        if len(self._queue) >= self.max_events:
            _, old_topic, _, _, old_is_event = self._queue.popleft()
            if old_is_event:
                self.dropped += 1
            else:
                self._dirty.add(old_topic)
        self._queue.append((self._seq, topic, payload, retain, is_event))

    def put_event(self, topic: str, payload: bytes) -> None:
        with self._lock:
            self._seq += 1
            self._append(topic, payload, False, True)
            self.events_in += 1

    def put_state(self, topic: str, payload: Any, retain: bool = True, coalesce: bool = False) -> bool:
        """Set a topic's value; False (and nothing queued) when it already has that value."""
        with self._lock:
            old = self._state.get(topic)
            if old is not None and old[1] == payload and old[2] == retain:
                return False
            self._seq += 1
            self._state[topic] = [self._seq, payload, retain]
            if coalesce:
                self._dirty.add(topic)
            else:
                self._append(topic, payload, retain, False)
            return True

    def take(self) -> tuple[str, Any, bool, bool] | None:
        """(topic, payload, retain, is_event) of the oldest entry waiting, or None."""
        with self._lock:
            best = None
            for topic in self._dirty:
                if best is None or self._state[topic][0] < self._state[best][0]:
                    best = topic
            if self._queue and (best is None or self._queue[0][0] <= self._state[best][0]):
                seq, topic, payload, retain, is_event = self._queue.popleft()
                if not is_event and topic in self._dirty and self._state[topic][0] == seq:
                    self._dirty.discard(topic)  # this is the latest value: it needs no second sending
                return topic, payload, retain, is_event
            if best is None:
                return None
            self._dirty.discard(best)
            _, payload, retain = self._state[best]
            if not retain:  # a status line is sent once, not repeated after a reconnect
                del self._state[best]
            return best, payload, retain, False

    def resend_state(self) -> None:
        """After a (re)connect every retained topic goes out again, in the order its value was set."""
        with self._lock:
            self._dirty.update(t for t, (_, _, retain) in self._state.items() if retain)

    def pending(self) -> int:
        with self._lock:
            return len(self._queue) + len(self._dirty)

    def queued_events(self) -> int:
        with self._lock:
            return sum(1 for entry in self._queue if entry[4])


# --- the publisher -----------------------------------------------------------------------


class NullMqtt:
    """MQTT off: the log sink is left as it is, nothing is published."""

    enabled = False
    fatal: str | None = None

    def tee(self, log_sink: Any) -> Any:
        return log_sink

    def close(self, timeout: float = CLOSE_TIMEOUT_S) -> None:
        pass


class MqttPublisher:
    def __init__(
        self,
        cfg: MqttConfig,
        class_names: Sequence[str],
        login: Login | None = None,
        *,
        stop: threading.Event | None = None,
        tracks: bool = True,
        snapshots: bool = False,
        model: str = "",
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self.login = login or Login()
        self.stop = stop
        self.tracks = tracks
        self.snapshots = snapshots and cfg.snapshots
        self.model = model
        self.connect_timeout_s = connect_timeout_s
        self.clock = clock
        self.labels = {name: slug(name) for name in class_names}
        self.topics = Topics(topic_prefix(cfg))
        self.client_id = client_id(cfg)
        self.outbox = Outbox(cfg.queue_max)
        self.enabled = True
        self.fatal: str | None = None
        # counters (read by tests, the status line and the stop summary)
        self.connects = 0
        self.connect_failures = 0
        self.disconnects = 0
        self.published = 0
        self.last_error: str | None = None
        self.connected = threading.Event()
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # counts and presence: the pipeline sets them, the thread ends presence
        self._counts = dict.fromkeys(self.labels.values(), 0)
        self._present = dict.fromkeys(self.labels.values(), False)
        self._zero_since: dict[str, float | None] = dict.fromkeys(self.labels.values())
        self._status = {"fps": 0.0, "dropped": 0, "detect_sum": 0.0, "detect_n": 0, "processed": 0}
        self._started_at = clock()
        self._detect_ms: float | None = None
        self._next_status = 0.0
        self._inflight = 0
        self._ever_connected = False
        self._outage_since: float | None = None
        self._connack: Any = None
        self._client = self._make_client()

    # --- setup ---

    def _make_client(self) -> paho.Client:
        c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=self.client_id, clean_session=True,
                        protocol=paho.MQTTv311)
        c.max_inflight_messages_set(WINDOW)
        c.max_queued_messages_set(0)
        if self.cfg.username:
            c.username_pw_set(self.cfg.username, self.login.password)
        if self.login.tls is not None:
            c.tls_set_context(self.login.tls)
        c.will_set(self.topics.availability, OFFLINE, qos=min(self.cfg.qos, 1), retain=True)
        c.on_connect = self._on_connect
        c.on_publish = self._on_publish
        c.connect_timeout = self.connect_timeout_s
        c.suppress_exceptions = True
        return c

    def start(self) -> MqttPublisher:
        """Queue discovery, availability and the initial state, then start the thread."""
        # discovery = false: empty retained payloads, which make Home Assistant remove the entities
        for topic, payload in discovery_messages(self.cfg, list(self.labels), snapshots=self.snapshots,
                                                 model=self.model):
            body = json.dumps(payload, separators=(",", ":")).encode() if self.cfg.discovery else b""
            self.outbox.put_state(topic, body)
        self.outbox.put_state(self.topics.availability, ONLINE.encode())
        for label in self.labels.values():
            self.outbox.put_state(self.topics.count(label), b"0")
            self.outbox.put_state(self.topics.presence(label), OFF.encode())
        return self._launch()

    def _launch(self) -> MqttPublisher:
        self._thread = threading.Thread(target=self._run, name="xnorcam-mqtt", daemon=True)
        self._thread.start()
        return self

    def tee(self, log_sink: Any) -> MqttTee:
        return MqttTee(log_sink, self)

    # --- the pipeline's side: a lock, a few numbers, the outbox ---

    def frame(self, record: dict[str, Any]) -> None:
        """A frame line: the status numbers, and the counts when there are no tracks."""
        s = self._status
        s["fps"] = record.get("fps", 0.0)
        s["dropped"] = record.get("dropped", 0)
        s["detect_sum"] += record.get("detect_ms", 0.0)
        s["detect_n"] += 1
        s["processed"] += 1
        if self.tracks:
            return
        counts = dict.fromkeys(self._counts, 0)
        for d in record.get("detections", ()):
            label = self.labels.get(d.get("label"))
            if label is not None:
                counts[label] += 1
        now = self.clock()
        for label, n in counts.items():
            if n != self._counts[label]:
                self._set_count(label, n, now)

    def event(self, record: dict[str, Any]) -> None:
        """An event line: published as JSON; enter and leave move the counts; a snapshot becomes retained."""
        line = {"v": SCHEMA_VERSION, "time": utc_now_iso(), **record}
        self.outbox.put_event(self.topics.events, json.dumps(line, separators=(",", ":")).encode())
        label = self.labels.get(record.get("label"))
        if label is None:
            return
        kind = record.get("event")
        if self.tracks and kind in ("enter", "leave"):
            n = self._counts[label] + (1 if kind == "enter" else -1)
            self._set_count(label, max(n, 0), self.clock())
        path = record.get("snapshot")
        if self.snapshots and path:
            self.outbox.put_state(self.topics.snapshot(label), SnapshotRef(path), coalesce=True)

    def _set_count(self, label: str, n: int, now: float) -> None:
        with self._lock:
            self._counts[label] = n
            self.outbox.put_state(self.topics.count(label), str(n).encode())
            if n > 0:
                self._zero_since[label] = None
                if not self._present[label]:
                    self._present[label] = True
                    self.outbox.put_state(self.topics.presence(label), ON.encode())
            elif self._zero_since[label] is None:
                self._zero_since[label] = now
                if self.cfg.presence_hold_s == 0:
                    self._end_presence(now)

    def _end_presence(self, now: float, force: bool = False) -> None:
        """OFF for each class whose count has been 0 for the hold-off (all of them with ``force``); under _lock."""
        for label, since in self._zero_since.items():
            if self._present[label] and since is not None and (force or now - since >= self.cfg.presence_hold_s):
                self._present[label] = False
                self.outbox.put_state(self.topics.presence(label), OFF.encode())

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    # --- the MQTT thread ---

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        self._connack = reason_code

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        self._inflight = max(0, self._inflight - 1)
        self.published += 1

    def _run(self) -> None:
        delay = self.cfg.reconnect_min_s
        c = self._client
        c.connect_async(self.cfg.host, self.cfg.port, self.cfg.keepalive_s)
        up = False
        while not self._closing.is_set():
            ok = self._connect()
            if self.fatal is not None:
                break
            if not ok:
                self.connect_failures += 1
                if self._closing.wait(delay):
                    break
                delay = min(delay * 2, self.cfg.reconnect_max_s)
                continue
            delay = self.cfg.reconnect_min_s
            up = self._serve()
        if up:
            self._finish()
        # else: the broker has the last will (offline) from the lost connection, if there was one

    def _connect(self) -> bool:
        c = self._client
        self._connack = None
        try:
            c.reconnect()
        except (OSError, ssl.SSLError, ValueError) as exc:
            self._failed(self._explain(exc))
            return False
        deadline = self.clock() + self.connect_timeout_s
        while self._connack is None and not self._closing.is_set():
            if c.loop(0.05) != paho.MQTT_ERR_SUCCESS and self._connack is None:
                self._failed("the connection closed before the broker answered")
                return False
            if self.clock() > deadline:
                self._failed(f"no answer from the broker within {self.connect_timeout_s:g} s")
                return False
        rc = self._connack
        if rc is None:
            return False
        if rc.is_failure:
            value = getattr(rc, "value", None)
            what = AUTH_REFUSALS.get(value, str(rc))
            user = f" of user {self.cfg.username!r}" if self.cfg.username else " without a user name"
            message = f"mqtt: the broker {self._where()} refused the login{user}: {what}"
            if value in AUTH_REFUSALS and not self._ever_connected:
                self.fatal = message + " (check mqtt.username and the file named by mqtt.password_file)"
                if self.stop is not None:
                    self.stop.set()
            else:
                self._failed(message)
            return False
        return True

    def _where(self) -> str:
        return f"{self.cfg.host}:{self.cfg.port}"

    def _explain(self, exc: BaseException) -> str:
        text = f"{type(exc).__name__}: {getattr(exc, 'strerror', None) or exc}"
        if isinstance(exc, OSError) and exc.errno == errno.EAFNOSUPPORT:
            text += (" (the service's sandbox has no network: run deploy/install.sh again after turning [mqtt] on, "
                     "it adds the network drop-in)")
        return text

    def _failed(self, why: str) -> None:
        self.last_error = why
        if self._outage_since is None:
            self._outage_since = self.clock()
            log.warning("mqtt: cannot reach the broker %s (%s); retrying every %g..%g s, detection goes on",
                        self._where(), why, self.cfg.reconnect_min_s, self.cfg.reconnect_max_s)

    def _serve(self) -> bool:
        """Publish until the connection is lost (False) or the publisher is closed (True)."""
        c = self._client
        self.connects += 1
        self._ever_connected = True
        if self.cfg.qos == 0:
            self._inflight = 0  # QoS 0 messages in flight at the break were lost with it
        if self._outage_since is not None:
            log.warning("mqtt: connected to %s again after %.1f s; %d events waiting, %d dropped so far",
                        self._where(), self.clock() - self._outage_since, self.outbox.queued_events(),
                        self.outbox.dropped)
            self._outage_since = None
        elif self.connects == 1:
            log.info("mqtt: connected to %s as %s, topics under %s", self._where(), self.client_id, self.topics.prefix)
        self.outbox.resend_state()
        self.connected.set()
        try:
            while not self._closing.is_set():
                self._tick()
                self._pump()
                busy = self._inflight < WINDOW and self.outbox.pending() > 0
                if c.loop(0.0 if busy else 0.05) != paho.MQTT_ERR_SUCCESS or not c.is_connected():
                    self.disconnects += 1
                    self._failed("the connection was lost")
                    return False
            return True
        finally:
            self.connected.clear()

    def _tick(self) -> None:
        now = self.clock()
        with self._lock:
            self._end_presence(now)
        if now >= self._next_status:
            self._next_status = now + self.cfg.status_interval_s
            self.outbox.put_state(self.topics.status, self._status_payload(now), retain=False, coalesce=True)

    def _status_payload(self, now: float) -> bytes:
        s = self._status
        n, total = s["detect_n"], s["detect_sum"]
        if n:  # the mean over the frames since the last status line; without frames, the last one stays
            s["detect_n"], s["detect_sum"] = 0, 0.0
            self._detect_ms = round(total / n, 1)
        return json.dumps({
            "fps": round(float(s["fps"]), 2), "detect_ms": self._detect_ms,
            "dropped": s["dropped"], "processed": s["processed"], "uptime_s": round(now - self._started_at, 1),
            "mqtt_queued": self.outbox.queued_events(), "mqtt_dropped": self.outbox.dropped,
            "mqtt_reconnects": max(0, self.connects - 1),
        }, separators=(",", ":")).encode()

    def _pump(self) -> None:
        c = self._client
        qos = self.cfg.qos
        while self._inflight < WINDOW:
            item = self.outbox.take()
            if item is None:
                return
            topic, payload, retain, _ = item
            if isinstance(payload, SnapshotRef):
                try:
                    with open(payload.path, "rb") as f:
                        payload = f.read()
                except OSError:
                    continue  # deleted by retention before it could be sent: a newer one follows
            self._inflight += 1
            info = c.publish(topic, payload, qos=qos, retain=retain)
            if info.rc == paho.MQTT_ERR_NO_CONN and qos == 0:
                self._inflight -= 1

    def _finish(self) -> None:
        """Stopping: presence off, offline, what is queued flushed for a moment, then a clean disconnect."""
        c = self._client
        if not self.retiring:
            with self._lock:
                self._end_presence(self.clock(), force=True)
            self.outbox.put_state(self.topics.availability, OFFLINE.encode())
        deadline = self.clock() + self._close_budget
        while self.clock() < deadline and (self.outbox.pending() or self._inflight):
            self._pump()
            if c.loop(0.02) != paho.MQTT_ERR_SUCCESS:
                return
        c.disconnect()
        for _ in range(5):
            if c.loop(0.02) != paho.MQTT_ERR_SUCCESS:
                break

    _close_budget = CLOSE_TIMEOUT_S
    retiring = False  # clear_published: nothing is said at the end

    def close(self, timeout: float = CLOSE_TIMEOUT_S) -> None:
        """Stop the thread after flushing for at most ``timeout`` seconds (never blocks longer than that and a bit)."""
        self._close_budget = timeout
        self._closing.set()
        if self._thread is not None:
            self._thread.join(timeout + self.connect_timeout_s + 1.0)
            log.info("mqtt: stopped: %s", self.summary())

    def summary(self) -> str:
        return (f"mqtt connects={self.connects} failures={self.connect_failures} published={self.published} "
                f"events={self.outbox.events_in} dropped={self.outbox.dropped}")


def clear_published(cfg: MqttConfig, class_names: Sequence[str], login: Login | None = None,
                    timeout_s: float = 10.0) -> str | None:
    """Remove what this camera leaves on the broker: its discovery (Home Assistant drops the device and its
    entities) and every retained topic. None when the broker acknowledged it all, else why not."""
    pub = MqttPublisher(cfg, class_names, login, snapshots=True, connect_timeout_s=min(timeout_s, CONNECT_TIMEOUT_S))
    pub.retiring = True
    topics = [t for t, _ in discovery_messages(cfg, class_names, snapshots=True)] + [pub.topics.availability]
    for label in pub.labels.values():
        topics += [pub.topics.count(label), pub.topics.presence(label), pub.topics.snapshot(label)]
    for topic in topics:
        pub.outbox.put_state(topic, b"")  # an empty retained message deletes the retained one
    pub._launch()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and pub.fatal is None and (
            not pub.connected.is_set() or pub.outbox.pending() or pub._inflight):
        time.sleep(0.02)
    done = pub.connects > 0 and not pub.outbox.pending() and not pub._inflight
    pub.close(1.0)
    if pub.fatal is not None:
        return pub.fatal
    if pub.connects == 0:
        return f"mqtt: cannot reach the broker {cfg.host}:{cfg.port} ({pub.last_error or 'no answer'})"
    return None if done else "mqtt: the broker did not acknowledge every deletion in time"


class MqttTee:
    """A log sink that also hands every frame line and event line to MQTT (never raising into the pipeline)."""

    def __init__(self, log_sink: Any, mqtt: MqttPublisher) -> None:
        self.log = log_sink
        self.mqtt = mqtt
        self.mqtt_failures = 0

    def write(self, record: dict[str, Any]) -> bool:
        try:
            self.mqtt.frame(record)
        except Exception:
            self._failed()
        return self.log.write(record)

    def event(self, record: dict[str, Any]) -> bool:
        try:
            self.mqtt.event(record)
        except Exception:
            self._failed()
        return self.log.event(record)

    def _failed(self) -> None:
        self.mqtt_failures += 1
        if self.mqtt_failures == 1:
            log.warning("mqtt: a record could not be queued; detection goes on", exc_info=True)

    def close(self) -> None:
        self.log.close()

    def __getattr__(self, name: str) -> Any:  # lines, failures, path, ...
        return getattr(self.log, name)


def open_mqtt(cfg: MqttConfig, class_names: Sequence[str], login: Login | None, *, stop: threading.Event | None,
              tracks: bool, snapshots: bool, model: str = "") -> MqttPublisher | NullMqtt:
    if not cfg.enabled:
        return NullMqtt()
    return MqttPublisher(cfg, class_names, login, stop=stop, tracks=tracks, snapshots=snapshots, model=model).start()
