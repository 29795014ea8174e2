"""Soak: the whole camera pipeline, unthrottled, for N frames; memory, threads, frame and log accounting.

    .venv/bin/python benchmarks/soak.py [--frames 20000] [--source demo|images:DIR] [--seconds-max S]
                                        [--model FILE] [--log-max-kb KB] [--warmup-frames N] [--keep-logs DIR]
                                        [--fault-every N]

Runs in-process through the same pieces ``python -m app`` wires together
(capture thread + latest-frame slot, the real Detector, the detection filter,
overlay rendering into a null preview, the rotating JSON Lines log) with the
source's fps at 0, so frames are produced and processed as fast as the
machine allows. In-process because the counters (captured, dropped, log
lines, RSS at the end of warm-up) must be read from the live objects, not
guessed from outside.

Checks (exit 1 if one fails):
  - RSS growth after warm-up <= --rss-limit-mb (5 MB) and the thread count constant;
  - every captured frame accounted for: captured == logged + dropped;
  - the rotated log files hold exactly the lines the log wrote, every line
    parses, frame seqs strictly increase from the oldest file to the newest,
    and rotation really happened (rotated_files >= 1).

``--fault-every N`` makes the source raise on every N-th read: the same
checks then also cover thousands of reconnects (each one an event line).

The last line printed on stdout is one JSON object with the figures. Uses
models/person.xnc when present, else a random-weight model of the default
architecture (same cost per frame).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app import sinks, sources  # noqa: E402
from app.capture import Capture  # noqa: E402
from app.config import SourceConfig  # noqa: E402
from app.detector import DEFAULT_MODEL, Detector  # noqa: E402
from app.pipeline import Pipeline, filter_for  # noqa: E402
from app.randmodel import model_file_or_random  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")
# Generous upper bound of one frame line (bytes), used only to size the rotation so that no file is deleted.
LINE_BYTES_BOUND = 4096


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * PAGE / 2**20


def os_threads() -> int:
    """Threads of this process as the kernel sees them (numba's pool included, not only Python's)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    return threading.active_count()




class RenderingNullPreview:
    """A headless preview that still asks for the rendered overlay canvas (the window preview's cost).

    It is also where the soak samples memory and threads: ``show`` runs on
    the pipeline thread once per processed frame.
    """

    name = "soak"
    needs_canvas = True

    def __init__(self, warmup_frames: int, deadline: float | None) -> None:
        self.warmup_frames = warmup_frames
        self.deadline = deadline
        self.stop_requested = False
        self.shown = 0
        self.canvas_pixels = 0
        self.rss_start = self.rss_end = self.rss_max = 0.0
        self.threads_start = self.threads_end = 0
        self.threads_seen: set[int] = set()

    def show(self, frame, canvas, detections, hud, marks=None) -> None:
        if canvas is None or canvas.ndim != 3:
            raise RuntimeError("the soak preview expects a rendered BGR canvas")
        self.shown += 1
        self.canvas_pixels += canvas.shape[0] * canvas.shape[1]
        if self.shown == self.warmup_frames:
            gc.collect()
            self.rss_start = self.rss_max = rss_mb()
            self.threads_start = os_threads()
            self.threads_seen.add(self.threads_start)
        elif self.shown > self.warmup_frames and self.shown % 100 == 0:
            self.rss_max = max(self.rss_max, rss_mb())
            self.threads_seen.add(os_threads())
        if self.deadline is not None and time.monotonic() > self.deadline:
            self.stop_requested = True

    def sample_end(self) -> None:
        """Called after the last frame, before capture stops (its threads still count)."""
        gc.collect()
        self.rss_end = rss_mb()
        self.rss_max = max(self.rss_max, self.rss_end)
        self.threads_end = os_threads()
        self.threads_seen.add(self.threads_end)

    def close(self) -> None:
        pass


class FailingEvery:
    """Wraps a source so that every N-th read raises, as a flaky camera cable would."""

    def __init__(self, source, every: int) -> None:
        self.source, self.every, self.reads = source, every, 0

    def __getattr__(self, name):
        return getattr(self.source, name)

    def open(self) -> None:
        self.source.open()

    def read(self):
        self.reads += 1
        if self.reads % self.every == 0:
            raise OSError("soak: injected camera fault")
        return self.source.read()

    def close(self) -> None:
        self.source.close()


def log_files(path: Path) -> list[Path]:
    """The log's files oldest first: path.{n}, ..., path.1, path."""
    rotated = []
    i = 1
    while Path(f"{path}.{i}").exists():
        rotated.append(Path(f"{path}.{i}"))
        i += 1
    return [*reversed(rotated), *([path] if path.exists() else [])]


def check_logs(path: Path, max_bytes: int = 0) -> dict:
    """Read every file of a rotated log; count frame and event lines and list what is wrong.

    Every line must be a whole JSON object ending in a newline (the soak
    never kills the writer, so not even the last line may be torn), no file
    may exceed ``max_bytes`` and frame seqs must strictly increase.
    """
    files = log_files(path)
    problems: list[str] = []
    frames = events = 0
    last_seq = -1
    for f in files:
        data = f.read_bytes()
        if max_bytes and len(data) > max_bytes:
            problems.append(f"{f.name}: {len(data)} bytes > rotation size {max_bytes}")
        if data and not data.endswith(b"\n"):
            problems.append(f"{f.name}: the last line is not terminated")
        for n, raw in enumerate(data.splitlines(), 1):
            try:
                obj = json.loads(raw)
            except ValueError:
                problems.append(f"{f.name}:{n}: not JSON: {raw[:60]!r}")
                continue
            if not isinstance(obj, dict) or obj.get("v") != sinks.SCHEMA_VERSION:
                problems.append(f"{f.name}:{n}: not a v{sinks.SCHEMA_VERSION} record")
            elif "event" in obj:
                events += 1
            elif isinstance(obj.get("seq"), int):
                frames += 1
                if obj["seq"] <= last_seq:
                    problems.append(f"{f.name}:{n}: seq {obj['seq']} after {last_seq}")
                last_seq = obj["seq"]
            else:
                problems.append(f"{f.name}:{n}: neither a frame nor an event line")
    return {"files": len(files), "frame_lines": frames, "event_lines": events, "problems": problems}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="benchmarks/soak.py", description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=20000, help="processed frames to run (default 20000)")
    p.add_argument("--source", default="demo", help="demo | images:DIR (default demo)")
    p.add_argument("--seconds-max", type=float, default=0.0, help="stop earlier after this long (0: no limit)")
    p.add_argument("--model", help="model file (default models/person.xnc, else a random-weight model)")
    p.add_argument("--warmup-frames", type=int, help="frames before the RSS/thread baseline (default min(1000, frames/5))")
    p.add_argument("--log-max-kb", type=float, help="rotation size (default: about 30 rotations over the run)")
    p.add_argument("--rss-limit-mb", type=float, default=5.0, help="allowed RSS growth after warm-up (default 5)")
    p.add_argument("--keep-logs", metavar="DIR", help="write the log files here and keep them")
    p.add_argument("--fault-every", type=int, default=0, metavar="N",
                   help="the source raises on every N-th read (reconnect churn: leaks across reopens)")
    args = p.parse_args(argv)
    if args.frames < 10:
        p.error("--frames must be >= 10")
    kind = args.source.partition(":")[0]
    if args.source != "demo" and not (kind == "images" and args.source.partition(":")[2]):
        p.error("--source must be demo or images:DIR")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    warmup = args.warmup_frames if args.warmup_frames is not None else max(1, min(1000, args.frames // 5))
    warmup = min(max(1, warmup), args.frames - 1)
    tmp = Path(tempfile.mkdtemp(prefix="xnorcam-soak-"))
    try:
        return _soak(args, warmup, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _soak(args: argparse.Namespace, warmup: int, tmp: Path) -> int:
    log_dir = Path(args.keep_logs) if args.keep_logs else tmp
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / "soak.jsonl"
    for old in log_files(log_path):
        old.unlink()
    if args.log_max_kb:
        max_bytes = int(args.log_max_kb * 1024)
    else:
        max_bytes = max(8192, args.frames * 300 // 30)  # ~30 rotations with ~300-byte lines
    # Keep every file the run can make: the line count across files must be exact.
    files = math.ceil(args.frames * LINE_BYTES_BOUND / max_bytes) + 2

    model = model_file_or_random(args.model, tmp)
    detector = Detector(model)
    detector.warmup()
    keep = filter_for(detector, (), {})  # as the app builds it with no class settings

    spec = args.source
    cfg = SourceConfig(spec=spec, fps=0.0, loop=True)
    sources.preflight(spec)
    factory = sources.make_factory(spec, cfg)
    finite = bool(getattr(factory(), "finite", False))
    if args.fault_every:
        logging.getLogger("xnorcam.capture").setLevel(logging.ERROR)  # one warning per injected fault is noise here
        plain = factory
        factory = lambda: FailingEvery(plain(), args.fault_every)  # noqa: E731
    capture = Capture(
        factory,
        hang_timeout_s=cfg.hang_timeout_s,
        backoff_initial_s=0.01 if args.fault_every else cfg.backoff_initial_s,
        backoff_max_s=cfg.backoff_max_s,
        lossless=finite,  # as the app does for a file source at fps 0
    )
    log = sinks.JsonlLog(str(log_path), max_bytes=max_bytes, files=files)
    deadline = time.monotonic() + args.seconds_max if args.seconds_max > 0 else None
    preview = RenderingNullPreview(warmup, deadline)
    pipeline = Pipeline(capture, detector, keep=keep, log_sink=log, preview=preview, max_frames=args.frames)

    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print(f"soak: {args.frames} frames from {spec}, model {model.name}, log rotation at {max_bytes} bytes, "
          f"baseline after {warmup} frames", file=sys.stderr, flush=True)
    t0 = time.monotonic()
    capture.start()
    try:
        stats = pipeline.run(stop)
        preview.sample_end()
    finally:
        capture.stop()
        pipeline.refresh_stats()
        log.close()
    seconds = time.monotonic() - t0

    cs = capture.stats()
    disk = check_logs(log_path, max_bytes)
    figures = {
        "frames": stats.processed,
        "seconds": round(seconds, 2),
        "fps": round(stats.processed / seconds, 1) if seconds > 0 else 0.0,
        "source": spec,
        "model": str(model) if args.model or model == DEFAULT_MODEL else "random (app.randmodel seed 0)",
        "warmup_frames": warmup,
        "rss_start_mb": round(preview.rss_start, 2),
        "rss_end_mb": round(preview.rss_end, 2),
        "rss_max_mb": round(preview.rss_max, 2),
        "rss_growth_mb": round(preview.rss_end - preview.rss_start, 2),
        "threads_start": preview.threads_start,
        "threads_end": preview.threads_end,
        "captured": cs.captured,
        "logged": disk["frame_lines"],
        "dropped": cs.dropped,
        "processed": stats.processed,
        "source_errors": cs.errors,
        "reopens": cs.reopens,
        "log_lines_written": log.lines,
        "log_failures": log.failures,
        "log_lines_on_disk": disk["frame_lines"] + disk["event_lines"],
        "event_lines": disk["event_lines"],
        "rotated_files": max(0, disk["files"] - 1),
        "rotations": log.rotations,
        "log_max_bytes": max_bytes,
        "stopped_by": stats.stopped_by,
    }
    failures = list(disk["problems"][:10])
    if preview.shown < warmup + 1:
        failures.append(f"only {preview.shown} frames shown, not past the {warmup}-frame warm-up")
    if figures["rss_growth_mb"] > args.rss_limit_mb:
        failures.append(f"RSS grew {figures['rss_growth_mb']} MB after warm-up (limit {args.rss_limit_mb})")
    if args.fault_every:
        # Readers come and go with each reopen (one at a time), and the baseline may itself be read during a
        # reopen's dip: the count may move by one, never more. A thread leaked per reopen grows past that.
        seen = preview.threads_seen
        if max(seen) - min(seen) > 1 or max(seen) > preview.threads_start + 1 or min(seen) < preview.threads_start - 1:
            failures.append(f"thread count drifted across reopens: {sorted(preview.threads_seen)}")
        if cs.errors < 1 or disk["event_lines"] < cs.errors:
            failures.append(f"{cs.errors} injected source errors but {disk['event_lines']} event lines")
    elif len(preview.threads_seen) != 1:
        failures.append(f"thread count changed after warm-up: {sorted(preview.threads_seen)}")
    if cs.captured != figures["logged"] + cs.dropped:
        failures.append(f"captured {cs.captured} != logged {figures['logged']} + dropped {cs.dropped}")
    if not args.fault_every and cs.errors:
        failures.append(f"{cs.errors} source errors in a run without injected faults")
    if figures["logged"] != stats.processed or preview.shown != stats.processed:
        failures.append(f"processed {stats.processed}, shown {preview.shown}, but {figures['logged']} frame lines")
    if figures["log_lines_on_disk"] != log.lines or log.failures:
        failures.append(f"log wrote {log.lines} lines ({log.failures} failed) but {figures['log_lines_on_disk']} are on disk")
    if figures["rotated_files"] < 1:
        failures.append("the log never rotated")
    if log.rotations >= files - 1:
        failures.append(f"{log.rotations} rotations with {files} files: old files were deleted")
    if stats.stopped_by not in ("max frames", "preview closed"):
        failures.append(f"the pipeline stopped early: {stats.stopped_by}")
    if preview.canvas_pixels == 0:
        failures.append("no overlay canvas was rendered")
    figures["failures"] = failures
    figures["ok"] = not failures
    for problem in failures:
        print(f"soak: FAIL: {problem}", file=sys.stderr)
    print(json.dumps(figures), flush=True)
    return 0 if figures["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
