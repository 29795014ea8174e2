"""The [mqtt] section: off by default, strict like every other section, and never echoing a secret."""

from __future__ import annotations

import pytest

from app import config as configmod
from app.config import ConfigError, MqttConfig


def load(**mqtt):
    return configmod.from_dict({"mqtt": mqtt}).mqtt


def test_off_by_default_with_the_documented_defaults():
    m = configmod.Config().mqtt
    assert m == MqttConfig()
    assert not m.enabled and m.port == 1883 and m.qos == 1 and m.discovery_prefix == "homeassistant"
    assert m.client_id == "" and m.topic_prefix == ""  # xnorcam-<hostname>, xnorcam/<hostname>
    assert load(enabled=True, host="broker.lan").enabled


@pytest.mark.parametrize("host", ["homeassistant.local", "broker", "192.168.1.10", "::1", "fd00::2", "a-b.c-d.example."])
def test_hosts_accepted(host):
    assert load(enabled=True, host=host).host == host


@pytest.mark.parametrize("host", ["mqtt://broker", "broker:1883", "bro ker", "-broker", "1.2.3", "broker/x", "", 5])
def test_bad_hosts_are_refused_naming_the_key(host):
    with pytest.raises(ConfigError, match=r"mqtt\.host"):
        load(enabled=True, host=host)


@pytest.mark.parametrize("key,value", [
    ("port", 0), ("port", 65536), ("port", "1883"), ("port", True), ("qos", 3), ("keepalive_s", 1),
    ("topic_prefix", "a//b"), ("topic_prefix", "a/+/b"), ("topic_prefix", "#"), ("topic_prefix", "/a"),
    ("topic_prefix", "$SYS/x"), ("discovery_prefix", "ha/"), ("client_id", "a/b"), ("queue_max", 0),
    ("status_interval_s", 0), ("presence_hold_s", -1), ("reconnect_min_s", 0),
])  # fmt: skip
def test_bad_values_are_refused_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=rf"mqtt\.{key}"):
        load(enabled=True, host="broker", **{key: value})


@pytest.mark.parametrize("mqtt,key", [
    ({"enabled": True}, "mqtt.host"),
    ({"enabled": True, "host": "b", "password_file": "/etc/xnorcam/pw"}, "mqtt.password_file"),
    ({"enabled": True, "host": "b", "cert_file": "/c.pem"}, "mqtt.cert_file"),
    ({"enabled": True, "host": "b", "ca_file": "/ca.pem", "key_file": "/k.pem"}, "mqtt.key_file"),
    ({"reconnect_min_s": 10.0, "reconnect_max_s": 5.0}, "mqtt.reconnect_max_s"),
])  # fmt: skip
def test_combinations_that_cannot_work_are_refused(mqtt, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load(**mqtt)


def test_a_password_in_the_config_is_refused_without_showing_it():
    secret = "hunter2-correct-horse"
    for key in ("password", "mqtt_password", "passwd", "token"):
        with pytest.raises(ConfigError) as err:
            load(enabled=True, host="broker", **{key: secret})
        assert secret not in str(err.value) and f"mqtt.{key}" in str(err.value)
    assert "password_file" in str(err.value)


def test_flags_cannot_slip_a_bad_value_past_the_rules():
    with pytest.raises(ConfigError, match=r"mqtt\.port"):
        configmod.with_overrides(configmod.Config(), {"mqtt.port": 70000})
