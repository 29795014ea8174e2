"""The network drop-in for [mqtt]: what it opens, the exposure score with it and without, and the
installer writing it only while the config turns MQTT on."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.test_install_script import staged  # noqa: F401  (a fixture)
from tests.test_systemd_unit import exposure, needs_analyze, settings, verifiable_copy, verify

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "systemd" / "xnorcam.service"
DROPIN = ROOT / "systemd" / "mqtt-network.conf"
SCRIPT = ROOT / "deploy" / "install.sh"
MAX_OFF, MAX_ON = 1.0, 1.5


def with_dropin(tmp_path: Path, text: str | None = None) -> Path:
    """The unit in a folder of its own, with the drop-in where systemd looks for it (xnorcam.service.d/)."""
    unit = verifiable_copy(tmp_path, text or UNIT.read_text())
    (tmp_path / "xnorcam.service.d").mkdir()
    shutil.copy(DROPIN, tmp_path / "xnorcam.service.d" / "mqtt.conf")
    return unit


def test_the_dropin_adds_the_network_and_nothing_else():
    s = settings(DROPIN.read_text())
    assert s["After"] == ["network-online.target"] and s["Wants"] == ["network-online.target"]
    assert s["PrivateNetwork"] == ["no"]
    assert s["RestrictAddressFamilies"] == ["AF_INET AF_INET6"]  # merged with the unit's AF_UNIX AF_NETLINK
    allowed = s["IPAddressAllow"][0].split()
    assert "any" not in allowed and {"localhost", "192.168.0.0/16", "10.0.0.0/8"} <= set(allowed)
    assert "IPAddressDeny" not in s  # the unit's IPAddressDeny=any stays
    assert set(s) == {"Wants", "After", "PrivateNetwork", "RestrictAddressFamilies", "IPAddressAllow"}
    # and the unit itself has no network while the drop-in is absent
    unit = settings(UNIT.read_text())
    assert unit["PrivateNetwork"] == ["yes"] and "network-online.target" not in " ".join(unit.get("After", []))


@needs_analyze
def test_exposure_with_mqtt_off_and_on(tmp_path, capsys):
    for side in ("off", "on"):
        (tmp_path / side).mkdir()
    off = exposure(verifiable_copy(tmp_path / "off", UNIT.read_text()))
    on = exposure(with_dropin(tmp_path / "on"))
    with capsys.disabled():
        print(f"\nsystemd-analyze security --offline=true: exposure {off} with MQTT off, {on} with the mqtt drop-in")
    assert off <= MAX_OFF and on <= MAX_ON
    assert on > off  # the drop-in is really read: the network shows in the score


@needs_analyze
def test_the_unit_with_the_dropin_verifies_without_diagnostics(tmp_path):
    result = verify(with_dropin(tmp_path))
    assert result.returncode == 0 and result.stdout + result.stderr == "", result.stdout + result.stderr


def mqtt_enabled(tmp_path: Path, config: str) -> bool:
    """install.sh's mqtt_enabled on a config file."""
    conf = tmp_path / "config.toml"
    conf.write_text(config)
    func = subprocess.run(["sed", "-n", "/^mqtt_enabled()/,/^}/p", str(SCRIPT)], capture_output=True, text=True,
                          check=True).stdout
    assert func.strip(), "mqtt_enabled() is missing from install.sh"
    r = subprocess.run(["bash", "-c", f'{func}\nCONF="$1" SRC=/nonexistent mqtt_enabled', "-", str(conf)],
                       capture_output=True, text=True)
    assert r.returncode in (0, 1), r.stderr
    return r.returncode == 0


@pytest.mark.parametrize("config,on", [
    ("[mqtt]\nenabled = true\nhost = \"b\"\n", True),
    ("[mqtt] # the broker\n  enabled=true   # on\n", True),
    ("[mqtt]\nenabled = false\n", False),
    ("[mqtt]\n# enabled = true\n", False),
    ("[web]\nenabled = true\n[mqtt]\nhost = \"b\"\n", False),
    ("[mqtt]\nenabled = true\n[web]\nenabled = false\n", True),
    ("[source]\nspec = \"demo\"\n", False),
])  # fmt: skip
def test_the_installer_reads_whether_mqtt_is_on(tmp_path, config, on):
    assert mqtt_enabled(tmp_path, config) is on


def test_the_example_config_leaves_mqtt_off(tmp_path):
    assert not mqtt_enabled(tmp_path, (ROOT / "deploy/config.example.toml").read_text())


@pytest.mark.skipif(shutil.which("awk") is None, reason="awk is missing")
@pytest.mark.skipif(__import__("os").geteuid() != 0, reason="install.sh refuses to run as non-root")
def test_the_installer_writes_the_dropin_only_while_mqtt_is_on(staged):  # noqa: F811
    proj, root, run = staged
    dropin = root / "etc/systemd/system/xnorcam.service.d/mqtt.conf"
    conf = root / "etc/xnorcam/config.toml"
    result, _ = run("--no-start")
    assert result.returncode == 0, result.stdout + result.stderr
    assert not dropin.exists() and "[mqtt] is off: no network for MQTT" in result.stdout
    conf.write_text('[mqtt]\nenabled = true\nhost = "homeassistant.local"\n')
    result, calls = run("--no-start")
    assert result.returncode == 0, result.stdout + result.stderr
    assert dropin.read_text() == DROPIN.read_text()
    assert calls.index("systemctl daemon-reload") > 0
    conf.write_text('[mqtt]\nenabled = false\nhost = "homeassistant.local"\n')
    result, calls = run("--no-start")
    assert result.returncode == 0 and not dropin.exists()
    # turned off: the camera is taken out of Home Assistant first, as the service user
    clear = [c for c in calls if c.startswith("python") and c.endswith("--mqtt-clear")]
    assert len(clear) == 1 and clear[0].endswith("-m app --config " + str(conf) + " --mqtt-clear")
    assert any(c.startswith("runuser -u xnorcam") and c.endswith("--mqtt-clear") for c in calls)
    result, calls = run("--no-start")
    assert not [c for c in calls if "--mqtt-clear" in c]  # once only: the drop-in is gone
    conf.write_text('[mqtt]\nenabled = true\nhost = "homeassistant.local"\n')
    run("--no-start")
    assert dropin.exists()
    result, _ = run("--uninstall")
    assert result.returncode == 0 and not dropin.exists()
