"""Paths under the service's sandbox (systemd/xnorcam.service: ProtectHome=yes, ProtectSystem=strict).

The example config's paths must work under the shipped unit, and a configured path that the sandbox
hides or keeps read-only is refused at start with one line that says so and names where the service may
write. The sandbox is emulated here the way systemd builds it: a private mount namespace with an
inaccessible (mode 000) tmpfs on /home, the root remounted read-only, the state directory bound
writable, and the process without the capabilities that would let root walk past file modes.
"""

from __future__ import annotations

import errno
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from app import config as configmod
from app.sandbox import hint, writable_dirs
from tests.reliability.support import ROOT, UNIT, child_env

EXAMPLE = ROOT / "deploy" / "config.example.toml"
# Keys whose paths the app writes; every other path in the example is read.
WRITE_KEYS = {"preview.record", "log.path", "events.snapshot_dir"}


def unit_settings() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def unit_writable() -> list[str]:
    """What the unit lets the service write, as systemd reads StateDirectory= etc. (relative to /var/...)."""
    s = unit_settings()
    assert s.get("ProtectSystem") == ["strict"], "the test assumes ProtectSystem=strict"
    roots = {"StateDirectory": "/var/lib", "LogsDirectory": "/var/log", "CacheDirectory": "/var/cache"}
    dirs = [f"{roots[k]}/{name}" for k in roots for v in s.get(k, []) for name in v.split()]
    dirs += [p.lstrip("-") for v in s.get("ReadWritePaths", []) for p in v.split()]
    return dirs


def unit_unreadable() -> list[str]:
    s = unit_settings()
    hidden = []
    if s.get("ProtectHome", ["no"])[-1] in ("yes", "true", "tmpfs", "read-only"):
        hidden += ["/home", "/root", "/run/user"]
    if s.get("PrivateTmp", ["no"])[-1] in ("yes", "true"):
        hidden += ["/tmp", "/var/tmp"]  # the service's own, empty: a file put there from outside is not in it
    return hidden


def within(path: str, tree: str) -> bool:
    return path == tree or path.startswith(tree.rstrip("/") + "/")


PATH_RE = re.compile(r"(?<![\w./~-])/[\w.*+-]+(?:/[\w.*+-]+)*")


def example_paths() -> list[tuple[str, str]]:
    """(key, absolute path) for every path the example names, in values and in the comments above each key.
    The header (before the first table) explains the sandbox itself and is not an example."""
    out, pending, table = [], [], None
    for line in EXAMPLE.read_text().splitlines():
        stripped = line.strip()
        m = re.match(r"^\[(\w+)\]$", stripped)
        if m:
            table, pending = m.group(1), []
            continue
        if table is None:
            continue
        if stripped.startswith("#"):
            pending += PATH_RE.findall(stripped)
            continue
        m = re.match(r"^(\w+)\s*=\s*(.*)$", stripped)
        if m:
            key = f"{table}.{m.group(1)}"
            out += [(key, p) for p in pending + PATH_RE.findall(m.group(2))]
            pending = []
    return out


def test_the_example_paths_are_found():
    """Guards the test below: it must see the example paths it judges."""
    keys = {k for k, _ in example_paths()}
    assert {"source.spec", "preview.record", "log.path", "events.snapshot_dir", "web.secret_file"} <= keys


def test_every_example_path_works_under_the_shipped_unit():
    writable, hidden = unit_writable(), unit_unreadable()
    assert "/var/lib/xnorcam" in writable and "/home" in hidden
    bad = []
    for key, path in example_paths():
        if key in WRITE_KEYS and not any(within(path, d) for d in writable):
            bad.append(f"{key}: {path} is not under a directory the unit makes writable ({', '.join(writable)})")
        if any(within(path, h) for h in hidden):
            bad.append(f"{key}: {path} is hidden from the service (ProtectHome=/PrivateTmp=)")
    assert not bad, "\n".join(bad)


def test_the_example_config_loads_and_its_paths_fit_the_unit():
    cfg = configmod.load(EXAMPLE)
    writable = unit_writable()
    for key, value in (("log.path", cfg.log.path), ("events.snapshot_dir", cfg.events.snapshot_dir),
                       ("preview.record", cfg.preview.record)):
        assert not value or any(within(value, d) for d in writable), (key, value)


def test_the_app_names_the_units_writable_directories():
    """The hint's fallback list (no $STATE_DIRECTORY...) is what the unit grants."""
    assert sorted(writable_dirs({})) == sorted(unit_writable())


# --- the hint itself --------------------------------------------------------------------------------------

SYSTEMD = {"INVOCATION_ID": "0123abcd", "STATE_DIRECTORY": "/var/lib/xnorcam", "LOGS_DIRECTORY": "/var/log/xnorcam"}


@pytest.mark.parametrize("path", ["/home/pi/x.mp4", "/root/x.jsonl", "/run/user/1000/snaps", "/home"])
@pytest.mark.parametrize("error", [errno.EACCES, errno.ENOENT, errno.EPERM, errno.EROFS])
def test_hidden_trees_under_systemd_are_blamed_on_protecthome(path, error):
    w = hint(path, error, writing=True, environ=SYSTEMD)
    assert "sandbox" in w and "ProtectHome=yes" in w and "/var/lib/xnorcam" in w and "/var/log/xnorcam" in w
    r = hint(path, error, writing=False, environ=SYSTEMD)
    assert "ProtectHome=yes" in r and "read" in r


@pytest.mark.parametrize("path", ["/srv/rec.mp4", "/usr/local/x.jsonl", "/etc/xnorcam/snaps", "/var/lib/other/x"])
@pytest.mark.parametrize("error", [errno.EROFS, errno.EACCES])
def test_read_only_trees_under_systemd_are_blamed_on_protectsystem(path, error):
    w = hint(path, error, writing=True, environ=SYSTEMD)
    assert "ProtectSystem=strict" in w and "/var/lib/xnorcam" in w and "ReadWritePaths=" in w


@pytest.mark.parametrize("path,error,writing,environ", [
    ("/home/pi/x.mp4", errno.EACCES, True, {}),  # not under systemd, /home not the sandbox's inaccessible node
    ("/srv/rec.mp4", errno.EROFS, True, {}),
    ("/var/lib/xnorcam/x.mp4", errno.EROFS, True, SYSTEMD),  # writable by the unit: a disk problem, not the sandbox
    ("/var/log/xnorcam/d.jsonl", errno.EACCES, True, SYSTEMD),
    ("/srv/rec.mp4", errno.ENOSPC, True, SYSTEMD),  # a full disk is not the sandbox
    ("/srv/rec.mp4", errno.ENOTDIR, True, SYSTEMD),
    ("/srv/photos", errno.EACCES, False, SYSTEMD),  # readable under ProtectSystem=: a plain permission problem
    ("", errno.EACCES, True, SYSTEMD),
])
def test_no_sandbox_blamed_where_it_is_not_the_cause(path, error, writing, environ):
    assert hint(path, error, writing, environ=environ) == ""


# --- the app under an emulated sandbox ------------------------------------------------------------------


def _can_emulate() -> str:
    if shutil.which("unshare") is None or shutil.which("setpriv") is None:
        return "unshare/setpriv not installed"
    r = subprocess.run(["unshare", "-m", "sh", "-c", "mount --make-rprivate / && mount -t tmpfs tmpfs /mnt"],
                       capture_output=True, text=True)
    return "" if r.returncode == 0 else f"no mount namespaces here ({r.stderr.strip()})"


NO_EMULATION = _can_emulate()
needs_emulation = pytest.mark.skipif(bool(NO_EMULATION), reason=NO_EMULATION)


def run_sandboxed(tmp_path: Path, *args: str, invocation: bool = True, hide_home: bool = True):
    """python -m app inside the emulated sandbox: /home inaccessible, / read-only, ``tmp_path/state`` writable
    (and named as $STATE_DIRECTORY), no DAC-override capabilities. /root is left alone (the interpreter may
    live there)."""
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    env = child_env(NUMBA_CACHE_DIR=str(state / "numba"), PYTHONDONTWRITEBYTECODE="1")
    env.pop("INVOCATION_ID", None)
    if invocation:
        env.update(INVOCATION_ID="0123abcd", STATE_DIRECTORY=str(state))
    drop = "-dac_override,-dac_read_search,-fowner"
    setup = ["mount --make-rprivate /"]
    if hide_home:
        setup.append("mount -t tmpfs -o mode=000 tmpfs /home")
    setup += [f"mount --bind {state} {state}", "mount -o remount,bind,ro /",
              f'exec setpriv --bounding-set={drop} --inh-caps={drop} "$0" -m app "$@"']
    return subprocess.run(["unshare", "-m", "sh", "-c", " && ".join(setup), sys.executable, *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def one_line(r) -> str:
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


HOME_CASES = {
    "record in /home (config)": (["--config", "{cfg_record}"], 78, "preview.record"),
    "record in /home (flag)": (["--record", "/home/pi/xnorcam.mp4"], 2, "preview.record"),
    "log in /home": (["--log", "/home/pi/detections.jsonl"], 78, "log /home/pi/detections.jsonl"),
    "snapshots in /home": (["--snapshots", "/home/pi/snaps"], 2, "events.snapshot_dir"),
    "images in /home": (["--source", "images:/home/pi/photos"], 78, "images:/home/pi/photos"),
    "a glob in /home": (["--source", "images:/home/pi/photos/*.jpg"], 78, "images:/home/pi/photos/*.jpg"),
    "a video in /home": (["--source", "opencv:/home/pi/clip.mp4"], 78, "opencv:/home/pi/clip.mp4"),
    "a model in /home": (["--model", "/home/pi/person.xnc"], 65, "/home/pi/person.xnc"),
    "a config in /home": (["--config", "/home/pi/config.toml"], 78, "config file /home/pi/config.toml"),
}


@needs_emulation
@pytest.mark.parametrize("case", sorted(HOME_CASES))
def test_a_path_in_home_under_the_sandbox_says_protecthome(tmp_path, case):
    args, code, names = HOME_CASES[case]
    cfg = tmp_path / "c.toml"
    cfg.write_text('[preview]\nrecord = "/home/pi/xnorcam.mp4"\n')
    args = [a.format(cfg_record=cfg) for a in args]
    if "--source" not in args:
        args += ["--source", "demo"]
    r = run_sandboxed(tmp_path, *args, "--preview", "none", "--max-frames", "1")
    line = one_line(r)
    assert r.returncode == code, r.stderr
    assert names in line and "sandbox hides /home" in line and "ProtectHome=yes" in line, line
    assert str(tmp_path / "state") in line, line  # where it may write or read instead


READ_ONLY_CASES = {
    "record under /srv": (["--record", "/srv/xnorcam-test/rec.mp4"], 2),
    "record over an existing file in /etc": (["--record", "/etc/hostname.mp4"], 2),
    "log under /var/log, not the unit's": (["--log", "/var/log/xnorcam-other/d.jsonl"], 78),
    "log at the top of /opt": (["--log", "/opt/d.jsonl"], 78),
    "snapshots under /usr": (["--snapshots", "/usr/local/xnorcam-snaps"], 2),
}


@needs_emulation
@pytest.mark.parametrize("case", sorted(READ_ONLY_CASES))
def test_a_read_only_path_under_the_sandbox_says_protectsystem(tmp_path, case):
    args, code = READ_ONLY_CASES[case]
    r = run_sandboxed(tmp_path, *args, "--source", "demo", "--preview", "none", "--max-frames", "1")
    line = one_line(r)
    assert r.returncode == code, r.stderr
    assert "Read-only file system" in line and "ProtectSystem=strict" in line and str(tmp_path / "state") in line


@needs_emulation
def test_the_same_failure_outside_systemd_does_not_blame_a_sandbox(tmp_path):
    r = run_sandboxed(tmp_path, "--record", "/srv/xnorcam-test/rec.mp4", "--source", "demo", "--preview", "none",
                      invocation=False, hide_home=False)
    line = one_line(r)
    assert r.returncode == 2 and "Read-only file system" in line and "sandbox" not in line, line


@needs_emulation
def test_the_inaccessible_home_alone_is_recognised_as_the_sandbox(tmp_path):
    """Without $INVOCATION_ID (a drop-in clearing the environment, a wrapper), /home as ProtectHome= leaves it
    (mode 000) still explains the failure."""
    r = run_sandboxed(tmp_path, "--log", "/home/pi/d.jsonl", "--source", "demo", "--preview", "none",
                      invocation=False)
    line = one_line(r)
    assert r.returncode == 78 and "ProtectHome=yes" in line and "/var/lib/xnorcam" in line, line


@needs_emulation
def test_the_example_config_passes_its_start_checks_under_the_sandbox(tmp_path):
    """The example's written paths, moved under the emulated state directory the way the unit's are under
    /var/lib and /var/log, pass every start check: the run gets as far as the model (a missing one here,
    exit 65), which loads after the log, recording and snapshot paths are checked."""
    state = tmp_path / "state"
    text = EXAMPLE.read_text()
    record = re.search(r'e\.g\. "(/var/lib/xnorcam/[^"]+\.mp4)"', text).group(1)  # the example's recording path
    text = text.replace('record = ""', f'record = "{record}"')
    for d in unit_writable():
        text = text.replace(f'"{d}/', f'"{state}{d}/')
    data = tomllib.loads(text)
    assert all(str(state) in v for v in (data["log"]["path"], data["events"]["snapshot_dir"], data["preview"]["record"]))
    cfg = tmp_path / "config.toml"
    cfg.write_text(text)
    r = run_sandboxed(tmp_path, "--config", str(cfg), "--source", "demo", "--preview", "none",
                      "--model", str(state / "missing.xnc"))
    assert r.returncode == 65 and "model file refused" in r.stderr and "configuration refused" not in r.stderr, r.stderr
    assert (state / "var/log/xnorcam/detections.jsonl").exists()  # the log was opened: it is writable there
