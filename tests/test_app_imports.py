"""`app` is the Pi runtime: it imports only what the Pi has (the standard library, numpy, numba, opencv, paho-mqtt).

torch, pycocotools and the rest of the development tools are never installed on the Pi, and the
layers point one way (app <- evaluation <- train). Every app module is imported, and the CLI's
entry points run, in a fresh interpreter where any other top-level package refuses to load.
"""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PI_PACKAGES = {"numpy", "numba", "llvmlite", "cv2", "paho", "app"}

GUARD = r"""
import importlib.abc, sys
allowed = set(sys.stdlib_module_names) | set({pi!r})
refused = []

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        # numpy, numba and cv2 import their own optional helpers; only what app itself reaches matters,
        # so a refusal is recorded when the importing frame is app code.
        if top in allowed:
            return None
        caller = sys._getframe(1)
        while caller is not None and "importlib" in caller.f_code.co_filename:
            caller = caller.f_back
        if caller is not None and "/app/" in caller.f_code.co_filename.replace("\\", "/"):
            refused.append((name, caller.f_code.co_filename))
            raise ImportError(f"{{name}} is not on the Pi (imported by {{caller.f_code.co_filename}})")
        return None

sys.meta_path.insert(0, Refuse())
for blocked in ("torch", "pycocotools", "matplotlib", "evaluation", "train", "tqdm", "hypothesis", "pytest"):
    sys.modules[blocked] = None  # a direct import of any of these fails, wherever it comes from
"""


def _app_modules() -> list:
    return sorted(f"app.{m.name}" for m in pkgutil.iter_modules([str(ROOT / "app")]))


def _run(body: str) -> subprocess.CompletedProcess:
    code = GUARD.format(pi=sorted(PI_PACKAGES)) + body
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_every_app_module_imports_without_development_packages():
    modules = _app_modules()
    assert "app.detector" in modules and "app.__main__" in modules and len(modules) >= 15
    r = _run(
        "import importlib\n"
        f"for m in {modules!r}:\n"
        "    importlib.import_module(m)\n"
        "print('refused', refused)\n"
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "refused []"


def test_the_cli_entry_points_run_without_development_packages():
    r = _run(
        "import app.__main__ as m\n"
        "for argv in (['--help'], ['bench', '--help']):\n"
        "    try:\n"
        "        m.main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print('refused', refused)\n"
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "refused []"


@pytest.mark.parametrize("blocked", ["torch", "pycocotools", "evaluation", "tomli_w"])
def test_the_guard_catches_an_app_module_that_imports_a_development_package(tmp_path, blocked):
    """The check can fail: an app module that imports one of them is refused."""
    probe = ROOT / "app" / f"_probe_{blocked}.py"
    probe.write_text(f"import {blocked}\n")
    try:
        r = _run(f"import app._probe_{blocked}\n")
    finally:
        probe.unlink()
    assert r.returncode != 0 and ("ImportError" in r.stderr or "ModuleNotFoundError" in r.stderr)
    assert blocked in r.stderr.splitlines()[-1]
