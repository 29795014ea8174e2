"""Nothing in the project unpickles: a model or data file must never run code.

Reads every .py file of the project as a syntax tree and refuses:
- importing pickle, cPickle, _pickle, dill, cloudpickle, shelve or joblib;
- any call passing ``allow_pickle=True``;
- ``np.load`` / ``numpy.load`` without an explicit ``allow_pickle=False``;
- ``torch.load`` without ``weights_only=True`` (it unpickles otherwise);
- ``pandas.read_pickle`` / ``pd.read_pickle``.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIP_DIRS = {".venv", "venv", ".git", "build", "dist", "runs", "node_modules", "__pycache__"}
PICKLERS = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "shelve", "joblib"}


def project_sources() -> list[Path]:
    out = []
    for directory, subdirs, files in os.walk(ROOT):
        # Pruned in place so os.walk never descends into the venv.
        subdirs[:] = [d for d in subdirs if d not in SKIP_DIRS and not d.startswith(".")]
        out += [Path(directory) / f for f in files if f.endswith(".py")]
    return sorted(out)


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else ""
    return ""


def _keyword_is(call: ast.Call, name: str, value: object) -> bool:
    return any(
        kw.arg == name and isinstance(kw.value, ast.Constant) and kw.value.value is value for kw in call.keywords
    )


def violations(source: str, filename: str = "<string>") -> list[str]:
    tree = ast.parse(source, filename)
    found = []
    # Names bound to numpy.load / torch.load by "from numpy import load".
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PICKLERS:
                    found.append(f"{where}: imports {alias.name}")
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] in PICKLERS:
                found.append(f"{where}: imports from {node.module}")
            for alias in node.names:
                if alias.name in ("load", "read_pickle"):
                    aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        where = f"{filename}:{node.lineno}"
        name = _dotted(node.func)
        name = aliases.get(name, name)
        if _keyword_is(node, "allow_pickle", True):
            found.append(f"{where}: allow_pickle=True")
        if name in ("np.load", "numpy.load") and not _keyword_is(node, "allow_pickle", False):
            found.append(f"{where}: {name} without allow_pickle=False")
        if name == "torch.load" and not _keyword_is(node, "weights_only", True):
            found.append(f"{where}: torch.load without weights_only=True")
        if name.endswith("read_pickle"):
            found.append(f"{where}: {name}")
    return found


def test_checker_flags_each_pattern():
    bad = (
        "import pickle\n"
        "from dill import loads\n"
        "import numpy as np\n"
        "from numpy import load\n"
        "a = np.load('x.npz')\n"
        "b = np.load('x.npy', allow_pickle=True)\n"
        "c = load('x.npy')\n"
        "d = torch.load('m.pt')\n"
        "e = pd.read_pickle('f')\n"
        "f = obj.read(allow_pickle=True)\n"
    )
    found = violations(bad)
    for expected in (
        ":1: imports pickle",
        ":2: imports from dill",
        ":5: np.load without",
        ":6: allow_pickle=True",
        ":7: numpy.load without",
        ":8: torch.load without",
        ":9: pd.read_pickle",
        ":10: allow_pickle=True",
    ):
        assert any(expected in v for v in found), (expected, found)


def test_checker_accepts_safe_loading():
    good = (
        "import numpy as np\n"
        "a = np.load('x.npz', allow_pickle=False)\n"
        "b = torch.load('m.pt', weights_only=True, map_location='cpu')\n"
        "c = json.load(f)\n"
        "d = tomllib.load(f)\n"
    )
    assert violations(good) == []


def test_project_never_unpickles():
    sources = project_sources()
    assert any(p.name == "service.py" for p in sources), "the scan found no project files"
    assert not any(".venv" in p.parts for p in sources)
    found = []
    for path in sources:
        found += violations(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))
    assert found == [], "\n".join(found)
