"""MQTT against a real mosquitto broker (tests/mosquitto.py): topics, order, login, TLS, the last will,
a broker restart, a stalled broker, Home Assistant's discovery schema, and the refusals at start."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from app import mqtt as mq
from app.capture import Capture
from app.config import ConfigError, MqttConfig
from app.events import Events
from app.pipeline import Pipeline
from app.sinks import NullLog
from app.sources import Frame
from app.tracker import Tracker, TrackerSettings
from tests.fakes.fake_detector import FakeDetector
from tests.fakes.fake_source import FakeSource
from tests.mosquitto import Broker, Listener, make_ca, needs_mosquitto, wait_for
from tests.reliability import support

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "test/cam"
DISC = "homeassistant"


def settings(port: int, **kw) -> MqttConfig:
    base = dict(enabled=True, host="127.0.0.1", port=port, topic_prefix=PREFIX, client_id="cam-test",
                keepalive_s=5, status_interval_s=0.5, presence_hold_s=0.3, reconnect_min_s=0.1, reconnect_max_s=0.5)
    base.update(kw)
    return MqttConfig(**base)


def publisher(port: int, login=None, classes=("person",), **kw) -> mq.MqttPublisher:
    tracks = kw.pop("tracks", True)
    snapshots = kw.pop("snapshots", False)
    return mq.MqttPublisher(settings(port, **kw), list(classes), login, tracks=tracks, snapshots=snapshots,
                            connect_timeout_s=3.0)


def events_of(listener: Listener) -> list[dict]:
    return [json.loads(p) for p in listener.on(f"{PREFIX}/events")]


# --- the outbox (no broker) -----------------------------------------------------------------


def test_outbox_keeps_the_order_and_drops_the_oldest_events_counting_them():
    box = mq.Outbox(3)
    box.put_state("a/count", b"1")
    for i in range(5):
        box.put_event("a/events", str(i).encode())
    taken = []
    while (item := box.take()) is not None:
        taken.append(item[:2])
    # the state change was pushed out of the queue by events but is not lost: its latest value goes first
    assert taken == [("a/count", b"1"), ("a/events", b"2"), ("a/events", b"3"), ("a/events", b"4")]
    assert box.dropped == 2  # events 0 and 1; the state change does not count as lost


def test_outbox_sends_state_changes_in_order_and_resends_the_latest_after_a_reconnect():
    box = mq.Outbox(100)
    box.put_state("p/count", b"0")
    box.put_event("p/events", b"enter")
    box.put_state("p/count", b"1")
    box.put_event("p/events", b"leave")
    box.put_state("p/count", b"0")
    assert not box.put_state("p/count", b"0")  # unchanged: nothing queued
    box.put_state("p/status", b"s1", retain=False, coalesce=True)
    box.put_state("p/status", b"s2", retain=False, coalesce=True)
    drain = lambda: [(t, p) for t, p, *_ in iter(box.take, None)]  # noqa: E731
    assert drain() == [("p/count", b"0"), ("p/events", b"enter"), ("p/count", b"1"), ("p/events", b"leave"),
                       ("p/count", b"0"), ("p/status", b"s2")]
    box.resend_state()  # a reconnect: the retained latest values again, the status line not
    assert drain() == [("p/count", b"0")]


# --- Home Assistant's discovery schema ------------------------------------------------------
# The keys each MQTT platform of Home Assistant accepts in a discovery payload (full names; from its
# schemas: the common entity schema, the availability schema, the read-only platform schema and each
# platform's own keys). A key outside these is dropped by HA's DISCOVERY_SCHEMA (REMOVE_EXTRA), i.e. a typo
# silently does nothing, which is what this test catches.
COMMON = {"availability", "availability_mode", "availability_template", "availability_topic",
          "payload_available", "payload_not_available", "device", "origin", "enabled_by_default",
          "entity_category", "entity_picture", "icon", "json_attributes_topic", "json_attributes_template",
          "object_id", "default_entity_id", "unique_id", "qos", "encoding", "name"}
READ_ONLY = {"state_topic", "value_template"}
PLATFORM = {
    "binary_sensor": READ_ONLY | {"device_class", "expire_after", "force_update", "off_delay", "payload_off",
                                  "payload_on"},
    "sensor": READ_ONLY | {"device_class", "expire_after", "force_update", "last_reset_value_template", "options",
                           "suggested_display_precision", "state_class", "unit_of_measurement"},
    "image": {"content_type", "image_topic", "url_topic", "image_encoding", "url_template"},
}
REQUIRED = {"binary_sensor": {"state_topic"}, "sensor": {"state_topic"}, "image": {"image_topic"}}
DEVICE_KEYS = {"identifiers", "connections", "manufacturer", "model", "model_id", "name", "hw_version",
               "serial_number", "sw_version", "via_device", "suggested_area", "configuration_url"}
ORIGIN_KEYS = {"name", "sw_version", "support_url"}
BINARY_SENSOR_CLASSES = {"occupancy", "motion", "presence"}
SENSOR_STATE_CLASSES = {"measurement", "total", "total_increasing"}


def check_discovery(topic: str, payload: dict, prefix: str = DISC) -> str:
    parts = topic.split("/")
    assert len(parts) == 5 and parts[0] == prefix and parts[-1] == "config", topic
    component, node, object_id = parts[1:4]
    assert component in PLATFORM, topic
    for level in (node, object_id):
        assert level and all(c.isalnum() or c in "_-" for c in level), topic
    extra = set(payload) - COMMON - PLATFORM[component]
    assert not extra, f"{topic}: keys Home Assistant does not know: {extra}"
    assert REQUIRED[component] <= set(payload), topic
    assert isinstance(payload["unique_id"], str) and payload["unique_id"]
    device = payload["device"]
    assert set(device) <= DEVICE_KEYS and device["identifiers"] and all(isinstance(i, str) for i in device["identifiers"])
    assert {"model", "sw_version", "name"} <= set(device)
    assert payload["origin"]["name"] and set(payload["origin"]) <= ORIGIN_KEYS
    for key in ("state_topic", "availability_topic", "image_topic"):
        if key in payload:
            assert isinstance(payload[key], str) and not set(payload[key]) & set("+#"), (topic, key)
    if component == "binary_sensor":
        assert payload["device_class"] in BINARY_SENSOR_CLASSES
    if "state_class" in payload:
        assert payload["state_class"] in SENSOR_STATE_CLASSES
    if payload.get("device_class") == "duration":
        assert payload["unit_of_measurement"] in {"d", "h", "min", "s", "ms"}
    if "entity_category" in payload:
        assert payload["entity_category"] in {"config", "diagnostic"}
    if "expire_after" in payload:
        assert isinstance(payload["expire_after"], int) and payload["expire_after"] > 0
    assert payload.get("qos", 0) in (0, 1, 2)
    return component


def test_discovery_payloads_follow_home_assistants_schema_and_group_under_one_device():
    cfg = settings(1883, topic_prefix="", client_id="")
    msgs = mq.discovery_messages(cfg, ["person", "Dog walker"], snapshots=True, model="person.xnc")
    components = [check_discovery(t, p) for t, p in msgs]
    assert components.count("binary_sensor") == 2 and components.count("image") == 2
    assert components.count("sensor") == 2 + 2  # counts, then fps and detect time
    assert len({json.dumps(p["device"], sort_keys=True) for _, p in msgs}) == 1  # one device
    assert len({p["unique_id"] for _, p in msgs}) == len(msgs)
    by_id = {p["unique_id"].split("_", 1)[1]: p for _, p in msgs}
    assert by_id["person_presence"]["device_class"] == "occupancy"
    assert by_id["dog_walker_count"]["state_topic"].endswith("/dog_walker/count")
    assert by_id["person_snapshot"]["content_type"] == "image/jpeg"
    assert {by_id["fps"]["entity_category"], by_id["detect_ms"]["entity_category"]} == {"diagnostic"}
    assert by_id["person_presence"]["availability_topic"] == f"xnorcam/{mq.hostname()}/availability"
    assert msgs[0][1]["device"]["sw_version"] == mq.__version__
    no_snap = mq.discovery_messages(cfg, ["person"], snapshots=False)
    assert [t for t, _ in no_snap if "/image/" in t] == []


def test_the_schema_check_catches_a_misspelt_key():
    topic, payload = mq.discovery_messages(settings(1883), ["person"], snapshots=False)[0]
    with pytest.raises(AssertionError, match="does not know"):
        check_discovery(topic, {**payload, "stat_topic": payload["state_topic"]})
    with pytest.raises(AssertionError):
        check_discovery(topic, {**payload, "device_class": "occupied"})


# --- start-up checks (no broker) ------------------------------------------------------------


def test_the_password_file_must_belong_to_the_service_user_alone(tmp_path):
    pw = tmp_path / "pw"
    pw.write_text("s3cret-pass\n")
    pw.chmod(0o600)
    assert mq.read_password(str(pw)) == "s3cret-pass"
    for mode in (0o640, 0o604, 0o660):
        pw.chmod(mode)
        with pytest.raises(ConfigError, match=f"mode {mode:04o}") as err:
            mq.read_password(str(pw))
        assert "s3cret" not in str(err.value)
    pw.chmod(0o600)
    if os.geteuid() == 0:
        os.chown(pw, 65534, -1)
        with pytest.raises(ConfigError, match="not by the service user"):
            mq.read_password(str(pw))
        os.chown(pw, 0, -1)
    for body in ("", "\n", "a\nb\n"):
        pw.write_text(body)
        with pytest.raises(ConfigError, match="alone on one line"):
            mq.read_password(str(pw))
    with pytest.raises(ConfigError, match="cannot be read"):
        mq.read_password(str(tmp_path / "missing"))


def test_tls_files_are_checked_at_start(tmp_path):
    ca = make_ca(tmp_path / "pki")
    ok = mq.tls_context(settings(1, ca_file=str(ca["ca"]), cert_file=str(ca["client_cert"]),
                                 key_file=str(ca["client_key"])))
    assert ok.verify_mode.name == "CERT_REQUIRED" and ok.check_hostname
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    for kw, match in (({"ca_file": str(tmp_path / "nope.pem")}, r"mqtt\.ca_file .*cannot be read"),
                      ({"ca_file": str(junk)}, r"mqtt\.ca_file .*not a PEM"),
                      ({"ca_file": str(ca["ca"]), "cert_file": str(junk)}, r"mqtt\.cert_file .*not a PEM"),
                      ({"ca_file": str(ca["ca"]), "cert_file": str(ca["client_cert"]), "key_file": str(ca["key"])},
                       r"mqtt\.cert_file .*mqtt\.key_file")):
        with pytest.raises(ConfigError, match=match):
            mq.tls_context(settings(1, **kw))


def app_cmd(config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "app", "--config", str(config), "--preview", "none", *extra]


def write_config(path: Path, mqtt: dict, extra: str = "") -> Path:
    lines = ["[mqtt]"] + [f"{k} = {json.dumps(v)}" for k, v in mqtt.items()]
    path.write_text(extra + "\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("mqtt,says", [
    ({"host": "mqtt://broker"}, "mqtt.host"),
    ({"host": "broker", "port": 0}, "mqtt.port"),
    ({"host": "broker", "ca_file": "/nonexistent/ca.pem"}, "mqtt.ca_file"),
    ({"host": "broker", "ca_file": "JUNK"}, "mqtt.ca_file"),
    ({"host": "broker", "username": "cam", "password_file": "LOOSE"}, "mqtt.password_file"),
    ({"host": "broker", "password": "hunter2"}, "mqtt.password"),
])  # fmt: skip
def test_bad_mqtt_settings_are_refused_at_start_with_exit_78_and_one_line(tmp_path, mqtt, says):
    junk, loose = tmp_path / "junk.pem", tmp_path / "pw"
    junk.write_text("junk\n")
    loose.write_text("hunter2\n")
    loose.chmod(0o644)
    mqtt = {k: {"JUNK": str(junk), "LOOSE": str(loose)}.get(v, v) for k, v in mqtt.items()}
    conf = write_config(tmp_path / "c.toml", {"enabled": True, **mqtt})
    r = subprocess.run(app_cmd(conf, "--source", "demo", "--max-frames", "1"), cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 78, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("xnorcam: configuration refused:") and says in lines[0], r.stderr
    assert "hunter2" not in r.stderr + r.stdout


# --- against the broker ---------------------------------------------------------------------


def box(cx: float, score: float = 0.9) -> list[float]:
    return [cx - 20, 40, cx + 20, 200, score, 0]


def scene() -> list[list[list[float]]]:
    """Two people: A walks in at frame 0 and out at 40, B from 20 to 70, then nobody for 20 frames."""
    frames = []
    for i in range(90):
        rows = []
        if i < 40:
            rows.append(box(40 + 2 * i))
        if 20 <= i < 70:
            rows.append(box(300 - 2 * (i - 20)))
        frames.append(rows)
    return frames


@needs_mosquitto
def test_a_scripted_scene_arrives_in_order_with_counts_presence_and_retained_state(tmp_path):
    with Broker(tmp_path) as broker, Listener(broker.port) as lis:
        pub = publisher(broker.port).start()
        tee = pub.tee(NullLog())
        events = Events(Tracker(TrackerSettings(confirm_hits=3, confirm_frames=5, lost_after_s=0.3)), tee.event,
                        ["person"])
        for i, rows in enumerate(scene()):
            frame = Frame(np.zeros((240, 320), np.uint8), i, 1000.0 + i / 10)
            events.frame(frame, np.asarray(rows, np.float32).reshape(-1, 6), None)
            tee.write({"detections": [], "fps": 10.0, "dropped": 0, "detect_ms": 30.0})
        assert lis.wait(lambda x: x.last(f"{PREFIX}/person/presence") == b"OFF" and
                        x.on(f"{PREFIX}/person/count")[-1:] == [b"0"] and len(events_of(x)) == 4)
        flow = [(t.rsplit("/", 1)[-1], json.loads(p)["event"] if t.endswith("events") else p.decode())
                for t, p, _ in lis.messages if t.startswith(PREFIX) and not t.endswith(("status", "availability"))]
        assert flow == [("count", "0"), ("presence", "OFF"),
                        ("events", "enter"), ("count", "1"), ("presence", "ON"),
                        ("events", "enter"), ("count", "2"),
                        ("events", "leave"), ("count", "1"),
                        ("events", "leave"), ("count", "0"), ("presence", "OFF")]
        tracks = [(e["event"], e["track"]) for e in events_of(lis)]
        assert tracks == [("enter", 1), ("enter", 2), ("leave", 1), ("leave", 2)]
        assert all(e["v"] == 1 and e["label"] == "person" and "time" in e for e in events_of(lis))
        time.sleep(0.6)  # a status line after the frames stopped keeps their numbers
        status = json.loads(lis.last(f"{PREFIX}/status"))
        assert status["fps"] == 10.0 and status["detect_ms"] == 30.0 and status["uptime_s"] >= 0
        # A late subscriber (Home Assistant after a restart) gets the retained state and discovery.
        with Listener(broker.port, (f"{PREFIX}/#", f"{DISC}/#")) as late:
            assert late.wait(lambda x: len([m for m in x.messages if m[0].startswith(DISC)]) == 4)
            retained = {t: p for t, p, r in late.messages if r}
            assert retained[f"{PREFIX}/availability"] == b"online"
            assert retained[f"{PREFIX}/person/count"] == b"0" and retained[f"{PREFIX}/person/presence"] == b"OFF"
            assert f"{PREFIX}/events" not in retained
            for t, p in retained.items():
                if t.startswith(DISC):
                    check_discovery(t, json.loads(p))
        pub.close()
        assert lis.wait(lambda x: x.last(f"{PREFIX}/availability") == b"offline")


@needs_mosquitto
def test_presence_holds_through_a_missed_frame_without_tracks(tmp_path):
    with Broker(tmp_path) as broker, Listener(broker.port, (f"{PREFIX}/person/#",)) as lis:
        pub = publisher(broker.port, tracks=False, presence_hold_s=1.0).start()
        tee = pub.tee(NullLog())
        one = {"detections": [{"label": "person"}], "fps": 10.0, "dropped": 0}
        none = {"detections": [], "fps": 10.0, "dropped": 0}
        for rec in (one, one, none, one, one):  # one missed frame, 0.1 s
            tee.write(rec)
            time.sleep(0.1)
        tee.write(none)
        assert lis.wait(lambda x: x.last(f"{PREFIX}/person/presence") == b"OFF", 5)
        assert lis.on(f"{PREFIX}/person/presence") == [b"OFF", b"ON", b"OFF"]  # no flap at the missed frame
        assert lis.on(f"{PREFIX}/person/count") == [b"0", b"1", b"0", b"1", b"0"]
        pub.close()


@needs_mosquitto
def test_snapshots_are_retained_jpegs_per_class(tmp_path):
    jpeg = tmp_path / "20261204T171109.513Z-track1-enter.jpg"
    jpeg.write_bytes(b"\xff\xd8fake jpeg\xff\xd9")
    with Broker(tmp_path / "b") as broker:
        pub = publisher(broker.port, snapshots=True).start()
        pub.tee(NullLog()).event({"event": "enter", "label": "person", "track": 1, "snapshot": str(jpeg)})
        assert wait_for(lambda: pub.outbox.pending() == 0 and pub.published > 8)
        with Listener(broker.port, (f"{PREFIX}/person/snapshot", f"{DISC}/image/#")) as late:
            assert late.wait(lambda x: len(x.messages) == 2)
            assert late.last(f"{PREFIX}/person/snapshot") == jpeg.read_bytes()
        pub.close()


@needs_mosquitto
def test_discovery_off_clears_the_entities(tmp_path):
    with Broker(tmp_path) as broker:
        pub = publisher(broker.port).start()
        assert wait_for(lambda: pub.connected.is_set() and pub.outbox.pending() == 0)
        pub.close()
        with Listener(broker.port, (f"{DISC}/#",)) as lis:
            assert lis.wait(lambda x: len(x.messages) == 4)
        pub = publisher(broker.port, discovery=False).start()
        assert wait_for(lambda: pub.connected.is_set() and pub.outbox.pending() == 0)
        pub.close()
        with Listener(broker.port, (f"{DISC}/#",)) as lis:
            time.sleep(0.5)
            assert lis.messages == []  # empty retained payloads removed them


@needs_mosquitto
def test_user_and_password_login(tmp_path):
    with Broker(tmp_path, users={"cam": "right-pass", "ha": "ha-pass"}) as broker, \
            Listener(broker.port, (f"{PREFIX}/#",), username="ha", password="ha-pass") as lis:
        pub = publisher(broker.port, login=mq.Login("right-pass"), username="cam").start()
        assert lis.wait(lambda x: x.last(f"{PREFIX}/availability") == b"online")
        assert pub.fatal is None
        pub.close()
        stop = threading.Event()
        bad = mq.MqttPublisher(settings(broker.port, username="cam"), ["person"], mq.Login("wrong-pass"), stop=stop)
        bad.start()
        assert stop.wait(10)
        assert re.search(r"refused the login of user 'cam': (bad user name or password|not authorised)", bad.fatal)
        assert "wrong-pass" not in bad.fatal
        bad.close()


@needs_mosquitto
def test_a_wrong_password_stops_the_app_with_exit_78_and_one_line(tmp_path):
    with Broker(tmp_path / "b", users={"cam": "right-pass"}) as broker:
        pw = tmp_path / "pw"
        pw.write_text("wrong-pass\n")
        pw.chmod(0o600)
        conf = write_config(tmp_path / "c.toml", {"enabled": True, "host": "127.0.0.1", "port": broker.port,
                                                  "username": "cam", "password_file": str(pw)})
        # the login comes after the model is loaded and the kernels are compiled (minutes on a cold cache)
        r = subprocess.run(app_cmd(conf, "--source", "demo"), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 78, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("xnorcam: configuration refused: mqtt: the broker 127.0.0.1:") and "user 'cam'" in last
    assert "not authorised" in last or "bad user name" in last
    assert "wrong-pass" not in r.stderr + r.stdout


@needs_mosquitto
def test_tls_with_a_throwaway_ca_and_a_client_certificate(tmp_path):
    ca = make_ca(tmp_path / "pki")
    other = make_ca(tmp_path / "pki", name="other")
    tls = {"ca": ca["ca"], "cert": ca["cert"], "key": ca["key"], "require_certificate": True}
    with Broker(tmp_path / "b", tls=tls) as broker:
        listener_tls = mq.tls_context(settings(1, ca_file=str(ca["ca"]), cert_file=str(ca["client_cert"]),
                                               key_file=str(ca["client_key"])))
        with Listener(broker.port, (f"{PREFIX}/#",), tls=listener_tls) as lis:
            cfg = dict(ca_file=str(ca["ca"]), cert_file=str(ca["client_cert"]), key_file=str(ca["client_key"]))
            pub = publisher(broker.port, login=mq.prepare(settings(broker.port, **cfg)), **cfg).start()
            assert lis.wait(lambda x: x.last(f"{PREFIX}/availability") == b"online")
            pub.close()
        # A broker whose certificate another CA signed is not trusted: no connection, retried, no exit.
        cfg = dict(ca_file=str(other["ca"]), cert_file=str(ca["client_cert"]), key_file=str(ca["client_key"]))
        pub = publisher(broker.port, login=mq.prepare(settings(broker.port, **cfg)), **cfg).start()
        assert wait_for(lambda: pub.connect_failures >= 2, 10)
        assert pub.connects == 0 and pub.fatal is None and "CERTIFICATE_VERIFY_FAILED" in pub.last_error
        pub.close()


@needs_mosquitto
def test_the_last_will_says_offline_when_the_app_is_killed(tmp_path):
    with Broker(tmp_path / "b") as broker, Listener(broker.port, (f"{PREFIX}/availability",)) as lis:
        conf = write_config(tmp_path / "c.toml", {"enabled": True, "host": "127.0.0.1", "port": broker.port,
                                                  "topic_prefix": PREFIX, "keepalive_s": 30})
        proc = subprocess.Popen(app_cmd(conf, "--source", "demo"), cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            assert lis.wait(lambda x: x.on(f"{PREFIX}/availability") == [b"online"], 600)
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            # kill -9: no clean disconnect, the broker publishes the will at once (the socket closed).
            assert lis.wait(lambda x: x.on(f"{PREFIX}/availability") == [b"online", b"offline"], 10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    with Broker(tmp_path / "b2") as broker, Listener(broker.port, (f"{PREFIX}/availability",)) as lis:
        conf = write_config(tmp_path / "c2.toml", {"enabled": True, "host": "127.0.0.1", "port": broker.port,
                                                   "topic_prefix": PREFIX})
        proc = subprocess.Popen(app_cmd(conf, "--source", "demo"), cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            assert lis.wait(lambda x: x.on(f"{PREFIX}/availability") == [b"online"], 600)
            proc.send_signal(signal.SIGTERM)  # a clean stop says offline itself
            assert proc.wait(30) == 0
            assert lis.wait(lambda x: x.on(f"{PREFIX}/availability") == [b"online", b"offline"], 10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


def numbered(listener: Listener) -> list[int]:
    return sorted({e["n"] for e in events_of(listener)})


@needs_mosquitto
@pytest.mark.parametrize("queue_max", [1000, 50])
def test_a_broker_restart_loses_nothing_beyond_the_counted_overflow(tmp_path, queue_max):
    broker = Broker(tmp_path / "b").start()
    try:
        pub = publisher(broker.port, queue_max=queue_max).start()
        tee = pub.tee(NullLog())
        with Listener(broker.port, (f"{PREFIX}/events",)) as lis:
            for n in range(100):
                tee.event({"event": "update", "n": n})
                if n % 10 == 9:  # at the pace of a camera: the queue never fills while the broker is up
                    assert wait_for(lambda: pub.outbox.pending() == 0)
            assert lis.wait(lambda x: len(numbered(x)) == 100) and pub.outbox.dropped == 0
        broker.stop()
        assert wait_for(lambda: not pub.connected.is_set(), 10)
        for n in range(100, 300):  # 200 events while the broker is down
            tee.event({"event": "update", "n": n})
        broker.start()  # same port; no persistence: the retained state is gone with it
        with Listener(broker.port, (f"{PREFIX}/#",)) as lis:
            assert wait_for(lambda: pub.connected.is_set() and pub.outbox.pending() == 0, 20)
            for n in range(300, 310):
                tee.event({"event": "update", "n": n})
            lost = pub.outbox.dropped
            assert lis.wait(lambda x: 309 in numbered(x))
            got = numbered(lis)
            assert lost == max(0, 200 - queue_max)
            assert got == list(range(100 + lost, 310))  # only the oldest of the outage are missing
        # availability, the retained state and discovery were published again after the reconnect
        with Listener(broker.port, (f"{PREFIX}/#", f"{DISC}/#")) as late:
            assert late.wait(lambda x: len([m for m in x.messages if m[2]]) == 3 + 4)
            assert late.last(f"{PREFIX}/availability") == b"online"
        assert pub.connects == 2
        pub.close()
    finally:
        broker.stop()


class ScriptedDetector(FakeDetector):
    """A FAKE detector: a person on even frames, nobody on odd ones (an enter and a leave every two frames)."""

    def detect(self, image):
        self.calls += 1
        if self.calls % 2:
            return np.asarray([[10, 10, 50, 100, 0.9, 0]], np.float32)
        return np.zeros((0, 6), np.float32)


@needs_mosquitto
def test_a_stalled_broker_never_holds_up_detection(tmp_path):
    """The broker keeps the connection, then stops (SIGSTOP): it reads nothing and acknowledges nothing.

    The pipeline runs 2000 frames (1000 enters and 1000 leaves) through the whole stall and ends; what the
    network could not take waits in the bounded queue or is counted as dropped, and once the broker runs
    again exactly the events that were not counted as dropped arrive, the newest last.
    """
    with Broker(tmp_path) as broker, Listener(broker.port, (f"{PREFIX}/events", f"{PREFIX}/person/count")) as lis:
        pub = publisher(broker.port, queue_max=100, keepalive_s=60).start()
        assert wait_for(lambda: pub.connected.is_set() and pub.outbox.pending() == 0 and pub._inflight == 0)
        broker.pause()
        try:
            tee = pub.tee(NullLog())
            det = ScriptedDetector()
            events = Events(Tracker(TrackerSettings(confirm_hits=1, confirm_frames=1, lost_after_s=0.0)), tee.event,
                            det.class_names)
            cap = Capture(lambda: FakeSource(period=0.001, shape=(120, 160), limit=2000), lossless=True)
            p = Pipeline(cap, det, log_sink=tee, events=events)
            stats = support.run_pipeline(cap, p, 120.0)
            assert stats.processed == 2000 and stats.stopped_by == "source ended"
            assert events.counts["enter"] == 1000 and events.counts["leave"] == 1000
            assert pub.connected.is_set()  # still connected: the stall is on the socket, never in the loop
            assert pub._inflight == mq.WINDOW  # handed to the socket, unacknowledged
            assert pub.outbox.pending() >= 100 and pub.outbox.dropped > 1500
        finally:
            broker.resume()
        sent = pub.outbox.events_in - pub.outbox.dropped
        assert lis.wait(lambda x: x.last(f"{PREFIX}/person/count") == b"0" and pub.outbox.pending() == 0 and
                        len({(e["event"], e["track"]) for e in events_of(x)}) == sent, 30)
        got = [(e["event"], e["track"]) for e in events_of(lis)]
        assert got[-1] == ("leave", 1000)
        pub.close()


@needs_mosquitto
def test_mqtt_clear_takes_the_camera_out_of_home_assistant(tmp_path):
    with Broker(tmp_path / "b") as broker:
        pub = publisher(broker.port, snapshots=True).start()
        pub.tee(NullLog()).event({"event": "enter", "label": "person", "track": 1})
        assert wait_for(lambda: pub.connected.is_set() and pub.outbox.pending() == 0 and pub._inflight == 0)
        pub.close()
        with Listener(broker.port, (f"{PREFIX}/#", f"{DISC}/#")) as lis:
            assert lis.wait(lambda x: len(x.messages) >= 4 + 3)  # discovery, availability, count, presence
        # MQTT turned off, the broker still named: python -m app --mqtt-clear (what install.sh runs)
        conf = write_config(tmp_path / "c.toml", {"enabled": False, "host": "127.0.0.1", "port": broker.port,
                                                  "topic_prefix": PREFIX, "client_id": "cam-test"})
        r = subprocess.run(app_cmd(conf, "--mqtt-clear"), cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        with Listener(broker.port, (f"{PREFIX}/#", f"{DISC}/#")) as lis:
            time.sleep(0.5)
            assert lis.messages == []  # nothing retained is left
        broker.stop()
        r = subprocess.run(app_cmd(conf, "--mqtt-clear"), cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith(
            "xnorcam: mqtt clear failed: mqtt: cannot reach the broker 127.0.0.1:")
