"""``python -m app``: the camera app, plus the ``bench`` subcommand.

    python -m app [run] [flags]     detect on a camera (or the demo) until stopped
    python -m app bench ...         app.bench.main

Scoring a model on labelled images is ``python -m evaluation`` (off the Pi).

Exit codes: 0 normal stop (also SIGINT/SIGTERM), 2 bad command line,
65 model file refused or a source's data unusable (a video file OpenCV cannot
decode, a folder without one usable image), 78 configuration refused (also a
source this machine cannot run, e.g. picamera2 not installed), 1 anything else.
Model and configuration problems are found before the camera is opened.
"""

from __future__ import annotations

# Until app.stop installs its handlers (after the imports, ~0.1 s): Ctrl-C ends the process the way SIGTERM
# does, by the signal, rather than as a KeyboardInterrupt traceback from inside whatever was importing. The C
# module, first: importing ``signal`` itself (its enums) takes long enough to be interrupted.
import _signal

if _signal.getsignal(_signal.SIGINT) is _signal.default_int_handler:
    _signal.signal(_signal.SIGINT, _signal.SIG_DFL)

import argparse  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from typing import Any  # noqa: E402

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_MODEL = 65
EXIT_NO_CAMERA = 69
EXIT_CONFIG = 78

# systemd's start timeout is extended by this much while the model loads and numba compiles.
WARMUP_EXTEND_S = 300.0

log = logging.getLogger("xnorcam")


def _float_in(lo: float, hi: float):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not lo < value <= hi:
            raise argparse.ArgumentTypeError(f"{text} is out of range: expected > {lo:g} and <= {hi:g}")
        return value

    return parse


def _class_threshold(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=SCORE, e.g. person=0.5")
    return name, _float_in(0.0, 1.0)(value)


def _points(text: str) -> list[list[float]]:
    """'x,y x,y ...' (normalised) -> [[x, y], ...]; the config's rules then check them."""
    try:
        return [[float(c) for c in p.split(",")] for p in text.replace(";", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected points 'x,y x,y ...' (normalised, 0..1)") from None


def _zone(text: str) -> tuple[str, list[list[float]]]:
    name, sep, points = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME='x,y x,y x,y ...', e.g. door='0,0.4 0.3,0.4 0.3,1 0,1'")
    return name, _points(points)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m app",
        description="xnorcam: real-time binary-network object detection on a camera, a video or images.",
        epilog="Subcommand: 'python -m app bench ...' (detector timing); scoring is 'python -m evaluation' (off the Pi). "
        "Flags override the config file (default /etc/xnorcam/config.toml when present).",
    )
    p.add_argument("--config", metavar="FILE", help="TOML config file (see deploy/config.example.toml)")
    p.add_argument(
        "--source",
        metavar="SPEC",
        help="auto | demo | picamera2 | images:<dir or glob> | opencv:<file|index|url>",
    )
    p.add_argument("--fps", type=float, metavar="N", help="pace of demo/images/video files; 0 = every frame, no drops")
    p.add_argument("--loop", action="store_true", default=None, help="loop images and video files")
    p.add_argument("--model", metavar="FILE", help="model file (default: models/person.xnc)")
    p.add_argument("--threads", type=int, metavar="N", help="detector threads")
    p.add_argument("--score-threshold", type=_float_in(0.0, 1.0), metavar="S", help="minimum score (0..1]")
    p.add_argument(
        "--class-threshold",
        type=_class_threshold,
        action="append",
        metavar="NAME=S",
        help="per-class minimum score (repeatable)",
    )
    p.add_argument("--nms-iou", type=_float_in(0.0, 1.0), metavar="IOU", help="NMS IoU (0..1]")
    p.add_argument("--classes", metavar="A,B", help="report only these classes (comma separated)")
    p.add_argument("--preview", choices=("auto", "drm", "window", "browser", "none"),
                   help="live preview: auto (HDMI with the Pi camera, else a window or the web preview in the desktop's "
                   "browser when a display exists), drm, window (needs OpenCV with GUI), browser (needs --web), none")
    p.add_argument("--no-hud", action="store_true", help="do not draw fps/latency/drops")
    p.add_argument("--record", metavar="FILE.mp4", help="also write the annotated video")
    p.add_argument("--log", metavar="FILE", help="JSON Lines log ('-' = stdout)")
    p.add_argument("--log-max-mb", type=float, metavar="MB", help="rotate the log at this size (0 = never)")
    p.add_argument("--log-files", type=int, metavar="N", help="keep N log files in all")
    p.add_argument("--only-detections", action="store_true", default=None, help="log only frames with detections")
    p.add_argument("--only-events", action="store_true", default=None,
                   help="log only event lines (enter, update, cross, leave, outages), no frame lines")
    p.add_argument("--no-tracks", action="store_true", help="no tracker: no track events, no snapshots")
    p.add_argument("--update-every", type=float, metavar="S", help="an update event every S seconds per track (0 = none)")
    p.add_argument("--zone", type=_zone, action="append", metavar="NAME='x,y x,y x,y ...'",
                   help="a named zone, a polygon in normalised coordinates (repeatable)")
    p.add_argument("--only-in-zones", metavar="A,B", help="only tracks seen in these zones make events")
    p.add_argument("--line", type=_points, metavar="'x1,y1 x2,y2'", help="a counting line (normalised)")
    p.add_argument("--snapshots", metavar="DIR", help="write enter/leave snapshots (JPEG) here")
    p.add_argument("--web", metavar="HOST:PORT",
                   help="serve the web preview there (e.g. 127.0.0.1:8080; another address needs web.auth in the config)")
    p.add_argument("--mqtt-clear", action="store_true",
                   help="remove this camera from Home Assistant: delete its discovery and retained topics on the "
                   "[mqtt] broker (also with mqtt.enabled = false), then exit")
    p.add_argument("--max-frames", type=int, default=0, metavar="N", help="stop after N processed frames (0 = never)")
    p.add_argument("--warmup-only", action="store_true", help="load the model, compile the kernels, exit 0")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    pairs = {
        "source.spec": args.source,
        "source.fps": args.fps,
        "source.loop": args.loop,
        "detector.model": args.model,
        "detector.threads": args.threads,
        "detector.score_threshold": args.score_threshold,
        "detector.nms_iou": args.nms_iou,
        "detector.classes": None if args.classes is None else [c.strip() for c in args.classes.split(",") if c.strip()],
        "detector.class_thresholds": None if not args.class_threshold else dict(args.class_threshold),
        "preview.mode": args.preview,
        "preview.record": args.record,
        "preview.hud": False if args.no_hud else None,
        "log.path": args.log,
        "log.max_mb": args.log_max_mb,
        "log.files": args.log_files,
        "log.only_detections": args.only_detections,
        "log.only_events": args.only_events,
        "tracker.enabled": False if args.no_tracks else None,
        "events.update_every_s": args.update_every,
        "events.zones": None if not args.zone else dict(args.zone),
        "events.only_in_zones": None if args.only_in_zones is None
        else [z.strip() for z in args.only_in_zones.split(",") if z.strip()],
        "events.line": args.line,
        "events.snapshot_dir": args.snapshots,
        "web.enabled": True if args.web else None,
        "web.listen": args.web,
    }
    return {k: v for k, v in pairs.items() if v is not None}


def _fail(code: int, what: str, message: str) -> int:
    print(f"xnorcam: {what}: {message}", file=sys.stderr)
    return code


def run(argv: list[str], as_program: bool = False) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # exits 2 on a bad command line
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="xnorcam: %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.max_frames < 0:
        parser.error("--max-frames must be >= 0")

    from app.stop import StopRequests

    stop = threading.Event()
    stopper = StopRequests(stop).install()  # SIGTERM/SIGINT are honoured within 2 s, even mid-compile
    args.stopper = stopper
    try:
        return _run_args(args, stop, stopper)
    finally:
        stopper.uninstall(exiting=as_program)


def _run_args(args: argparse.Namespace, stop: threading.Event, stopper) -> int:
    from app import config as configmod
    from app import sources
    from app.service import Notifier

    try:
        cfg = configmod.load(args.config)
    except configmod.ConfigError as exc:
        return _fail(EXIT_CONFIG, "configuration refused", str(exc))
    try:
        cfg = configmod.with_overrides(cfg, _overrides(args))
    except configmod.ConfigError as exc:
        return _fail(EXIT_USAGE, "bad command line", str(exc))

    try:
        spec = sources.resolve_spec(cfg.source.spec, wait_s=sources.CAMERA_WAIT_S)
        sources.preflight(spec)
    except configmod.ConfigError as exc:
        return _fail(EXIT_CONFIG, "configuration refused", str(exc))
    if cfg.source.spec == "auto" and spec == "demo" and sources.picamera2_importable():
        args.no_camera = f"no Pi camera found in {sources.CAMERA_WAIT_S:g} s: running the demo, not the camera"
        log.warning("%s (check the ribbon cable and `rpicam-hello --list-cameras`, then restart)", args.no_camera)
    if spec == "picamera2":
        problem = _no_camera_problem()
        if problem:
            return _fail(EXIT_NO_CAMERA, "no camera", problem)
    if not args.mqtt_clear:
        # numba's runtime before OpenCV and the rest load: its compile then peaks on fewer pages (docs/memory.md).
        from app.memory import warm_numba

        warm_numba()
    from app.sinks import check_preview_mode

    try:
        check_preview_mode(cfg.preview.mode, spec.partition(":")[0], cfg.web.enabled)
    except configmod.ConfigError as exc:  # one line naming the fix: 2 for the flag, 78 for the file
        if args.preview is not None:
            return _fail(EXIT_USAGE, "bad command line", str(exc))
        return _fail(EXIT_CONFIG, "configuration refused", str(exc))
    from app.sinks import record_path_problem

    # Paths the app writes, tried now: one that can never be written (read-only, hidden by the service's
    # sandbox, a file where a directory should be) is refused with one line, not lost silently later.
    # (--warmup-only and --mqtt-clear write nothing there: install.sh's warm-up runs outside the sandbox.)
    writes = not args.warmup_only and not args.mqtt_clear
    problem = record_path_problem(cfg.preview.record, files=cfg.preview.record_files) if cfg.preview.record and writes else None
    if problem:
        if args.record is not None:
            return _fail(EXIT_USAGE, "bad command line", problem)
        return _fail(EXIT_CONFIG, "configuration refused", problem)
    if cfg.tracker.enabled and cfg.events.snapshot_dir and writes:
        from app.sinks import writable_dir_problem

        problem = writable_dir_problem("events.snapshot_dir", cfg.events.snapshot_dir)
        if problem:
            if args.snapshots is not None:
                return _fail(EXIT_USAGE, "bad command line", problem)
            return _fail(EXIT_CONFIG, "configuration refused", problem)
    try:
        mqtt_login = None
        if cfg.mqtt.enabled:  # the password file and the TLS files, checked before the camera opens
            from app.mqtt import prepare

            mqtt_login = prepare(cfg.mqtt)
        secret = ""
        if cfg.web.enabled and cfg.web.auth != "none":
            from app.web import read_secret

            secret = read_secret(cfg.web.secret_file)
    except configmod.ConfigError as exc:
        return _fail(EXIT_CONFIG, "configuration refused", str(exc))
    args.web_secret = secret
    args.mqtt_login = mqtt_login
    if args.mqtt_clear:
        return _mqtt_clear(cfg)

    args.log_sink = None
    if not args.warmup_only:
        from app.sinks import LogRefused, open_log

        try:  # before the model loads: a log that can never be written is said at once
            args.log_sink = open_log(cfg.log.path, cfg.log.max_mb, cfg.log.files, cfg.log.only_detections,
                                     cfg.log.only_events)
        except LogRefused as exc:
            return _fail(EXIT_CONFIG, "configuration refused", str(exc))
    notifier = Notifier.from_env()
    stopper.before_exit = notifier.stopping
    try:
        return _run_with(cfg, spec, args, stop, notifier)
    finally:
        notifier.stopping()
        if args.log_sink is not None:
            args.log_sink.close()


def _no_camera_problem() -> str:
    """Why the picamera2 source cannot work here (after waiting for the camera), or ''."""
    from app import sources

    if not sources.picamera2_importable():
        return "source picamera2: picamera2 does not import here (on Raspberry Pi OS: apt install python3-picamera2)"
    if sources.wait_for_camera(sources.CAMERA_WAIT_S):
        return ""
    return (f"source picamera2: libcamera lists no Pi camera after {sources.CAMERA_WAIT_S:g} s (USB webcams are "
            "opencv:<index>); check the ribbon cable and `rpicam-hello --list-cameras`")


def _mqtt_clear(cfg) -> int:
    """``--mqtt-clear``: what the camera published is deleted from the broker (deploy/install.sh runs it when
    MQTT is turned off)."""
    from app.config import ConfigError
    from app.modelfile import ModelFormatError
    from app.mqtt import clear_published, prepare

    m = cfg.mqtt
    if not m.host:
        return _fail(EXIT_CONFIG, "configuration refused", "mqtt.host = '': no broker to clear")
    try:
        login = prepare(m)
        if cfg.detector.classes:
            names = list(cfg.detector.classes)
        else:
            from app.detector import Detector

            names = Detector(cfg.detector.model or None).class_names
    except ConfigError as exc:
        return _fail(EXIT_CONFIG, "configuration refused", str(exc))
    except ModelFormatError as exc:
        return _fail(EXIT_MODEL, "model file refused", str(exc))
    problem = clear_published(m, names, login)
    if problem:
        return _fail(EXIT_FAILURE, "mqtt clear failed", problem)
    log.info("mqtt: removed this camera's discovery and retained topics from %s:%d", m.host, m.port)
    return EXIT_OK


def _run_with(cfg, spec: str, args: argparse.Namespace, stop: threading.Event, notifier) -> int:
    from app.config import ConfigError
    from app.detector import Detector
    from app.modelfile import ModelFormatError
    from app.pipeline import filter_for

    d = cfg.detector
    args.stopper.phase = "loading the model"
    notifier.extend_timeout(WARMUP_EXTEND_S)
    notifier.status("loading model")
    try:
        detector = Detector(
            d.model or None,
            threads=d.threads,
            score_threshold=d.score_threshold,
            nms_iou=d.nms_iou,
            max_detections=d.max_detections,
        )
    except ModelFormatError as exc:
        return _fail(EXIT_MODEL, "model file refused", str(exc))
    except ValueError as exc:
        return _fail(EXIT_CONFIG, "configuration refused", f"detector: {exc}")

    t = cfg.tracker
    try:
        keep = filter_for(detector, d.classes, d.class_thresholds, t.low_score if t.enabled else 1.0)
    except ConfigError as exc:
        return _fail(EXIT_CONFIG, "configuration refused", str(exc))

    web = None
    if cfg.web.enabled and not args.warmup_only:
        # Listening before the warm-up: a port in use is said at once, and the URL comes first.
        from app.web import WebPreview, describe

        e = cfg.events
        web = WebPreview(cfg.web, detector.class_names, secret=args.web_secret,
                         snapshot_dir=e.snapshot_dir if t.enabled else "",
                         info={"model": str(getattr(detector, "path", None) or "(default)"), "source": spec})
        try:
            web.bind()
        except ConfigError as exc:
            return _fail(EXIT_CONFIG, "configuration refused", str(exc))
        log.info("%s", describe(web))
    try:
        return _warm_and_run(cfg, spec, args, stop, notifier, detector, keep, web)
    finally:
        if web is not None:
            web.close()


def _warm_and_run(cfg, spec, args, stop, notifier, detector, keep, web) -> int:
    t = cfg.tracker
    args.stopper.phase = "compiling the kernels"
    notifier.status("warming up")
    detector.warmup()
    tracker = None
    if t.enabled:
        from app.tracker import Tracker, TrackerSettings

        tracker = Tracker(TrackerSettings(confirm_hits=t.confirm_hits, confirm_frames=t.confirm_frames,
                                          lost_after_s=t.lost_after_s, match_iou=t.match_iou,
                                          max_tracks=t.max_tracks))
        tracker.warmup()
        from app.memory import release_compiler_pages

        release_compiler_pages()  # LLVM's code again, if the tracker's kernels were compiled
    if args.warmup_only:
        log.info("model %s loaded and warmed up", getattr(detector, "path", None) or "(default)")
        notifier.ready()
        return EXIT_OK
    if stop.is_set():
        return EXIT_OK
    return _run_pipeline(cfg, spec, args, stop, notifier, detector, keep, tracker, web)


def _run_pipeline(cfg, spec, args, stop, notifier, detector, keep, tracker, web) -> int:
    from app import sinks, sources
    from app.capture import Capture
    from app.events import Events
    from app.pipeline import Pipeline
    from app.snapshots import NullSnapshots, SnapshotStore

    s = cfg.source
    kind = spec.partition(":")[0]
    preview = sinks.make_preview(cfg.preview.mode, kind, detector.class_names,
                                 web_url=web.url if web is not None else None)
    # DRM is shown by picamera2 itself: the preview is attached to each camera the factory opens.
    drm = preview if isinstance(preview, sinks.DrmPreview) else None
    # The camera delivers the network input's size (at the preview's aspect): the letterbox need not resize.
    factory = sources.make_factory(spec, s, drm, network_size=detector.input_size)
    probe = factory()
    finite = bool(getattr(probe, "finite", False))
    paced = kind in ("demo", "images") or (kind == "opencv" and finite)
    # A paced source sleeps inside read(): that is not a hang.
    hang = max(s.hang_timeout_s, 2.0 / s.fps + 1.0) if paced and s.fps > 0 else s.hang_timeout_s
    if kind == "picamera2":
        hang += 1.0  # its captures time out after hang_timeout_s themselves; the watchdog is the backstop
        probe.prepare()  # the sensor mode, chosen before open() runs under the hang clock
    capture = Capture(
        factory,
        hang_timeout_s=hang,
        backoff_initial_s=s.backoff_initial_s,
        backoff_max_s=s.backoff_max_s,
        lossless=finite and s.fps == 0,
    )
    log_sink = args.log_sink or sinks.NullLog()  # opened (and checked) by run()
    from app.mqtt import open_mqtt

    # MQTT reads the frame and event lines the log is given; it never waits on the network.
    mqtt = open_mqtt(cfg.mqtt, list(cfg.detector.classes) or detector.class_names, getattr(args, "mqtt_login", None),
                     stop=stop, tracks=tracker is not None, snapshots=tracker is not None and bool(cfg.events.snapshot_dir),
                     model=os.path.basename(str(getattr(detector, "path", "") or "person.xnc")))
    log_sink = mqtt.tee(log_sink)
    if web is not None:
        from app.web import EventTee

        log_sink = EventTee(log_sink, web)  # the page lists the event lines too
    e = cfg.events
    events = None
    if tracker is not None:
        snapshots = (SnapshotStore(e.snapshot_dir, e.snapshot_max_files, int(e.snapshot_max_mb * 2**20))
                     if e.snapshot_dir else NullSnapshots())
        events = Events(tracker, log_sink.event, detector.class_names, zones=e.zones, only_in_zones=e.only_in_zones,
                        line=e.line, update_every_s=e.update_every_s, snapshots=snapshots)
    recorder = (sinks.Recorder(cfg.preview.record, cfg.preview.record_fps, on_event=log_sink.event,
                               max_mb=cfg.preview.record_max_mb, files=cfg.preview.record_files)
                if cfg.preview.record else sinks.NullRecorder())
    pipeline = Pipeline(
        capture,
        detector,
        keep=keep,
        log_sink=log_sink,
        preview=preview,
        recorder=recorder,
        web=web,
        notifier=notifier,
        events=events,
        hud=cfg.preview.hud,
        max_frames=args.max_frames,
        idle_grace_s=cfg.watchdog.idle_grace_s,
        status_interval_s=cfg.watchdog.status_interval_s,
        status_note=getattr(args, "no_camera", ""),
    )
    log.info("source %s, preview %s, web %s, log %s, tracks %s, snapshots %s", spec, preview.name,
             web.url if web is not None else "off", cfg.log.path or "(none)",
             "on" if tracker is not None else "off", (e.snapshot_dir or "(none)") if tracker is not None else "(none)")
    if web is not None:
        web.status_source = pipeline.status
        web.start()
        if isinstance(preview, sinks.BrowserPreview):
            preview.open()
    if preview.name == "none" and web is None and not cfg.log.path and not cfg.preview.record:
        log.info("no preview, log or recording: add --log - to see the detections as JSON lines")
    notifier.ready()
    args.stopper.running("running the frame loop")
    capture.start()
    try:
        stats = pipeline.run(stop)
    finally:
        args.stopper.phase = "closing the capture, the sinks and MQTT"
        capture.stop()
        for closing in (preview.close, recorder.close):
            try:
                closing()
            except Exception:
                log.debug("closing a sink failed", exc_info=True)
        pipeline.refresh_stats()
        mqtt.close()
        log_sink.close()
    log.info("stopped: %s", stats.summary())
    if capture.failure is not None:  # permanent: the file is bad (65) or this machine cannot run the source (78)
        code, message = capture.failure
        return _fail(code, "source refused", message)
    if mqtt.fatal:
        return _fail(EXIT_CONFIG, "configuration refused", mqtt.fatal)
    return EXIT_OK


def main(argv: list[str] | None = None, as_program: bool = False) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        from app.bench import main as bench_main

        return bench_main(argv[1:])
    if argv and argv[0] == "run":
        argv = argv[1:]
    try:
        return run(argv, as_program=as_program)
    except SystemExit:
        raise
    except Exception:
        log.exception("unexpected error")
        return EXIT_FAILURE


def _end(rc: object) -> None:
    """Ends the program once its run closed everything it writes: the logs flushed, then ``os._exit``. The
    interpreter's own finalisation puts the default signal actions back while it tears down (a second or so
    with numba loaded), and a stop request then (a second SIGTERM moments after the first) killed the
    process by the signal instead of the clean stop's 0."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(rc if isinstance(rc, int) else 1)


if __name__ == "__main__":
    _end(main(as_program=True))
