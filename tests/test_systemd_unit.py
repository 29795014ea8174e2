"""systemd/xnorcam.service: it parses cleanly, is hardened, and fits the app."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "systemd" / "xnorcam.service"
MAX_EXPOSURE = 1.5

needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed (.ci/run installs systemd)"
)


def settings(text: str) -> dict[str, list[str]]:
    """Key -> every value it is given, in order (repeatable keys accumulate)."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


@pytest.fixture(scope="module")
def unit() -> dict[str, list[str]]:
    return settings(UNIT.read_text())


def verify(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(path)], capture_output=True, text=True, timeout=60
    )


def verifiable_copy(tmp_path: Path, text: str) -> Path:
    """The unit with ExecStart pointing at an interpreter that exists here.

    `systemd-analyze verify` checks that ExecStart's binary is executable, and
    /opt/xnorcam/venv only exists on a Pi after install.sh. `--root=` does not
    help on systemd 252 (it then misses sysinit.target), so the check runs on a
    copy where only the interpreter path differs.
    """
    text = text.replace("/opt/xnorcam/venv/bin/python", str(Path(sys.executable).resolve()))
    copy = tmp_path / "xnorcam.service"
    copy.write_text(text)
    return copy


@needs_analyze
def test_unit_verifies_without_diagnostics(tmp_path):
    result = verify(verifiable_copy(tmp_path, UNIT.read_text()))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == "", result.stdout + result.stderr


@needs_analyze
def test_verify_catches_a_misspelt_key(tmp_path):
    """Guards the test above: verify exits 0 on unknown keys, so we read its output."""
    bad = UNIT.read_text().replace("ProtectClock=yes", "ProtectClok=yes")
    result = verify(verifiable_copy(tmp_path, bad))
    assert "ProtectClok" in result.stdout + result.stderr


def exposure(path: Path) -> float:
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if "offline" in result.stderr and "unrecognized" in result.stderr:
        pytest.skip("systemd-analyze is older than 250 (no --offline)")
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", result.stdout + result.stderr)
    assert match, result.stdout + result.stderr
    return float(match.group(1))


@needs_analyze
def test_exposure_score(capsys):
    score = exposure(UNIT)
    with capsys.disabled():
        print(f"\nsystemd-analyze security --offline=true systemd/xnorcam.service: exposure {score}")
    assert score <= MAX_EXPOSURE


def test_notify_watchdog_and_restart_policy(unit):
    assert unit["Type"] == ["notify"]
    assert unit["NotifyAccess"] == ["main"]
    watchdog = unit["WatchdogSec"][0]
    assert re.fullmatch(r"\d+s?", watchdog) and int(watchdog.rstrip("s")) >= 10
    assert unit["Restart"] == ["on-failure"]
    assert unit["RestartPreventExitStatus"][0].split() == ["2", "65", "69", "78"]
    assert int(unit["TimeoutStartSec"][0]) >= 60


def test_runs_the_installed_app_as_its_own_user(unit):
    assert unit["ExecStart"] == ["/opt/xnorcam/venv/bin/python -m app --config /etc/xnorcam/config.toml"]
    assert unit["WorkingDirectory"] == ["/opt/xnorcam/app"]
    assert unit["User"] == ["xnorcam"]
    assert set(unit["SupplementaryGroups"][0].split()) == {"video", "render"}
    env = " ".join(unit["Environment"])
    assert "NUMBA_CACHE_DIR=/var/cache/xnorcam/numba" in env
    assert "MALLOC_ARENA_MAX=2" in env.split()  # a 512 MB board: no arena per thread
    assert unit["CacheDirectory"] == ["xnorcam"]
    assert unit["LogsDirectory"] == ["xnorcam"]
    assert unit["StateDirectory"] == ["xnorcam"]


def test_camera_compatible_hardening(unit):
    # numba writes machine code into memory it then executes.
    assert "MemoryDenyWriteExecute" not in unit
    # The camera, ISP, DRM and dma_heap nodes must stay visible.
    assert "PrivateDevices" not in unit
    assert "PrivateUsers" not in unit
    assert unit["DevicePolicy"] == ["closed"]
    allowed = {v.split()[0] for v in unit["DeviceAllow"]}
    assert {"char-video4linux", "char-media", "char-drm", "char-dma_heap"} <= allowed
    for key in ("ProtectSystem",):
        assert unit[key] == ["strict"]
    for key in (
        "NoNewPrivileges",
        "ProtectHome",
        "PrivateTmp",
        "ProtectKernelTunables",
        "ProtectKernelModules",
        "ProtectKernelLogs",
        "ProtectControlGroups",
        "ProtectClock",
        "ProtectHostname",
        "RestrictNamespaces",
        "RestrictRealtime",
        "RestrictSUIDSGID",
        "LockPersonality",
    ):
        assert unit[key] == ["yes"], key
    assert unit["CapabilityBoundingSet"] == [""]
    assert set(unit["RestrictAddressFamilies"][0].split()) == {"AF_UNIX", "AF_NETLINK"}
    assert "@system-service" in unit["SystemCallFilter"]
    assert unit["UMask"] == ["0077"]


def test_the_service_does_not_import_from_its_writable_home(tmp_path):
    """The unit's environment turns user site-packages off: a .pth file in the service's (writable) home is not
    run. Checked with a real venv made as install.sh makes it (system site-packages on)."""
    import subprocess
    import sys

    env_lines = [line.split("=", 1)[1] for line in (ROOT / "systemd" / "xnorcam.service").read_text().splitlines()
                 if line.startswith("Environment=")]
    unit_env = dict(pair.split("=", 1) for line in env_lines for pair in line.split())
    assert unit_env.get("PYTHONNOUSERSITE") == "1"
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    home = tmp_path / "home"
    site = home / ".local" / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    site.mkdir(parents=True)
    marker = tmp_path / "pwned"
    (site / "evil.pth").write_text(f"import pathlib; pathlib.Path({str(marker)!r}).write_text('x')\n")
    base = {"HOME": str(home), "PATH": "/usr/bin:/bin"}
    subprocess.run([str(venv / "bin" / "python"), "-c", "pass"], env=base, check=True)
    assert marker.exists()  # without the unit's setting the .pth runs: the test can fail
    marker.unlink()
    subprocess.run([str(venv / "bin" / "python"), "-c", "pass"], env={**base, "PYTHONNOUSERSITE": "1"}, check=True)
    assert not marker.exists()
