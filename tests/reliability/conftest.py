"""Fixtures of the reliability suite: the model, a systemd notify socket, a scripted FAKE camera, fuzz counts.

``XNORCAM_FUZZ_EXAMPLES`` sets how many cases each fuzz test runs (default
100 for CI; ``make fuzz`` uses 2000). The counts of what each fuzz test saw are
printed in the terminal summary.
"""

from __future__ import annotations

import os

import pytest

from tests.reliability.support import FAKE_PICAMERA2, FUZZ_COUNTS, FUZZ_EXAMPLES, ROOT, NotifySocket, child_env


def pytest_terminal_summary(terminalreporter):
    if not FUZZ_COUNTS:
        return
    terminalreporter.section(f"fuzz cases (XNORCAM_FUZZ_EXAMPLES={FUZZ_EXAMPLES})")
    for name, counts in sorted(FUZZ_COUNTS.items()):
        detail = ", ".join(f"{k}={v}" for k, v in sorted(counts.items()) if k != "total")
        terminalreporter.write_line(f"{name}: {counts['total']} cases ({detail})")


@pytest.fixture(scope="session")
def model_path(rand_model_file):
    """The shipped model when it exists, else the random-weight one (same architecture and cost)."""
    from app.detector import DEFAULT_MODEL

    return DEFAULT_MODEL if DEFAULT_MODEL.exists() else rand_model_file


@pytest.fixture(scope="session")
def detector(model_path):
    from app.detector import Detector

    d = Detector(model_path)
    d.warmup()
    return d


@pytest.fixture
def notify_socket():
    ns = NotifySocket()
    yield ns
    ns.close()


@pytest.fixture
def fake_camera(tmp_path):
    """(env factory, marker): ``make_env(script="3:raise,9:hang")`` gives a child env whose picamera2 is the FAKE."""
    pkg = tmp_path / "fakepkgs" / "picamera2"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(FAKE_PICAMERA2)
    marker = tmp_path / "camera-opened"

    def make_env(script: str = "", **extra: str) -> dict[str, str]:
        return child_env(
            PYTHONPATH=f"{pkg.parent}{os.pathsep}{ROOT}",
            FAKE_PICAMERA2_MARKER=str(marker),
            FAKE_CAPTURE_SCRIPT=script,
            **extra,
        )

    return make_env, marker
