"""`python -m app` as a subprocess: exit codes, errors before the camera opens, signals, dispatch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURE_IMAGES = ROOT / "tests" / "fixtures" / "person" / "images"


@pytest.fixture
def fake_pi(tmp_path):
    """A FAKE picamera2 importable by a child process; a marker file gets a line per camera opened and overlay set."""
    pkg = tmp_path / "fakepkgs" / "picamera2"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(
        textwrap.dedent(
            """
            # FAKE picamera2 for tests/test_cli.py (wraps tests/fakes/fake_picamera2.py)
            import os
            from tests.fakes.fake_picamera2 import make_module

            _m = make_module(drm_ok=os.environ.get("FAKE_DRM_OK", "1") == "1")
            Preview = _m.Preview
            state = _m.state

            class Picamera2(_m.Picamera2):
                def __init__(self, *args, **kwargs):
                    with open(os.environ["FAKE_PICAMERA2_MARKER"], "a") as fh:
                        fh.write("opened\\n")
                    super().__init__(*args, **kwargs)

                def set_overlay(self, overlay):
                    super().set_overlay(overlay)
                    with open(os.environ["FAKE_PICAMERA2_MARKER"], "a") as fh:
                        fh.write("overlay\\n" if overlay is not None else "overlay cleared\\n")
            """
        )
    )
    marker = tmp_path / "camera-opened"
    env = {
        **os.environ,
        "PYTHONPATH": f"{pkg.parent}{os.pathsep}{ROOT}",
        "FAKE_PICAMERA2_MARKER": str(marker),
    }
    env.pop("NOTIFY_SOCKET", None)
    return env, marker


def app(*args, env=None, timeout=120):
    env = env or {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
    return subprocess.run(
        [sys.executable, "-m", "app", *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_help_and_bad_command_lines():
    r = app("--help")
    assert r.returncode == 0 and "--source" in r.stdout and "--warmup-only" in r.stdout
    assert app("--no-such-flag").returncode == 2
    assert app("--threads", "two").returncode == 2
    r = app("--score-threshold", "1.5")
    assert r.returncode == 2 and "out of range" in r.stderr
    r = app("--source", "webcam")
    assert r.returncode == 2 and "source.spec" in r.stderr
    assert app("--class-threshold", "person").returncode == 2
    assert app("--max-frames", "-1").returncode == 2


def test_bad_config_exits_78_before_the_camera_opens(tmp_path, fake_pi):
    env, marker = fake_pi
    cfg = tmp_path / "c.toml"
    cfg.write_text('[source]\nspec = "picamera2"\n[detector]\nthreds = 2\n')
    r = app("--config", cfg, env=env)
    assert r.returncode == 78
    assert "detector.threds" in r.stderr and "threads" in r.stderr
    cfg.write_text('[source]\nspec = "picamera2"\n[log]\nmax_mb = -3\n')
    r = app("--config", cfg, env=env)
    assert r.returncode == 78 and "log.max_mb" in r.stderr and "-3" in r.stderr
    assert not marker.exists()


def test_missing_images_is_a_config_error(tmp_path):
    r = app("--source", f"images:{tmp_path}", "--preview", "none")
    assert r.returncode == 78 and "no image files" in r.stderr


def test_bad_model_exits_65_before_the_camera_opens(tmp_path, fake_pi):
    env, marker = fake_pi
    bad = tmp_path / "bad.xnc"
    bad.write_bytes(b"definitely not a model" * 10)
    r = app("--source", "picamera2", "--model", bad, "--preview", "none", env=env)
    assert r.returncode == 65, r.stderr
    assert "model file refused" in r.stderr and str(bad) in r.stderr
    r = app("--source", "picamera2", "--model", tmp_path / "missing.xnc", env=env)
    assert r.returncode == 65 and "missing.xnc" in r.stderr
    assert not marker.exists()


def test_unknown_class_for_the_model_exits_78(rand_model_file, fake_pi):
    env, marker = fake_pi
    r = app("--source", "picamera2", "--model", rand_model_file, "--classes", "unicorn", env=env)
    assert r.returncode == 78 and "'unicorn'" in r.stderr
    assert not marker.exists()


def test_warmup_only_never_opens_camera_or_log(tmp_path, rand_model_file, fake_pi):
    env, marker = fake_pi
    log = tmp_path / "log.jsonl"
    r = app("--source", "picamera2", "--model", rand_model_file, "--warmup-only", "--log", log, env=env)
    assert r.returncode == 0, r.stderr
    assert not marker.exists() and not log.exists()


def test_picamera2_run_shows_the_boxes_on_hdmi(tmp_path, rand_model_file, fake_pi):
    env, marker = fake_pi
    log = tmp_path / "log.jsonl"
    # --preview drm: auto asks for DRM only when /sys/class/drm shows a connected display, which CI has not.
    r = app("run", "--source", "picamera2", "--model", rand_model_file, "--preview", "drm", "--log", log,
            "--max-frames", 5, env=env)
    assert r.returncode == 0, r.stderr
    assert "preview drm" in r.stderr and "DRM" not in r.stderr.replace("preview drm", "")
    events = marker.read_text().splitlines()
    # The overlay is set when the drawing changes (boxes, the HUD twice a second): at least once, at most a frame.
    # Opened twice: once to choose the sensor mode before capture starts, once to capture.
    assert events.count("opened") == 2 and 1 <= events.count("overlay") <= 5
    assert len(frame_lines(log)) == 5


def frame_lines(log):
    """The frame lines of a log (track events may stand between them)."""
    return [o for o in map(json.loads, log.read_text().splitlines()) if "event" not in o]


def test_picamera2_run_with_drm_failure_runs_headless(tmp_path, rand_model_file, fake_pi):
    env, marker = fake_pi
    env = {**env, "FAKE_DRM_OK": "0"}
    log = tmp_path / "log.jsonl"
    r = app("run", "--source", "picamera2", "--model", rand_model_file, "--preview", "drm", "--log", log,
            "--max-frames", 5, env=env)
    assert r.returncode == 0, r.stderr
    assert marker.exists()
    assert r.stderr.count("DRM preview unavailable") == 1
    lines = frame_lines(log)
    # The camera delivers the network's 192x192 input at the preview's 4:3: the letterbox only pads it.
    assert len(lines) == 5 and (lines[0]["width"], lines[0]["height"]) == (192, 144)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_within_2s_with_a_complete_log(tmp_path, rand_model_file, sig):
    log = tmp_path / "log.jsonl"
    env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "app", "--source", "demo", "--fps", "30", "--model", str(rand_model_file),
         "--preview", "none", "--log", str(log)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 180  # a clean CI clone compiles the kernels first
        while time.monotonic() < deadline:
            if log.exists() and log.read_bytes().count(b"\n") >= 5:
                break
            assert proc.poll() is None, proc.communicate()[1]
            time.sleep(0.05)
        t0 = time.monotonic()
        proc.send_signal(sig)
        proc.wait(timeout=10)
        elapsed = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    err = proc.stderr.read()
    assert proc.returncode == 0, err
    assert elapsed < 2.0
    data = log.read_bytes()
    assert data.endswith(b"\n")
    lines = [json.loads(x) for x in data.decode().splitlines()]
    assert len(lines) >= 5 and all(x["v"] == 1 for x in lines)
    assert "stopped_by=signal" in err


def test_subcommands_dispatch_lazily():
    code = (
        "import sys, app.__main__ as m\n"
        "try:\n    m.main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print('app.bench' in sys.modules, 'app.detector' in sys.modules)"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.stdout.strip().splitlines()[-1] == "False False"
    r = app("bench", "--help")
    assert r.returncode == 0 and "bench" in r.stdout


def test_images_run_writes_one_line_per_image(tmp_path, rand_model_file):
    log = tmp_path / "log.jsonl"
    r = app("--source", f"images:{FIXTURE_IMAGES}", "--fps", "0", "--model", rand_model_file, "--preview", "none",
            "--log", log)
    assert r.returncode == 0, r.stderr
    assert "stopped_by=source ended" in r.stderr
    lines = frame_lines(log)
    assert [x["seq"] for x in lines] == [0, 1, 2]


@pytest.mark.parametrize("flags, words", [
    (["--zone", "door"], "NAME="),
    (["--zone", "door=0,0 1,1 1,0 0,1"], "events.zones.door"),
    (["--zone", "door=0,0 1,0 x,1"], "normalised"),
    (["--line", "0,0.5 0,0.5"], "events.line"),
    (["--only-in-zones", "door"], "events.only_in_zones"),
    (["--update-every", "-1"], "events.update_every_s"),
])
def test_bad_tracking_flags_exit_2_naming_the_setting(flags, words):
    r = app("--source", "demo", "--max-frames", 1, *flags)
    assert r.returncode == 2, r.stderr
    assert words in r.stderr
