"""`make deploy`: HOST and INSTALL_ARGS are data, never shell text or ssh options.

ssh is replaced on PATH by a recorder (there is no Pi here): it writes its argv, one
argument per line, and keeps the tarball it is fed, so the tests see exactly what
would have run on the Pi and what would have been copied.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")

FAKE_SSH = r"""#!/usr/bin/env bash
n=$(ls "$SSH_LOG_DIR" | grep -c '^call' || true)
printf '%s\n' "$@" > "$SSH_LOG_DIR/call$n.argv"
cat > "$SSH_LOG_DIR/call$n.stdin"
"""


@pytest.fixture
def fake_ssh(tmp_path: Path) -> Path:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    ssh = bindir / "ssh"
    ssh.write_text(FAKE_SSH)
    ssh.chmod(0o755)
    logdir = tmp_path / "ssh-log"
    logdir.mkdir()
    return logdir


def deploy(logdir: Path, tmp_path: Path, *make_args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}", SSH_LOG_DIR=str(logdir))
    env.pop("MAKEFLAGS", None)
    # cwd is a scratch directory: anything a hostile value managed to run would land there or in tmp_path.
    return subprocess.run(["make", "-s", "-C", str(ROOT), "deploy", *make_args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)


def calls(logdir: Path) -> list[list[str]]:
    return [p.read_text().splitlines() for p in sorted(logdir.glob("call*.argv"))]


HOSTILE_HOSTS = [
    "pi@h; touch {canary} #",
    "pi@h && touch {canary}",
    "pi@h`touch {canary}`",
    "pi@$(touch {canary})",
    "$(shell touch {canary})",  # make's own syntax: make must not expand it either
    "-oProxyCommand=touch {canary}",
    "-oProxyCommand=sh -c 'touch {canary}' pi@h",
    "pi@h\ntouch {canary}",
    "pi@h | touch {canary}",
    "pi@-oProxyCommand=touch",
    "pi@h 'touch {canary}'",
]


@pytest.mark.parametrize("host", HOSTILE_HOSTS)
def test_hostile_host_is_refused_and_nothing_runs(fake_ssh: Path, tmp_path: Path, host: str) -> None:
    canary = tmp_path / "PWNED"
    r = deploy(fake_ssh, tmp_path, f"HOST={host.format(canary=canary)}")
    assert r.returncode != 0
    assert "is not [user@]host" in r.stderr, r.stderr
    assert not canary.exists(), "a hostile HOST ran a command on this machine"
    assert calls(fake_ssh) == [], "ssh was called with a hostile HOST"


HOSTILE_ARGS = [
    "--dry-run'; touch {canary}; '",
    "--dry-run; touch {canary}",
    "--dry-run $(touch {canary})",
    '--dry-run" && touch {canary} && "',
    "--dry-run `touch {canary}`",
    "--force",  # not one of install.sh's flags
    "-h",  # prints usage and installs nothing: not a deploy
]


@pytest.mark.parametrize("args", HOSTILE_ARGS)
def test_hostile_install_args_are_refused(fake_ssh: Path, tmp_path: Path, args: str) -> None:
    canary = tmp_path / "PWNED"
    r = deploy(fake_ssh, tmp_path, "HOST=pi@xnorcam.local", f"INSTALL_ARGS={args.format(canary=canary)}")
    assert r.returncode != 0
    assert "is not one of install.sh's flags" in r.stderr, r.stderr
    assert not canary.exists()
    assert calls(fake_ssh) == [], "ssh was called with hostile INSTALL_ARGS"


@pytest.mark.parametrize("host", ["pi@xnorcam.local", "pi@192.168.1.20", "xnorcam", "pi@fe80::1%wlan0",
                                  "pi@[2001:db8::7]", "camera_1@garage-pi"])
def test_valid_host_reaches_ssh_as_one_argument_after_the_option_end(fake_ssh: Path, tmp_path: Path,
                                                                      host: str) -> None:
    r = deploy(fake_ssh, tmp_path, f"HOST={host}", "INSTALL_ARGS=--dry-run --no-start")
    assert r.returncode == 0, r.stderr
    copy, install = calls(fake_ssh)
    assert copy == ["--", host, "rm -rf xnorcam-src && mkdir xnorcam-src && tar -xzf - -C xnorcam-src"]
    assert install == ["-t", "--", host, "sudo bash xnorcam-src/deploy/install.sh --dry-run --no-start"]


def test_no_install_args_runs_the_plain_installer(fake_ssh: Path, tmp_path: Path) -> None:
    r = deploy(fake_ssh, tmp_path, "HOST=pi@xnorcam.local")
    assert r.returncode == 0, r.stderr
    assert calls(fake_ssh)[1][-1] == "sudo bash xnorcam-src/deploy/install.sh"


def test_missing_host_prints_usage(fake_ssh: Path, tmp_path: Path) -> None:
    r = deploy(fake_ssh, tmp_path)
    assert r.returncode != 0
    assert "usage: make deploy HOST=" in r.stderr
    assert calls(fake_ssh) == []


def test_the_copy_holds_the_project_and_not_the_local_state(fake_ssh: Path, tmp_path: Path) -> None:
    r = deploy(fake_ssh, tmp_path, "HOST=pi@xnorcam.local")
    assert r.returncode == 0, r.stderr
    with tarfile.open(fake_ssh / "call0.stdin", "r:gz") as tar:
        names = {n.removeprefix("./") for n in tar.getnames()}
    assert {"deploy/install.sh", "app/__main__.py", "requirements.txt", "systemd/xnorcam.service"} <= names
    for local in (".venv", ".git", "runs", ".emulated", ".numba_cache"):
        assert not any(n == local or n.startswith(local + "/") for n in names), local
