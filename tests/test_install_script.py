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
@pytest.mark.parametrize("script", ["deploy/install.sh", "deploy/deploy.sh", ".ci/run"])
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


def test_no_camera_leaves_only_picamera2_out(stubs):
    # For a Debian without Raspberry Pi's packages (make test-emulated): everything else is the same plan.
    plain = install_sh(stubs, "--dry-run")
    bare = install_sh(stubs, "--dry-run", "--no-camera")
    assert plain.returncode == bare.returncode == 0, plain.stderr + bare.stderr
    assert stub_calls(stubs) == ""

    def apt_installs(out: str) -> list[str]:
        return [line for line in out.splitlines() if "apt-get install" in line]

    assert not any("python3-picamera2" in line for line in apt_installs(bare.stdout))
    picamera2 = subprocess.run(["dpkg-query", "-W", "-f=${Status}", "python3-picamera2"], capture_output=True,
                               text=True) if shutil.which("dpkg-query") else None
    if picamera2 is None or picamera2.stdout != "install ok installed":
        assert any("python3-picamera2" in line for line in apt_installs(plain.stdout))
    others = [line for line in plain.stdout.splitlines() if "apt" not in line]
    assert others == [line for line in bare.stdout.splitlines() if "apt" not in line]


def test_uninstall_keeps_config_and_logs(stubs):
    before = snapshot()
    result = install_sh(stubs, "--dry-run", "--uninstall")
    assert result.returncode == 0, result.stdout + result.stderr
    assert stub_calls(stubs) == "" and snapshot() == before
    out = result.stdout
    assert "systemctl disable --now xnorcam.service" in out
    assert "rm -rf /opt/xnorcam /var/cache/xnorcam" in out
    # The state directory holds the snapshots and recordings (the example config's): kept like the logs.
    assert "keeping /etc/xnorcam, /var/lib/xnorcam and /var/log/xnorcam" in out
    assert not re.search(r"rm -rf .*(/etc/xnorcam|/var/log/xnorcam|/var/lib/xnorcam)", out)


def test_uninstall_purge_removes_config_and_logs(stubs):
    result = install_sh(stubs, "--dry-run", "--uninstall", "--purge")
    assert result.returncode == 0, result.stderr
    assert "rm -rf /etc/xnorcam /var/lib/xnorcam /var/log/xnorcam" in result.stdout
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


FAKE_PYTHON = """#!/bin/bash
# Stands in for the system python3 and the venv's python: logs, and fakes
# just enough output (numpy and Python versions, a venv directory).
echo "python $*" >> "$XN_LOG"
case "$1" in
    -c) case "$2" in *numpy*) echo 1.24.2 ;; *version_info*) echo 3.11 ;; esac ;;
    -m) if [[ $2 == venv ]]; then
            mkdir -p "$4/bin" && cp "$0" "$4/bin/python"
            echo "include-system-site-packages = true" > "$4/pyvenv.cfg"
        fi ;;
esac
"""
FAKE_COMMANDS = {
    # Logged and successful: they would change users, packages and systemd.
    **{name: f'echo "{name} $*" >> "$XN_LOG"\n' for name in ("apt-get", "useradd", "usermod", "userdel", "systemctl")},
    "getent": "exit 0\n",
    "dpkg-query": "printf 'install ok installed'\n",
    # Runs the command as the current user.
    "runuser": 'echo "runuser $*" >> "$XN_LOG"\nwhile [[ $1 != -- ]]; do shift; done\nshift\nexec "$@"\n',
    # The real install(1), minus ownership (no xnorcam user on the test machine).
    "install": 'a=()\nwhile (($#)); do case $1 in -o|-g) shift 2 ;; *) a+=("$1"); shift ;; esac; done\n'
    'exec /usr/bin/install "${a[@]}"\n',
}


@pytest.fixture()
def staged(tmp_path):
    """A copy of the project whose install.sh writes under tmp_path/root, with system commands faked."""
    proj, root, bin_dir = tmp_path / "proj", tmp_path / "root", tmp_path / "bin"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("app", "models", "systemd", "deploy"):
        if (ROOT / name).exists():
            shutil.copytree(ROOT / name, proj / name, ignore=ignore)
    for name in ("requirements.txt", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, proj / name)
    if not (proj / "deploy/config.example.toml").exists():
        (proj / "deploy/config.example.toml").write_text("# example\n")
    script = proj / "deploy/install.sh"
    text = script.read_text()
    for name in ("PREFIX", "CONF_DIR", "UNIT_DST", "CACHE_DIR", "STATE_DIR", "LOG_DIR"):
        text, n = re.subn(rf"^readonly {name}=/", f"readonly {name}={root}/", text, flags=re.M)
        assert n == 1, name
    fake_python = bin_dir / "python3"
    text, n = re.subn(r"^readonly SYSTEM_PYTHON=.*$", f"readonly SYSTEM_PYTHON={fake_python}", text, flags=re.M)
    assert n == 1
    script.write_text(text)
    bin_dir.mkdir()
    fake_python.write_text(FAKE_PYTHON)
    for name, body in FAKE_COMMANDS.items():
        (bin_dir / name).write_text("#!/bin/bash\n" + body)
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    (root / "etc/systemd/system").mkdir(parents=True)
    log = tmp_path / "calls.log"
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", XNORCAM_SKIP_PI_CHECK="1", XN_LOG=str(log))

    def run(*args: str) -> tuple[subprocess.CompletedProcess, list[str]]:
        log.write_text("")
        result = subprocess.run(
            ["bash", str(script), *args], capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, timeout=120
        )
        return result, log.read_text().splitlines()

    return proj, root, run


@pytest.mark.skipif(os.geteuid() != 0, reason="install.sh refuses to run as non-root")
def test_real_install_into_a_staged_root(staged):
    proj, root, run = staged
    opt = root / "opt/xnorcam"
    result, calls = run()
    assert result.returncode == 0, result.stdout + result.stderr
    # The program: app and models, not tests or caches.
    assert (opt / "app/app/service.py").is_file()
    assert not (opt / "app/tests").exists() and not (opt / "app/app.new").exists()
    assert not list((opt / "app").rglob("*.pyc"))  # compileall was faked; none copied
    # pip: the system numpy pinned, requirements.txt without its numpy lines.
    assert (opt / "constraints.txt").read_text().splitlines()[-1] == "numpy==1.24.2"
    pi_reqs = (opt / "requirements-pi.txt").read_text()
    assert "numba==" in pi_reqs and "opencv-python-headless==" in pi_reqs
    assert not re.search(r"^\s*numpy", pi_reqs, re.M)
    pip = [c for c in calls if " -m pip install" in c]
    assert len(pip) == 1 and f"-c {opt}/constraints.txt -r {opt}/requirements-pi.txt" in pip[0]
    # Config from the example, unit installed, cache warmed as the service user, then started.
    conf = root / "etc/xnorcam/config.toml"
    assert conf.read_text() == (proj / "deploy/config.example.toml").read_text()
    assert (root / "etc/systemd/system/xnorcam.service").read_text() == (proj / "systemd/xnorcam.service").read_text()
    assert any(c.startswith("python -m venv --system-site-packages") for c in calls)
    steps = ["python -m venv", " -m pip install", "runuser -u xnorcam", "-m app --warmup-only", "systemctl enable"]
    steps.append("systemctl restart xnorcam.service")
    where = [next((i for i, c in enumerate(calls) if s in c), -1) for s in steps]
    assert -1 not in where, (steps, calls)
    assert where == sorted(where), calls

    # Again: an upgrade keeps the venv and an edited config.
    conf.write_text("# edited by the owner\n")
    result, calls = run()
    assert result.returncode == 0, result.stdout + result.stderr
    assert not any("-m venv" in c for c in calls)
    assert conf.read_text() == "# edited by the owner\n"
    assert "keeping the existing" in result.stdout

    # Uninstall keeps config, state (snapshots, recordings) and logs; purge removes them.
    (root / "var/log/xnorcam").mkdir(parents=True)
    (root / "var/lib/xnorcam/snapshots").mkdir(parents=True)
    result, calls = run("--uninstall")
    assert result.returncode == 0, result.stdout + result.stderr
    assert not opt.exists() and conf.exists() and (root / "var/log/xnorcam").exists()
    assert (root / "var/lib/xnorcam/snapshots").exists()
    assert "systemctl disable --now xnorcam.service" in calls and "userdel xnorcam" in calls
    result, _ = run("--uninstall", "--purge")
    assert result.returncode == 0
    assert not (root / "etc/xnorcam").exists() and not (root / "var/log/xnorcam").exists()
    assert not (root / "var/lib/xnorcam").exists()
