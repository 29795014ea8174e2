"""The requirement files: pinned, runtime-only where it matters, installable on the Pi.

The resolver check asks pip what it would install for a Raspberry Pi
(aarch64 wheels only) on Python 3.11 (Bookworm) and 3.13 (Trixie). pip
evaluates environment markers against the machine it runs on, not against
--platform/--python-version, so the markers are evaluated here for the Pi
first and pip gets the resulting plain pins.
"""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
FILES = ("requirements.txt", "requirements-dev.txt", "requirements-train.txt")
RUNTIME = {"numpy", "numba", "llvmlite", "opencv-python-headless", "paho-mqtt"}
PI_PLATFORMS = ("manylinux_2_28_aarch64", "manylinux_2_17_aarch64", "manylinux2014_aarch64")
# What Raspberry Pi OS ships as python3-numpy (used from the venv through
# --system-site-packages, so the pins must match it exactly).
PI_SYSTEMS = {"3.11": {"numpy": "1.24.2"}, "3.13": {"numpy": "2.2.4"}}
NETWORK_ERRORS = (
    "NewConnectionError",
    "Failed to establish a new connection",
    "Temporary failure in name resolution",
    "Name or service not known",
    "Network is unreachable",
    "ConnectTimeout",
    "ReadTimeout",
    "ProxyError",
    "Max retries exceeded",
)


def requirement_lines(name: str) -> list[str]:
    out = []
    for raw in (ROOT / name).read_text().splitlines():
        line = raw.split(" #")[0].strip()
        if line and not line.startswith("#"):
            out.append(line)
    return out


def requirements(name: str) -> list[Requirement]:
    """The requirements of one file, following -r includes."""
    out = []
    for line in requirement_lines(name):
        if line.startswith("-r "):
            out += requirements(line[3:].strip())
        else:
            out.append(Requirement(line))
    return out


def pi_environment(python: str) -> dict[str, str]:
    env = dict(default_environment())
    env.update(
        platform_machine="aarch64",
        platform_system="Linux",
        sys_platform="linux",
        python_version=python,
        python_full_version=f"{python}.0",
        implementation_name="cpython",
        platform_python_implementation="CPython",
    )
    return env


def pins_for(env: dict[str, str], name: str = "requirements.txt") -> dict[str, str]:
    pins = {}
    for req in requirements(name):
        if req.marker is None or req.marker.evaluate(env):
            key = canonicalize_name(req.name)
            assert key not in pins, f"{req.name} is pinned twice for {env['python_version']}"
            pins[key] = str(req.specifier)
    return pins


@pytest.mark.parametrize("name", FILES)
def test_every_requirement_is_pinned_exactly(name):
    reqs = requirements(name)
    assert reqs, name
    for req in reqs:
        specs = list(req.specifier)
        assert len(specs) == 1 and specs[0].operator == "==", f"{name}: {req} is not pinned with =="


def test_runtime_requirements_are_runtime_only():
    names = {canonicalize_name(r.name) for r in requirements("requirements.txt")}
    assert names == RUNTIME
    # picamera2 comes from apt on the Pi; sdnotify is replaced by app/service.py.
    for name in FILES:
        text = (ROOT / name).read_text().lower()
        assert "picamera2==" not in text and "sdnotify" not in text


def test_torch_is_pinned_to_the_cpu_wheel_release():
    pins = {canonicalize_name(r.name): str(r.specifier) for r in requirements("requirements-train.txt")}
    assert pins["torch"] == "==2.13.0"
    assert "torch" not in {canonicalize_name(r.name) for r in requirements("requirements-dev.txt")}


@pytest.mark.parametrize("python", sorted(PI_SYSTEMS))
def test_pi_pins_fit_the_system_numpy(python):
    pins = pins_for(pi_environment(python))
    assert set(pins) == RUNTIME
    assert pins["numpy"] == "==" + PI_SYSTEMS[python]["numpy"]
    opencv = Version(pins["opencv-python-headless"].lstrip("="))
    if Version(PI_SYSTEMS[python]["numpy"]).major < 2:
        # opencv-python(-headless) 4.12 and later require numpy 2.
        assert opencv < Version("4.12")


def test_installed_versions_match_the_pins():
    """CI tests what the team tested: this environment has the pinned versions."""
    env = dict(default_environment())
    checked = []
    for name in FILES:
        for req in requirements(name):
            if req.marker is not None and not req.marker.evaluate(env):
                continue
            try:
                installed = metadata.version(req.name)
            except metadata.PackageNotFoundError:
                continue
            assert req.specifier.contains(installed, prereleases=True), f"{req.name} {installed} does not match {req}"
            checked.append(canonicalize_name(req.name))
    assert {"numpy", "numba", "pytest"} <= set(checked)


@pytest.mark.parametrize("python", sorted(PI_SYSTEMS))
def test_pi_wheels_resolve(python, tmp_path):
    pins = pins_for(pi_environment(python))
    pinned = tmp_path / "pi-requirements.txt"
    pinned.write_text("".join(f"{name}{spec}\n" for name, spec in sorted(pins.items())))
    report = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--only-binary=:all:"]
    for platform in PI_PLATFORMS:
        cmd += ["--platform", platform]
    cmd += ["--python-version", python, "--implementation", "cp", "--target", str(tmp_path / "target")]
    cmd += ["--retries", "1", "--timeout", "30", "--quiet", "--report", str(report), "-r", str(pinned)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    if result.returncode != 0 and any(err in output for err in NETWORK_ERRORS):
        pytest.skip(f"no package registry reachable, aarch64 resolution for Python {python} not checked")
    assert result.returncode == 0, output
    chosen = {
        canonicalize_name(item["metadata"]["name"]): item["metadata"]["version"]
        for item in json.loads(report.read_text())["install"]
    }
    for name, spec in pins.items():
        assert chosen.get(name) == spec.lstrip("="), (name, chosen)
    for name, version in PI_SYSTEMS[python].items():
        assert chosen[name] == version
