"""Disk faults under the running pipeline: ENOSPC (also as a short write), EIO, a read-only file system on
reopen, failed rotations, a really full tmpfs. Detection goes on, failures are counted, writing resumes,
and no partial line is ever left in the log."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from app import sinks
from app.capture import Capture
from app.pipeline import Pipeline
from app.sinks import JsonlLog
from tests.fakes.fake_source import FakeSource
from tests.reliability.logread import frames_and_events, read_log
from tests.reliability.support import ROOT as ROOT_DIR
from tests.reliability.support import child_env, run_app, run_pipeline


class FrameHook:
    """A null preview calling ``hook(n)`` on the pipeline thread for the n-th processed frame (1-based)."""

    needs_canvas = False
    stop_requested = False

    def __init__(self, hook, frames):
        self.hook, self.frames, self.n = hook, frames, 0

    def show(self, frame, canvas, detections, hud, marks=None):
        self.n += 1
        self.hook(self.n)
        self.stop_requested = self.n >= self.frames

    def close(self):
        pass


def run(detector, log, hook, frames):
    cap = Capture(lambda: FakeSource(period=0.001, shape=(48, 64)))
    p = Pipeline(cap, detector, log_sink=log, preview=FrameHook(hook, frames))
    stats = run_pipeline(cap, p, 60, log)
    assert stats.stopped_by == "preview closed"
    return stats


def assert_whole_log(path, processed, failures):
    records, _ = read_log(path, allow_torn_tail=False)  # not even a torn last line
    frames, events = frames_and_events(records)
    assert not events
    seqs = [f["seq"] for f in frames]
    assert seqs == sorted(set(seqs))
    assert len(frames) == processed - failures
    return seqs


def test_enospc_short_write_eio_and_erofs_are_counted_and_writing_resumes(tmp_path, detector, monkeypatch):
    path = tmp_path / "log.jsonl"
    log = JsonlLog(str(path))
    real_write, real_open = log._write, os.open
    calls = {"write": 0, "erofs": 0}

    def disk(fd, data):
        k = calls["write"]
        calls["write"] += 1
        if k == 20:
            return real_write(fd, data[: len(data) // 2])  # the disk fills mid-line
        if 20 < k < 30:
            raise OSError(errno.ENOSPC, "No space left on device")
        if k == 35:
            raise OSError(errno.EIO, "Input/output error")
        return real_write(fd, data)

    def open_(file, flags, *args, **kwargs):
        if os.fspath(file) == str(path) and calls["erofs"] > 0:
            calls["erofs"] -= 1
            raise OSError(errno.EROFS, "Read-only file system")
        return real_open(file, flags, *args, **kwargs)

    def hook(n):
        if n == 36:
            calls["erofs"] = 5  # after the EIO the log reopens onto a file system remounted read-only

    log._write = disk
    monkeypatch.setattr(sinks.os, "open", open_)
    stats = run(detector, log, hook, frames=80)
    assert stats.processed == 80  # detection never stopped
    assert log.failures == 10 + 1 + 5 and log.lines == 80 - 16
    assert "EROFS" in log.last_error
    seqs = assert_whole_log(path, stats.processed, log.failures)
    assert len(seqs) > 40 and path.read_bytes().endswith(b"\n")


def test_failed_rotation_loses_and_duplicates_no_line(tmp_path, detector, monkeypatch):
    path = tmp_path / "log.jsonl"
    log = JsonlLog(str(path), max_bytes=2000, files=100)
    real_replace = os.replace
    state = {"fail": False}

    def replace(src, dst):
        if state["fail"]:
            raise OSError(errno.EROFS, "Read-only file system")
        return real_replace(src, dst)

    def hook(n):
        state["fail"] = 30 <= n < 60

    monkeypatch.setattr(sinks.os, "replace", replace)
    stats = run(detector, log, hook, frames=120)
    files = sorted(tmp_path.glob("log.jsonl*"), key=lambda p: -int(p.suffix[1:]) if p.suffix[1:].isdigit() else 0)
    lines = []
    for f in files:
        records, _ = read_log(f, allow_torn_tail=False)
        lines += records
    assert len(files) > 3 and log.rotations >= 3
    assert len(lines) == log.lines == stats.processed - log.failures
    seqs = [r["seq"] for r in lines]
    assert seqs == sorted(set(seqs))


@pytest.fixture
def tiny_tmpfs(tmp_path):
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    mount = shutil.which("mount")
    if not mount or os.geteuid() != 0:
        pytest.skip("mounting a tiny tmpfs needs root and mount(8)")
    r = subprocess.run([mount, "-t", "tmpfs", "-o", "size=64k", "xnorcam-test", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


def fill(directory):
    """Take every free byte of the file system (returns the filler's path)."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as fh:
        while True:
            try:
                if fh.write(b"\xff" * 1024) == 0:
                    break
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                break
    return filler


def test_really_full_tmpfs_is_survived_and_writing_resumes(tiny_tmpfs, detector):
    path = tiny_tmpfs / "log.jsonl"
    log = JsonlLog(str(path))
    state = {}

    def hook(n):
        if n == 20:
            state["filler"] = fill(tiny_tmpfs)
        if n == 60:
            state["failures_while_full"] = log.failures
            state["filler"].unlink()

    stats = run(detector, log, hook, frames=90)
    assert stats.processed == 90
    assert state["failures_while_full"] > 20 and log.failures == state["failures_while_full"]
    assert "ENOSPC" in log.last_error
    seqs = assert_whole_log(path, stats.processed, log.failures)
    assert sum(s > seqs[0] for s in seqs) >= 25  # written again once space came back


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux /dev/full")
def test_app_logging_to_a_full_disk_keeps_detecting_and_warns_once(model_path):
    r = run_app("--source", "demo", "--fps", "0", "--model", model_path, "--preview", "none",
                "--log", "/dev/full", "--max-frames", 30)
    assert r.returncode == 0, r.stderr
    # every frame line and every track event line failed, and nothing else
    failures, events = (int(re.search(rf" {k}=(\d+)", r.stderr).group(1)) for k in ("log_failures", "events"))
    assert "processed=30" in r.stderr and "log_lines=0 " in r.stderr and failures == 30 + events
    assert r.stderr.count("write failed") == 1, r.stderr


def test_log_deleted_or_moved_away_is_recreated(tmp_path, detector):
    """By hand (rm to free space) or by an external logrotate (mv): the log must not go on into a dead inode."""
    path = tmp_path / "log.jsonl"
    moved = tmp_path / "log.jsonl.old"
    log = JsonlLog(str(path))
    state = {}

    def hook(n):
        if n == 20:
            state["deleted_lines"] = log.lines
            path.unlink()
        if n == 40:
            path.rename(moved)

    stats = run(detector, log, hook, frames=60)
    assert stats.processed == 60 and log.failures == 0
    assert path.exists(), "lines after the delete went into the deleted file"
    kept = read_log(moved, allow_torn_tail=False)[0] + read_log(path, allow_torn_tail=False)[0]
    assert len(kept) == log.lines - state["deleted_lines"]
    assert len(read_log(path, allow_torn_tail=False)[0]) >= 19  # everything after the move is in the new file


UNWRITABLE_RECORDINGS = {
    "below a file": lambda t: t / "a-file" / "rec.mp4",
    "two levels below a file": lambda t: t / "a-file" / "sub" / "rec.mp4",
    "in a read-only directory": lambda t: t / "ro" / "rec.mp4",
    "a NUL in the path": lambda t: str(t / "rec") + "\x00.mp4",
}


@pytest.mark.parametrize(("case", "via"), [
    (case, via) for case in sorted(UNWRITABLE_RECORDINGS) for via in ("flag", "config")
    if not (via == "flag" and case == "a NUL in the path")  # argv cannot hold a NUL; the config can
])
def test_an_unwritable_recording_path_is_refused_at_start(tmp_path, model_path, case, via):
    """A recording path that can never be written is a configuration error found at start: exit 2 from the
    flag, 78 from the config, one line naming the path, before the model loads and before anything is
    logged. (It used to be found at the first frame, and the run went on without a recording: a warning in
    a journal nobody reads.)"""
    (tmp_path / "a-file").write_text("")
    ro = tmp_path / "ro"
    ro.mkdir()
    target = UNWRITABLE_RECORDINGS[case](tmp_path)
    log = tmp_path / "log.jsonl"
    args = ["--source", "demo", "--fps", "0", "--model", model_path, "--preview", "none", "--log", log,
            "--max-frames", 10]
    if case == "a NUL in the path" and via == "config":
        target = str(target).replace("\x00", "\\u0000")  # TOML's escape: the config refuses it itself
    if via == "flag":
        args += ["--record", target]
    else:
        cfg = tmp_path / "c.toml"
        cfg.write_text(f'[preview]\nrecord = "{target}"\n')
        args += ["--config", cfg]
    if case == "in a read-only directory":
        r = _run_read_only(ro, args)
    else:
        r = run_app(*args)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == (2 if via == "flag" else 78), r.stderr
    assert len(lines) == 1 and "preview.record" in lines[0] and "Traceback" not in r.stderr, r.stderr
    assert not log.exists(), "the run started"
    assert (tmp_path / "a-file").read_text() == "" and not list(ro.iterdir())  # nothing made or changed


def _run_read_only(directory, args):
    """The app with ``directory`` read-only to it (a private mount namespace; root ignores file modes)."""
    if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("no mount namespaces here")
    script = f"mount --make-rprivate / && mount --bind {directory} {directory} && " \
             f"mount -o remount,bind,ro {directory} && exec \"$0\" -m app \"$@\""
    return subprocess.run(["unshare", "-m", "sh", "-c", script, sys.executable, *map(str, args)], cwd=ROOT_DIR,
                          env=child_env(), capture_output=True, text=True, timeout=120)


def test_a_recording_lost_after_the_start_is_an_event_and_detection_goes_on(tmp_path, model_path):
    """The path passed the start check, then its directory became impossible before the first frame (a disk
    unmounted, a file put in its place): the recording is lost, not the camera, and that is said once as an
    error and once as a record_error line in the log."""
    rec_dir = tmp_path / "rec"
    log = tmp_path / "log.jsonl"
    runner = tmp_path / "runner.py"
    # The first detect() (the warm-up's) replaces the recording's directory with a file.
    runner.write_text(
        "import os, shutil, sys\n"
        f"sys.path.insert(0, {str(ROOT_DIR)!r})\n"
        "import app.detector as d\n"
        "orig = d.Detector.detect\n"
        "def detect(self, image):\n"
        f"    if os.path.isdir({str(rec_dir)!r}):\n"
        f"        shutil.rmtree({str(rec_dir)!r}); open({str(rec_dir)!r}, 'w').close()\n"
        "    return orig(self, image)\n"
        "d.Detector.detect = detect\n"
        "from app.__main__ import main\n"
        "sys.exit(main(sys.argv[1:]))\n")
    r = subprocess.run([sys.executable, str(runner), "--source", "demo", "--fps", "0", "--model", str(model_path),
                        "--preview", "none", "--log", str(log), "--record", str(rec_dir / "x.mp4"), "--max-frames",
                        "10"], capture_output=True, text=True, timeout=300, env=child_env())
    assert r.returncode == 0, r.stderr
    assert "processed=10" in r.stderr and r.stderr.count("not recording") == 1
    frames, events = frames_and_events(read_log(log, allow_torn_tail=False)[0])
    assert len(frames) == 10
    lost = [e for e in events if e["event"] == "record_error"]
    assert len(lost) == 1 and lost[0]["path"] == str(rec_dir / "x.mp4") and "Not a directory" in lost[0]["message"]


# --- the log's real state: an external truncate, a full disk, two writers ---------------------------------


def frame_line(seq):
    return {"v": 1, "time": "t", "seq": seq, "detections": []}


@pytest.mark.parametrize("cut_to", [0, 1, "mid-line"])
@pytest.mark.parametrize("short", [1, 17, "half"])
def test_external_truncate_then_a_full_disk_adds_no_nul_and_keeps_whole_lines(tmp_path, cut_to, short):
    """logrotate's copytruncate empties the file under the writer; the disk then fills mid-line. The partial
    line is cut off the file's real end: no NUL run where a remembered size would have put it."""
    path = tmp_path / "x.jsonl"
    log = JsonlLog(str(path))
    for i in range(200):
        log.write(frame_line(i))
    size = path.stat().st_size
    keep = {0: 0, 1: len(path.read_bytes().split(b"\n")[0]) + 1, "mid-line": 10}[cut_to]
    os.truncate(path, keep)  # copytruncate (or a careless `> file`)
    real = log._write
    log._write = lambda fd, data: real(fd, data[: len(data) // 2 if short == "half" else short])
    assert not log.write(frame_line(200))
    log._write = real
    assert log.write(frame_line(201)) and log.write(frame_line(202))
    log.close()
    raw = path.read_bytes()
    assert b"\x00" not in raw and len(raw) < size // 10
    lines = raw.split(b"\n")
    assert lines[-1] == b""
    tail = [json.loads(x)["seq"] for x in lines[:-1] if x.startswith(b'{"v":1,"time":"t","seq"')]
    assert tail[-2:] == [201, 202] and 200 not in tail


def test_external_truncate_does_not_rotate_early_or_late(tmp_path):
    path = tmp_path / "x.jsonl"
    one = len(json.dumps(frame_line(0), separators=(",", ":"))) + 1
    log = JsonlLog(str(path), max_bytes=10 * one, files=3)
    for i in range(8):
        log.write(frame_line(i))
    os.truncate(path, 0)
    for i in range(8, 16):  # 8 lines fit again after the truncate: a remembered size of 16 lines would rotate
        log.write(frame_line(i))
    log.close()
    assert log.rotations == 0 and not (tmp_path / "x.jsonl.1").exists()
    assert [json.loads(x)["seq"] for x in path.read_text().splitlines()] == list(range(8, 16))


def test_really_full_tmpfs_after_an_external_truncate_has_no_nul(tiny_tmpfs):
    path = tiny_tmpfs / "x.jsonl"
    log = JsonlLog(str(path))
    i = 0
    while log.failures == 0:  # fill the 64 KB file system
        log.write(frame_line(i))
        i += 1
    os.truncate(path, 0)
    filler = tiny_tmpfs / "filler"
    with open(filler, "wb") as fh:  # something else takes the space the truncate freed, but for a few bytes
        try:
            fh.write(b"x" * 2**20)
        except OSError:
            pass
    before = log.failures
    for _ in range(5):
        log.write({"v": 1, "time": "t", "pad": "p" * 3000})  # larger than what is left: a short write or ENOSPC
    assert log.failures > before
    filler.unlink()
    assert log.write(frame_line(10**6))
    log.close()
    raw = path.read_bytes()
    assert b"\x00" not in raw and raw.endswith(b"\n")
    assert json.loads(raw.splitlines()[-1])["seq"] == 10**6


@pytest.mark.parametrize("rotating", [False, True])
def test_a_second_writer_on_the_same_log_is_refused(tmp_path, rotating):
    path = tmp_path / "x.jsonl"
    first = JsonlLog(str(path), max_bytes=2000 if rotating else 0, files=3)
    for i in range(100 if rotating else 3):  # rotating: the lock follows the new file
        first.write(frame_line(i))
    assert first.rotations > 0 or not rotating
    with pytest.raises(sinks.LogRefused, match="in use by another process"):
        JsonlLog(str(path))
    first.close()
    second = JsonlLog(str(path))  # the lock goes with the first writer
    assert second.write(frame_line(99))
    second.close()


def test_a_second_app_on_the_same_log_exits_78_naming_the_lock(tmp_path, model_path):
    path = tmp_path / "x.jsonl"
    first = JsonlLog(str(path))
    first.write(frame_line(0))
    try:
        r = run_app("--model", model_path, "--source", "demo", "--max-frames", "1", "--log", path)
    finally:
        first.close()
    assert r.returncode == 78
    assert "in use by another process" in r.stderr and "Traceback" not in r.stderr
    assert [json.loads(x)["seq"] for x in path.read_text().splitlines()] == [0]
