"""The camera app's configuration: frozen dataclasses loaded strictly from TOML.

One file (``/etc/xnorcam/config.toml`` when it exists, else the built-in
defaults, or ``--config FILE``), then command-line overrides. Anything that is
not understood is refused with a ``ConfigError`` naming the key, the value and
what is allowed, before the camera is opened: a typo in a config file must
never silently fall back to a default on an unattended camera.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from app.geometry import Point, orient, segments_meet
from app.limits import toml_too_deep

DEFAULT_CONFIG_PATH = Path("/etc/xnorcam/config.toml")

SOURCE_KINDS = ("auto", "demo", "picamera2", "images", "opencv")
PREVIEW_MODES = ("auto", "drm", "window", "browser", "none")
WEB_AUTH = ("none", "token", "basic")


class ConfigError(ValueError):
    """The configuration (file or flags) is not acceptable; the message says why."""


@dataclass(frozen=True)
class SourceConfig:
    spec: str = "auto"
    fps: float = 15.0
    loop: bool = False
    width: int = 320
    height: int = 240
    preview_width: int = 640
    preview_height: int = 480
    camera_num: int = 0
    hang_timeout_s: float = 5.0
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    # The most pixels an image file or a video's frames may declare, checked before decoding: 25 MP holds a
    # 24 MP photo and the Pi cameras' 12 MP stills, and its 75 MB decode fits a 512 MB Pi once.
    max_pixels: int = 25_000_000


@dataclass(frozen=True)
class DetectorConfig:
    model: str = ""
    # One: it already detects at 20-31 fps on the Zero 2 W (the camera gives 15), and a split frame waits for every
    # worker at each of its ~10 parallel calls, so when anything else wants the cores (capture, the overlay, the web
    # encoder, another program) two threads took 84 ms where one took 2.2. More help a Pi with nothing else to do.
    # ARCHITECTURE.md ("Threads") has the figures.
    threads: int = 1
    score_threshold: float | None = None
    class_thresholds: dict[str, float] = field(default_factory=dict)
    nms_iou: float | None = None
    max_detections: int = 100
    classes: tuple[str, ...] = ()


@dataclass(frozen=True)
class PreviewConfig:
    mode: str = "auto"
    record: str = ""
    record_fps: float = 10.0
    # A recording is finished at this size and the next one started (0 = never split); `record_files` are kept
    # in all (rec.mp4, rec.1.mp4 ...), so neither a restart nor a long run loses what was recorded or fills the disk.
    record_max_mb: float = 256.0
    record_files: int = 5
    hud: bool = True


@dataclass(frozen=True)
class LogConfig:
    path: str = ""
    only_detections: bool = False
    only_events: bool = False
    max_mb: float = 10.0
    files: int = 5


@dataclass(frozen=True)
class TrackerConfig:
    enabled: bool = True
    confirm_hits: int = 5
    confirm_frames: int = 7
    lost_after_s: float = 2.0
    low_score: float = 0.5
    match_iou: float = 0.2
    max_tracks: int = 32


@dataclass(frozen=True)
class EventsConfig:
    update_every_s: float = 0.0
    zones: dict[str, tuple[Point, ...]] = field(default_factory=dict)
    only_in_zones: tuple[str, ...] = ()
    line: tuple[Point, ...] = ()
    snapshot_dir: str = ""
    snapshot_max_files: int = 100
    snapshot_max_mb: float = 20.0


@dataclass(frozen=True)
class MqttConfig:
    """MQTT and Home Assistant discovery (app/mqtt.py): off unless enabled."""

    enabled: bool = False
    host: str = ""
    port: int = 1883
    client_id: str = ""  # "" = xnorcam-<hostname>
    topic_prefix: str = ""  # "" = xnorcam/<hostname>
    keepalive_s: int = 60
    qos: int = 1
    username: str = ""
    password_file: str = ""
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    discovery: bool = True
    discovery_prefix: str = "homeassistant"
    status_interval_s: float = 10.0
    presence_hold_s: float = 3.0
    queue_max: int = 1000
    snapshots: bool = True
    reconnect_min_s: float = 1.0
    reconnect_max_s: float = 60.0


@dataclass(frozen=True)
class WatchdogConfig:
    idle_grace_s: float = 10.0
    status_interval_s: float = 1.0


@dataclass(frozen=True)
class WebConfig:
    """The web preview (app/web.py): off unless enabled; beyond the loopback only with a secret."""

    enabled: bool = False
    listen: str = "127.0.0.1:8080"
    auth: str = "none"
    secret_file: str = ""
    user: str = "xnorcam"
    fps: float = 5.0
    width: int = 320
    quality: int = 70
    max_clients: int = 4
    events: int = 20


@dataclass(frozen=True)
class Config:
    source: SourceConfig = field(default_factory=SourceConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    preview: PreviewConfig = field(default_factory=PreviewConfig)
    log: LogConfig = field(default_factory=LogConfig)
    watchdog: WatchdogConfig = field(default_factory=WatchdogConfig)
    tracker: TrackerConfig = field(default_factory=TrackerConfig)
    events: EventsConfig = field(default_factory=EventsConfig)
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    web: WebConfig = field(default_factory=WebConfig)


_SECTIONS: dict[str, type] = {
    "source": SourceConfig,
    "detector": DetectorConfig,
    "preview": PreviewConfig,
    "log": LogConfig,
    "watchdog": WatchdogConfig,
    "tracker": TrackerConfig,
    "events": EventsConfig,
    "mqtt": MqttConfig,
    "web": WebConfig,
}


# --- per-key rules -----------------------------------------------------------
# Each rule: (kind, detail). Kinds: "float" (lo, hi, lo_open), "float0" (lo, hi, what 0 means: 0, else lo..hi),
# "int" (lo, hi), "path" (a file or folder name: no NUL or control character, at most PATH_MAX bytes),
# "bool", "str", "choice" (values), "optfloat" (lo, hi, lo_open), "classmap",
# "names", "zones" (name = polygon), "line" (two points), "listen" (HOST:PORT), "username".
# Ranges are inclusive unless lo_open. A positive lower bound is where a smaller value would stop meaning
# what it says: a duration under 1 ms is a busy loop, log.max_mb = 1e-7 rounds to 0 bytes ("never rotate").

_RULES: dict[str, tuple[str, Any]] = {
    "source.spec": ("sourcespec", None),
    "source.fps": ("float0", (0.01, 1000.0, "every frame, unpaced")),
    "source.loop": ("bool", None),
    "source.width": ("int", (16, 4096)),
    "source.height": ("int", (16, 4096)),
    "source.preview_width": ("int", (16, 4096)),
    "source.preview_height": ("int", (16, 4096)),
    "source.camera_num": ("int", (0, 16)),
    "source.hang_timeout_s": ("float", (0.001, 3600.0, False)),
    "source.backoff_initial_s": ("float", (0.001, 3600.0, False)),
    "source.backoff_max_s": ("float", (0.001, 3600.0, False)),
    "source.max_pixels": ("int", (256, 2**30)),
    "detector.model": ("path", None),
    "detector.threads": ("int", (1, 64)),
    "detector.score_threshold": ("optfloat", (0.0, 1.0, True)),
    "detector.class_thresholds": ("classmap", None),
    "detector.nms_iou": ("optfloat", (0.0, 1.0, True)),
    "detector.max_detections": ("int", (1, 10000)),
    "detector.classes": ("names", None),
    "preview.mode": ("choice", PREVIEW_MODES),
    "preview.record": ("path", None),
    "preview.record_fps": ("float", (0.1, 240.0, False)),
    "preview.record_max_mb": ("float0", (0.001, 1e6, "never split")),
    "preview.record_files": ("int", (1, 1000)),
    "preview.hud": ("bool", None),
    "log.path": ("path", None),
    "log.only_detections": ("bool", None),
    "log.only_events": ("bool", None),
    "log.max_mb": ("float0", (0.001, 1e6, "never rotate")),
    "log.files": ("int", (1, 1000)),
    "watchdog.idle_grace_s": ("float", (0.0, 86400.0, False)),
    "watchdog.status_interval_s": ("float", (0.001, 3600.0, False)),
    "tracker.enabled": ("bool", None),
    "tracker.confirm_hits": ("int", (1, 32)),
    "tracker.confirm_frames": ("int", (1, 32)),
    "tracker.lost_after_s": ("float", (0.0, 3600.0, False)),
    "tracker.low_score": ("float", (0.0, 1.0, True)),
    "tracker.match_iou": ("float", (0.0, 1.0, True)),
    "tracker.max_tracks": ("int", (1, 1000)),
    "events.update_every_s": ("float", (0.0, 86400.0, False)),
    "events.zones": ("zones", None),
    "events.only_in_zones": ("names", None),
    "events.line": ("line", None),
    "events.snapshot_dir": ("path", None),
    "events.snapshot_max_files": ("int", (1, 1_000_000)),
    "events.snapshot_max_mb": ("float", (0.001, 1e6, False)),
    "mqtt.enabled": ("bool", None),
    "mqtt.host": ("host", None),
    "mqtt.port": ("int", (1, 65535)),
    "mqtt.client_id": ("clientid", None),
    "mqtt.topic_prefix": ("topic", None),
    "mqtt.keepalive_s": ("int", (5, 3600)),
    "mqtt.qos": ("int", (0, 2)),
    "mqtt.username": ("str", None),
    "mqtt.password_file": ("path", None),
    "mqtt.ca_file": ("path", None),
    "mqtt.cert_file": ("path", None),
    "mqtt.key_file": ("path", None),
    "mqtt.discovery": ("bool", None),
    "mqtt.discovery_prefix": ("topic", None),
    "mqtt.status_interval_s": ("float", (0.001, 86400.0, False)),
    "mqtt.presence_hold_s": ("float", (0.0, 3600.0, False)),
    "mqtt.queue_max": ("int", (1, 100_000)),
    "mqtt.snapshots": ("bool", None),
    "mqtt.reconnect_min_s": ("float", (0.001, 3600.0, False)),
    "mqtt.reconnect_max_s": ("float", (0.001, 3600.0, False)),
    "web.enabled": ("bool", None),
    "web.listen": ("listen", None),
    "web.auth": ("choice", WEB_AUTH),
    "web.secret_file": ("path", None),
    "web.user": ("username", None),
    "web.fps": ("float", (0.01, 30.0, False)),
    "web.width": ("int", (64, 4096)),
    "web.quality": ("int", (10, 100)),
    "web.max_clients": ("int", (1, 64)),
    "web.events": ("int", (1, 500)),
}

MAX_ZONES = 32
# A host name (RFC 1123 labels) or an IP address; no scheme, port or path.
_HOSTNAME_RE = re.compile(r"^(?=.{1,253}\.?$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                          r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$")
# Keys whose value is never echoed in a message, whatever section they are found in.
_SECRET_KEY_RE = re.compile(r"pass|secret|token|credential", re.I)
MAX_ZONE_POINTS = 64


def _shown(value: Any, limit: int = 80) -> str:
    """repr(value), cut to ``limit`` characters: a message stays one short line whatever the file holds."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _range_text(lo: float, hi: float, lo_open: bool = False) -> str:
    return f"a number {'>' if lo_open else '>='} {lo:g} and <= {hi:g}"


def _check_number(key: str, value: Any, lo: float, hi: float, lo_open: bool, integer: bool) -> float | int:
    # bool is an int in Python; `threads = true` must not mean 1.
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"{key} = {_shown(value)} is not allowed: expected {kind} ({_range_text(lo, hi, lo_open)})")
    if not integer:
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{key} = {_shown(value)} is not allowed: expected {_range_text(lo, hi, lo_open)}")
    if value < lo or value > hi or (lo_open and value == lo):
        raise ConfigError(f"{key} = {_shown(value)} is out of range: expected {_range_text(lo, hi, lo_open)}")
    return value


PATH_MAX = 4096


def check_path(key: str, value: Any) -> str:
    """A file or folder name ("" = none): a string the OS can take, said in one line when it cannot."""
    if not isinstance(value, str):
        raise ConfigError(f"{key} = {_shown(value)} is not allowed: expected a path (a string)")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ConfigError(f"{key} = {_shown(value)} is not allowed: a path cannot hold a NUL or another control "
                          f"character")
    try:
        size = len(os.fsencode(value))
    except UnicodeError:
        raise ConfigError(f"{key} = {_shown(value)} is not allowed: not a path this system can encode") from None
    if size >= PATH_MAX:
        raise ConfigError(f"{key}: a path of {size} bytes is too long (under {PATH_MAX})")
    return value


def check_source_spec(key: str, value: str) -> str:
    """Validate a source spec string's shape (not whether the device exists)."""
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key} = {_shown(value)} is not allowed: expected one of {', '.join(_SPEC_FORMS)}")
    kind, _, arg = value.partition(":")
    if kind not in SOURCE_KINDS:
        raise ConfigError(f"{key} = {_shown(value)} is not allowed: expected one of {', '.join(_SPEC_FORMS)}")
    if kind in ("images", "opencv") and not arg:
        raise ConfigError(f"{key} = {_shown(value)} is not allowed: '{kind}:' needs a target, e.g. {_SPEC_EXAMPLE[kind]}")
    if kind in ("auto", "demo", "picamera2") and arg:
        raise ConfigError(f"{key} = {_shown(value)} is not allowed: '{kind}' takes no ':' argument")
    if arg:
        check_path(key, arg)
    return value


_SPEC_FORMS = ("auto", "demo", "picamera2", "images:<dir or glob>", "opencv:<file|index|url>")
_SPEC_EXAMPLE = {"images": "images:photos/ or images:'photos/*.jpg'", "opencv": "opencv:0 or opencv:clip.mp4"}


def parse_listen(key: str, value: Any) -> tuple[str, int]:
    """'HOST:PORT' ('[::1]:8080' for IPv6) -> (host, port); port 0 = any free port."""
    what = "HOST:PORT, e.g. \"127.0.0.1:8080\", \"0.0.0.0:8080\" or \"[::1]:8080\""
    if not isinstance(value, str):
        raise ConfigError(f"{key} = {_shown(value)} is not allowed: expected {what}")
    host, sep, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        sep = ""  # a bare IPv6 address: its port is ambiguous
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535 or any(c in host for c in " /[]"):
        raise ConfigError(f"{key} = {_shown(value)} is not allowed: expected {what}")
    return host, int(port)


def is_loopback(host: str) -> bool:
    """True for localhost and 127.0.0.0/8, ::1: only this machine can reach a server bound there."""
    import ipaddress

    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: whatever it resolves to, treat it as reachable


def _check(key: str, value: Any) -> Any:
    kind, detail = _RULES[key]
    if kind == "float":
        return _check_number(key, value, *detail, integer=False)
    if kind == "int":
        lo, hi = detail
        return _check_number(key, value, lo, hi, False, integer=True)
    if kind == "float0":
        lo, hi, zero = detail
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0:
            return 0.0
        try:
            return _check_number(key, value, lo, hi, False, integer=False)
        except ConfigError:
            raise ConfigError(f"{key} = {_shown(value)} is not allowed: expected 0 ({zero}) or "
                              f"{_range_text(lo, hi)}") from None
    if kind == "path":
        return check_path(key, value)
    if kind == "optfloat":
        return None if value is None else _check_number(key, value, *detail, integer=False)
    if kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{key} = {_shown(value)} is not allowed: expected true or false")
        return value
    if kind == "str":
        if not isinstance(value, str):
            raise ConfigError(f"{key} = {_shown(value)} is not allowed: expected a string")
        return value
    if kind == "choice":
        if value not in detail:
            raise ConfigError(f"{key} = {_shown(value)} is not allowed: expected one of {', '.join(map(repr, detail))}")
        return value
    if kind == "sourcespec":
        return check_source_spec(key, value)
    if kind == "host":
        return check_host(key, value)
    if kind == "topic":
        return check_topic_prefix(key, value)
    if kind == "clientid":
        if not isinstance(value, str) or len(value) > 128 or any(ord(c) < 32 or c in "+#/" for c in value):
            raise ConfigError(f"{key} = {_shown(value)} is not allowed: expected up to 128 printable characters "
                              f"without '/', '+' or '#' (\"\" = xnorcam-<hostname>)")
        return value
    if kind == "listen":
        parse_listen(key, value)
        return value
    if kind == "username":
        if not isinstance(value, str) or not value or ":" in value or not value.isprintable():
            raise ConfigError(f"{key} = {_shown(value)} is not allowed: expected a user name without ':'")
        return value
    if kind == "names":
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
            raise ConfigError(f"{key} = {_shown(value)} is not allowed: expected a list of class names, e.g. [\"person\"]")
        return tuple(value)
    if kind == "zones":
        if not isinstance(value, dict):
            raise ConfigError(f"{key} = {_shown(value)} is not allowed: expected a table of name = [[x, y], ...] "
                              f"(a polygon in normalised image coordinates)")
        if len(value) > MAX_ZONES:
            raise ConfigError(f"{key}: {len(value)} zones is too many (at most {MAX_ZONES})")
        return {str(name): check_polygon(f"{key}.{name}", poly) for name, poly in value.items()}
    if kind == "line":
        if isinstance(value, (list, tuple)) and len(value) == 0:
            return ()
        points = _check_points(key, value, 2, 2, "a counting line [[x1, y1], [x2, y2]] or []")
        if points[0] == points[1]:
            raise ConfigError(f"{key} = {_shown(value)} is not allowed: the two ends of the line are the same point")
        return points
    if kind == "classmap":
        if not isinstance(value, dict):
            raise ConfigError(f"{key} = {_shown(value)} is not allowed: expected a table of class name = threshold")
        out = {}
        for name, thr in value.items():
            out[str(name)] = _check_number(f"{key}.{name}", thr, 0.0, 1.0, True, integer=False)
        return out
    raise AssertionError(kind)  # a rule kind without a checker is a bug here


def check_host(key: str, value: Any) -> str:
    """A broker host: a DNS name or an IP address, with no scheme, port or path (\"\" = none)."""
    if not isinstance(value, str):
        raise ConfigError(f"{key} = {_shown(value)} is not allowed: expected a host name or an IP address")
    if value == "":
        return value
    try:
        ipaddress.ip_address(value)
        return value
    except ValueError:
        pass
    if not _HOSTNAME_RE.match(value) or value.replace(".", "").isdigit():
        raise ConfigError(f"{key} = {_shown(value)} is not allowed: expected a host name or an IP address, "
                          f"e.g. \"homeassistant.local\" or \"192.168.1.10\" (no scheme, port or path; the port is "
                          f"{key.rsplit('.', 1)[0]}.port)")
    return value


def check_topic_prefix(key: str, value: Any) -> str:
    """An MQTT topic prefix: levels joined by '/', none empty, no wildcard, no leading '$' (\"\" = the default)."""
    if not isinstance(value, str):
        raise ConfigError(f"{key} = {_shown(value)} is not allowed: expected a topic such as \"xnorcam/garden\"")
    if value == "":
        return value
    bad = (len(value.encode()) > 200 or any(c in value for c in "+#\0") or value.startswith("$")
           or any(level == "" for level in value.split("/")) or any(ord(c) < 32 for c in value))
    if bad:
        raise ConfigError(f"{key} = {_shown(value)} is not allowed: expected topic levels joined by '/', none empty, "
                          f"without '+', '#' or control characters, not starting with '$', at most 200 bytes")
    return value


def _check_points(key: str, value: Any, least: int, most: int, what: str) -> tuple[Point, ...]:
    if not isinstance(value, (list, tuple)) or not least <= len(value) <= most:
        raise ConfigError(f"{key} = {_shown(value)} is not allowed: expected {what}")
    points = []
    for p in value:
        if (not isinstance(p, (list, tuple)) or len(p) != 2
                or not all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in p)):
            raise ConfigError(f"{key} = {_shown(value)} is not allowed: expected {what}; {p!r} is not a point [x, y]")
        x, y = float(p[0]), float(p[1])
        if not (0.0 <= x <= 1.0 and 0.0 <= y <= 1.0):  # NaN fails too
            raise ConfigError(f"{key}: point {[p[0], p[1]]!r} is out of range: coordinates are normalised, 0..1")
        points.append((x, y))
    return tuple(points)


def check_polygon(key: str, value: Any) -> tuple[Point, ...]:
    """A zone: 3..64 points in 0..1, a simple polygon (no edge crosses or touches another) with an area."""
    what = f"a polygon of 3 to {MAX_ZONE_POINTS} points [[x, y], ...] in normalised image coordinates"
    pts = _check_points(key, value, 3, MAX_ZONE_POINTS, what)
    n = len(pts)
    edges = [(pts[i], pts[(i + 1) % n]) for i in range(n)]
    for i in range(n):
        if edges[i][0] == edges[i][1]:
            raise ConfigError(f"{key} = {_shown(value)} is not allowed: point {(i + 1) % n + 1} repeats the one before it")
    for i in range(n):
        for j in range(i + 1, n):
            adjacent = j == i + 1 or (i == 0 and j == n - 1)
            if adjacent:
                # neighbours share one end; they must not fold back over each other
                a, b = edges[i], edges[j]
                shared, pi, pj = (a[1], a[0], b[1]) if j == i + 1 else (a[0], a[1], b[0])
                if orient(shared, pi, pj) == 0 and (pi[0] - shared[0]) * (pj[0] - shared[0]) + \
                        (pi[1] - shared[1]) * (pj[1] - shared[1]) > 0:
                    raise ConfigError(f"{key} = {_shown(value)} is not allowed: the polygon is self-intersecting "
                                      f"(edges {i + 1} and {j + 1} overlap)")
                continue
            if segments_meet(*edges[i], *edges[j]):
                raise ConfigError(f"{key} = {_shown(value)} is not allowed: the polygon is self-intersecting "
                                  f"(edges {i + 1} and {j + 1} cross)")
    area = sum(pts[i][0] * pts[(i + 1) % n][1] - pts[(i + 1) % n][0] * pts[i][1] for i in range(n)) / 2
    if abs(area) < 1e-9:
        raise ConfigError(f"{key} = {_shown(value)} is not allowed: the polygon has no area")
    return pts


def from_dict(data: dict[str, Any], where: str = "config") -> Config:
    """Build a Config from nested dicts (parsed TOML), refusing anything unknown."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a table of sections, got {type(data).__name__}")
    sections = {}
    for name, body in data.items():
        if name not in _SECTIONS:
            raise ConfigError(
                f"{where}: unknown section [{name}]; allowed sections: {', '.join(_SECTIONS)}"
            )
        if not isinstance(body, dict):
            raise ConfigError(f"{where}: {name} = {body!r} is not allowed: expected a [{name}] table")
        cls = _SECTIONS[name]
        allowed = [f.name for f in fields(cls)]
        values = {}
        for key, value in body.items():
            if key not in allowed:
                if _SECRET_KEY_RE.search(key):  # a secret typed into the file: never echo it
                    hint = (" (a password goes in a file of its own, readable only by the service user, named by "
                            "mqtt.password_file)" if name == "mqtt" else "")
                    raise ConfigError(f"{where}: unknown key {name}.{key} (value not shown){hint}; allowed keys in "
                                      f"[{name}]: {', '.join(allowed)}")
                raise ConfigError(
                    f"{where}: unknown key {name}.{key} (value {_shown(value)}); allowed keys in [{name}]: {', '.join(allowed)}"
                )
            try:
                values[key] = _check(f"{name}.{key}", value)
            except ConfigError as exc:
                raise ConfigError(f"{where}: {exc}") from None
        sections[name] = cls(**values)
    config = Config(**sections)
    try:
        _check_cross(config)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return config


def _check_cross(config: Config) -> None:
    s = config.source
    if s.backoff_max_s < s.backoff_initial_s:
        raise ConfigError(
            f"source.backoff_max_s = {s.backoff_max_s:g} is out of range: expected >= source.backoff_initial_s "
            f"({s.backoff_initial_s:g})"
        )
    if s.spec in ("auto", "picamera2") and (s.width > s.preview_width or s.height > s.preview_height):
        # picamera2 refuses it ("lores stream dimensions may not exceed main stream") at every reopen.
        raise ConfigError(
            f"source.width x source.height = {s.width}x{s.height} is out of range: the Pi camera's detection "
            f"stream may not exceed its main stream, source.preview_width x source.preview_height = "
            f"{s.preview_width}x{s.preview_height}"
        )
    t = config.tracker
    if t.confirm_hits > t.confirm_frames:
        raise ConfigError(
            f"tracker.confirm_hits = {t.confirm_hits} is out of range: a track is confirmed after N hits in the "
            f"last M frames, so expected <= tracker.confirm_frames ({t.confirm_frames})"
        )
    _check_mqtt(config.mqtt)
    e = config.events
    unknown = [z for z in e.only_in_zones if z not in e.zones]
    if unknown:
        raise ConfigError(
            f"events.only_in_zones: unknown zone(s) {', '.join(map(repr, unknown))}; zones in events.zones: "
            f"{', '.join(map(repr, e.zones)) or '(none)'}"
        )
    w = config.web
    if w.enabled:
        host, _ = parse_listen("web.listen", w.listen)
        if w.auth == "none" and not is_loopback(host):
            raise ConfigError(
                f"web.listen = {w.listen!r} is not allowed without authentication: beyond the loopback set "
                f"web.auth = \"token\" or \"basic\" and web.secret_file (a file readable only by the service user)"
            )
        if w.auth != "none" and not w.secret_file:
            raise ConfigError(f"web.secret_file is not set: web.auth = {w.auth!r} needs the file holding the secret")


def _check_mqtt(m: MqttConfig) -> None:
    if m.reconnect_max_s < m.reconnect_min_s:
        raise ConfigError(f"mqtt.reconnect_max_s = {m.reconnect_max_s:g} is out of range: expected >= "
                          f"mqtt.reconnect_min_s ({m.reconnect_min_s:g})")
    if not m.enabled:
        return
    if not m.host:
        raise ConfigError("mqtt.host = '' is not allowed while mqtt.enabled = true: expected the broker's host name "
                          "or IP address")
    if m.password_file and not m.username:
        raise ConfigError("mqtt.password_file is set but mqtt.username = '': a password needs a user name")
    if (m.cert_file or m.key_file) and not m.ca_file:
        raise ConfigError("mqtt.cert_file and mqtt.key_file need mqtt.ca_file: TLS is on when mqtt.ca_file names the "
                          "CA that signed the broker's certificate")
    if m.key_file and not m.cert_file:
        raise ConfigError("mqtt.key_file is set but mqtt.cert_file = '': the client key goes with a client certificate")


MAX_CONFIG_BYTES = 1 << 20  # a real config is a few KB


def load(path: str | Path | None = None) -> Config:
    """Load ``path``, or the default file when it exists, or the built-in defaults."""
    if path is None:
        if not DEFAULT_CONFIG_PATH.is_file():
            return Config()
        path = DEFAULT_CONFIG_PATH
    path = Path(path)
    try:
        # A device reads forever and a FIFO blocks before any signal can stop us: refuse both unread.
        if path.exists() and not path.is_file():
            raise ConfigError(f"config file {path}: not a regular file (a device, FIFO or directory cannot be a config)")
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"config file {path}: {path.stat().st_size} bytes is too large (at most {MAX_CONFIG_BYTES})")
        raw = path.read_bytes()
    except OSError as exc:
        from app.sandbox import hint

        raise ConfigError(f"config file {path}: cannot be read ({exc.strerror or exc})"
                          f"{hint(str(path), exc.errno, writing=False)}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path}: not UTF-8 text ({exc})") from None
    # tomllib recurses once per level and dotted keys cost it more than their length: bound both first.
    deep = toml_too_deep(text)
    if deep:
        raise ConfigError(f"config file {path}: not a config: {deep}")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: not valid TOML ({exc})") from None
    except RecursionError:
        raise ConfigError(f"config file {path}: not a config: nested too deeply to read") from None
    return from_dict(data, where=f"config file {path}")


def with_overrides(config: Config, overrides: dict[str, Any]) -> Config:
    """Apply ``{"section.key": value}`` overrides (from flags), validated like the file."""
    updated: dict[str, dict[str, Any]] = {}
    for dotted, value in overrides.items():
        if dotted not in _RULES:
            raise ConfigError(f"unknown setting {dotted}")
        section, key = dotted.split(".", 1)
        updated.setdefault(section, {})[key] = _check(dotted, value)
    new = config
    for section, values in updated.items():
        new = replace(new, **{section: replace(getattr(new, section), **values)})
    _check_cross(new)
    return new
