"""deploy/install.sh: shellcheck clean, and its --dry-run plan on a non-Pi machine.

The dry runs happen with every command that could change the system replaced
by a stub that records its call and fails, so a dry run that touched anything
would show up in the stub log (and fail), not on the CI machine.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "deploy" / "install.sh"
UNIT = ROOT / "systemd" / "xnorcam.service"
MUTATING = (
    "apt-get", "apt", "dpkg", "useradd", "usermod", "userdel", "groupadd", "systemctl", "runuser", "sudo",
    "install", "cp", "mv", "rm", "mkdir", "tar", "ln", "chown", "chmod", "tee", "pip", "pip3",
)  # fmt: skip
TARGETS = (
    "/opt/xnorcam",
    "/etc/xnorcam",
    "/etc/systemd/system/xnorcam.service",
    "/var/cache/xnorcam",
    "/var/lib/xnorcam",
    "/var/log/xnorcam",
)
ON_A_PI = Path("/proc/device-tree/model").exists() and b"Raspberry Pi" in Path("/proc/device-tree/model").read_bytes()


@pytest.fixture()
def stubs(tmp_path):
    """A PATH directory where each system-changing command only logs its call."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    for name in MUTATING:
        stub = bin_dir / name
        stub.write_text(f'#!/bin/sh\necho "{name} $*" >> "{log}"\nexit 97\n')
        stub.chmod(0o755)
    return bin_dir, log


def snapshot() -> dict[str, tuple | None]:
    out = {}
    for target in TARGETS:
        try:
            st = os.stat(target)
            out[target] = (st.st_mode, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            out[target] = None
    user = subprocess.run(["getent", "passwd", "xnorcam"], capture_output=True, text=True).stdout
    out["user xnorcam"] = (user,)
    return out


def install_sh(stubs, *args: str, skip_pi_check: bool = True) -> subprocess.CompletedProcess:
    bin_dir, _ = stubs
    env = {k: v for k, v in os.environ.items() if k != "XNORCAM_SKIP_PI_CHECK"}
    env["PATH"] = f"{bin_dir}:{env.get('PATH', '/usr/bin:/bin')}"
    if skip_pi_check:
        env["XNORCAM_SKIP_PI_CHECK"] = "1"
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, timeout=60
    )


def stub_calls(stubs) -> str:
    _, log = stubs
    return log.read_text() if log.exists() else ""


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed (.ci/run installs it)")
@pytest.mark.parametrize("script", ["deploy/install.sh", ".ci/run"])
def test_shellcheck_clean(script):
    result = subprocess.run(["shellcheck", "--severity=style", script], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_install_dry_run_plans_everything_and_changes_nothing(stubs):
    before = snapshot()
    result = install_sh(stubs, "--dry-run")
    assert result.returncode == 0, result.stdout + result.stderr
    assert stub_calls(stubs) == ""
    assert snapshot() == before
    out = result.stdout
    assert "dry run: nothing will be changed" in out
    assert "skipping the Raspberry Pi and 64-bit checks" in out
    # Every change is announced as a dry-run action; the key ones:
    for expected in (
        "/usr/bin/python3 -m venv --system-site-packages /opt/xnorcam/venv",
        "numpy==",
        "/opt/xnorcam/venv/bin/python -m pip install",
        "--only-binary=:all: -c /opt/xnorcam/constraints.txt",
        "tar -C /opt/xnorcam/app.new",
        "mv -T /opt/xnorcam/app.new /opt/xnorcam/app",
        "install -m 0644 -o root -g root " + str(ROOT / "systemd/xnorcam.service") + " /etc/systemd/system/xnorcam.service",
        "systemctl daemon-reload",
        "runuser -u xnorcam -- env -C /opt/xnorcam/app NUMBA_CACHE_DIR=/var/cache/xnorcam/numba",
        "systemctl enable xnorcam.service",
        "systemctl restart xnorcam.service",
    ):
        assert any(expected in line for line in out.splitlines() if line.startswith("[dry-run]")), expected
    # apt: either already there (a Pi) or installed without recommends.
    assert "apt packages already installed" in out or "apt-get install -y --no-install-recommends" in out
    # The service user, created or found, in the camera and display groups.
    assert "useradd --system" in out or "user xnorcam exists" in out
    if (ROOT / "deploy/config.example.toml").exists() and not Path("/etc/xnorcam/config.toml").exists():
        assert "deploy/config.example.toml /etc/xnorcam/config.toml" in out
    # The order matters: code and venv before the warm-up, warm-up before the start.
    order = [out.index(s) for s in ("--system-site-packages", "pip install", "runuser", "systemctl restart")]
    assert order == sorted(order)


def test_dry_run_is_repeatable(stubs):
    first = install_sh(stubs, "--dry-run")
    second = install_sh(stubs, "--dry-run")
    assert first.returncode == second.returncode == 0
    assert first.stdout == second.stdout


def test_no_start(stubs):
    result = install_sh(stubs, "--dry-run", "--no-start")
    assert result.returncode == 0, result.stderr
    assert "systemctl enable xnorcam.service" in result.stdout
    assert "systemctl restart" not in result.stdout


def test_uninstall_keeps_config_and_logs(stubs):
    before = snapshot()
    result = install_sh(stubs, "--dry-run", "--uninstall")
    assert result.returncode == 0, result.stdout + result.stderr
    assert stub_calls(stubs) == "" and snapshot() == before
    out = result.stdout
    assert "systemctl disable --now xnorcam.service" in out
    assert "rm -rf /opt/xnorcam /var/cache/xnorcam /var/lib/xnorcam" in out
    assert "keeping /etc/xnorcam and /var/log/xnorcam" in out
    assert not re.search(r"rm -rf .*(/etc/xnorcam|/var/log/xnorcam)", out)


def test_uninstall_purge_removes_config_and_logs(stubs):
    result = install_sh(stubs, "--dry-run", "--uninstall", "--purge")
    assert result.returncode == 0, result.stderr
    assert "rm -rf /etc/xnorcam /var/log/xnorcam" in result.stdout
    assert stub_calls(stubs) == ""


@pytest.mark.parametrize("args", [["--bogus"], ["--purge"], ["--dry-run", "extra"]])
def test_bad_arguments_exit_2(stubs, args):
    result = install_sh(stubs, *args)
    assert result.returncode == 2
    assert "usage:" in result.stderr
    assert stub_calls(stubs) == ""


@pytest.mark.skipif(ON_A_PI, reason="this machine is a Raspberry Pi")
def test_refuses_a_machine_that_is_not_a_pi(stubs):
    before = snapshot()
    result = install_sh(stubs, "--dry-run", skip_pi_check=False)
    assert result.returncode == 1
    assert "not a Raspberry Pi" in result.stderr and "XNORCAM_SKIP_PI_CHECK" in result.stderr
    assert stub_calls(stubs) == "" and snapshot() == before
    assert "[dry-run]" not in result.stdout


def shell_constants(text: str) -> dict[str, str]:
    """readonly NAME=value lines of install.sh, with $OTHER expanded."""
    values: dict[str, str] = {}
    for name, value in re.findall(r"^readonly (\w+)=(\S+)$", text, re.M):
        values[name] = re.sub(r"\$(\w+)", lambda m: values[m.group(1)], value)
    return values


def test_paths_agree_with_the_unit():
    const = shell_constants(SCRIPT.read_text())
    unit = UNIT.read_text()
    assert f"ExecStart={const['VENV']}/bin/python -m app --config {const['CONF']}" in unit
    assert f"WorkingDirectory={const['APP_DIR']}" in unit
    assert f"NUMBA_CACHE_DIR={const['NUMBA_CACHE']}" in unit
    assert const["CACHE_DIR"] == "/var/cache/xnorcam" and "CacheDirectory=xnorcam" in unit
    assert const["LOG_DIR"] == "/var/log/xnorcam" and "LogsDirectory=xnorcam" in unit
    assert const["STATE_DIR"] == "/var/lib/xnorcam" and "StateDirectory=xnorcam" in unit
    assert f"User={const['SERVICE_USER']}" in unit
    assert const["UNIT_DST"].endswith("/" + UNIT.name)
