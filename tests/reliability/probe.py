"""An adversarial probe of the real command lines: ``python -m app`` and ``python -m evaluation`` against
hostile config files, model files, image and video sources, log/record/snapshot paths, signals at odd
times and misused flags.

    python tests/reliability/probe.py [-k SUBSTRING] [-j JOBS] [-v]      (make probe)

Every case says what must happen: an exit code from the documented table (0 stopped normally, 2 bad
command line, 65 model or data refused, 69 no camera, 78 configuration refused), a refusal in exactly one
line on stderr (argparse's usage line plus its error line for its own exit 2), never a traceback, never
longer than the case's timeout, and the files it names as precious byte-for-byte unchanged. A case that
fails is printed with why. The last line is one JSON object: tried, ok, fixed (cases that failed on the
code this probe was first run against and pass now: FIXED says which change), left (failing now, with the
reason in LEFT, or "unexpected"). docs/hostile-input.md records a run.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.reliability import modelbytes  # noqa: E402

MODEL = ROOT / "models" / "person.xnc"
DEMO_JPEG = sorted((ROOT / "app" / "assets" / "demo").glob("*.jpg"))[0]
FIXTURE = ROOT / "tests" / "fixtures" / "person"

# Cases that failed when this probe was first run, with what fixed them.
FIXED: dict[str, str] = {
    "eval: data.yaml that is a FIFO": "read for good: label, data.yaml, VOC and COCO files must be regular (65)",
    "eval: an image that is a FIFO": "the decoder blocked for good: only regular files are images",
    "eval: a label with 1e6 boxes": "ran past 300 s in gigabytes: more than 10000 boxes in an image is refused (65)",
    "model: a class name with a newline and a NUL": "accepted (exit 0), and written into journal lines: class "
                                                    "names with control characters are refused (65)",
    "model: a class name with a lone surrogate": "JSON's \\udce9 escapes passed, and drawing the label crashed "
                                                 "OpenCV (SIGSEGV) once recording: refused (65)",
    "signal SIGINT 0.05 s after the start": "a KeyboardInterrupt traceback from inside an import: SIGINT has "
                                            "its default action until the app's handlers are installed",
    "images: a good one named in Latin-1 bytes": "OpenCV crashed (SIGSEGV) on a file name that is not UTF-8: "
                                                  "such images are read by Python and decoded from memory",
    "video: a FIFO nobody writes": "FFmpeg blocked opening it for good: a FIFO, directory or socket is refused "
                                   "at start (78)",
    "video: a good one named in Latin-1 bytes": "OpenCV crashed (SIGSEGV): refused at start (78), naming the fix",
    "record: a name in Latin-1 bytes": "OpenCV's VideoWriter crashed (SIGSEGV): refused at start (2/78)",
    "record: the model file": "a recording path must have a video suffix and hold a video or nothing (was "
                              "exit 0 and a record_error at the first frame; a notes.mp4 would be overwritten)",
}
# Cases that fail and are left, with the reason.
LEFT: dict[str, str] = {
    "signal SIGINT 0.01 s after the start": "sometimes: Ctrl-C inside the interpreter's own start (site.py, the "
                                            "first ~30 ms, before any code of the app runs) is Python's "
                                            "KeyboardInterrupt traceback and exit 1; the service is stopped "
                                            "with SIGTERM, which ends it cleanly at any moment",
}


@dataclass
class Case:
    name: str
    setup: Callable[[Path], list[str]]  # makes its files under the case's folder, returns the argv after the tool
    codes: tuple[int, ...]
    tool: str = "app"
    timeout: float = 60.0
    precious: Callable[[Path], list[Path]] = lambda d: []
    signal_after: tuple[float, int] | None = None  # (seconds after start, signal)
    second_signal: bool = False
    stdout: str = "pipe"  # pipe | broken (the reader goes away after the first line) | closed
    stderr_closed: bool = False
    check: Callable[[Path, subprocess.CompletedProcess], str | None] | None = None
    env: dict[str, str] = field(default_factory=dict)


CASES: list[Case] = []


def case(name, setup, codes, **kw) -> None:
    CASES.append(Case(name, setup, tuple(codes) if not isinstance(codes, int) else (codes,), **kw))


# ------------------------------------------------------------------ file makers


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def png_header(w: int, h: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return b"\x89PNG\r\n\x1a\n" + chunk


def good_png(w: int = 64, h: int = 48) -> bytes:
    import cv2
    import numpy as np

    ok, buf = cv2.imencode(".png", np.full((h, w, 3), 90, np.uint8))
    return buf.tobytes()


def model_bytes() -> bytes:
    return MODEL.read_bytes()


def model_with(mutate: Callable[[dict], None]) -> bytes:
    magic, version, header, data = modelbytes.split(model_bytes())
    mutate(header)
    return modelbytes.build(header, data, version=version, magic=magic)


def cfg(d: Path, text: str | bytes, name: str = "c.toml") -> Path:
    return write(d / name, text)


RUN = ["--source", "demo", "--fps", "0", "--preview", "none", "--max-frames", "3"]


def with_config(text: str | bytes, *extra: str) -> Callable[[Path], list[str]]:
    return lambda d: ["--config", str(cfg(d, text)), *RUN, *extra]


def tokens(*args: str) -> Callable[[Path], list[str]]:
    """Arguments, with {d} replaced by the case's folder."""
    return lambda d: [a.replace("{d}", str(d)) for a in args]


# ------------------------------------------------------------------ 1. misused flags (2)

for flag, value in [("--fps", "abc"), ("--fps", "nan"), ("--fps", "inf"), ("--fps", "-1"), ("--fps", "1e309"),
                    ("--threads", "0"), ("--threads", "100000"), ("--threads", "1.5"),
                    ("--score-threshold", "0"), ("--score-threshold", "1.5"), ("--score-threshold", "nan"),
                    ("--nms-iou", "-0"), ("--class-threshold", "person=2"), ("--class-threshold", "=0.5"),
                    ("--max-frames", "-1"), ("--log-max-mb", "nan"), ("--log-max-mb", "-1"),
                    ("--log-max-mb", "1e308"), ("--log-files", "0"), ("--log-files", "1000000000"),
                    ("--update-every", "-1"), ("--update-every", "nan"), ("--zone", "x="),
                    ("--zone", "a=0,0 1,1"), ("--zone", "a=0,0 1,nan 0,1"), ("--zone", "a=0,0 1,1 1,0 0,1"),
                    ("--line", "0,0"), ("--line", "0,0 inf,1"), ("--preview", "bogus"), ("--bogus", "1"),
                    ("--web", "nohost"), ("--web", "127.0.0.1:99999"), ("--web", "127.0.0.1:-1")]:
    case(f"flag {flag} {value}", tokens(*RUN, flag, value), 2)  # last: a flag given twice, the last wins
case("flag --config without a value", tokens("--config"), 2)
case("flag --source bogus:x", tokens("--source", "bogus:x", "--preview", "none"), (2, 78))
case("flag --source images: (empty)", tokens("--source", "images:", "--preview", "none"), 2)
case("flag --source '' (empty)", tokens("--source", "", "--preview", "none"), (2, 78))
case("flag --classes that the model lacks", tokens(*RUN, "--classes", "unicorn"), (2, 78))
case("flag --only-in-zones naming no zone", tokens(*RUN, "--only-in-zones", "nowhere"), (2, 78))
case("flag --web on all addresses without auth", tokens(*RUN, "--web", "0.0.0.0:0"), (2, 78))
case("flag --preview browser without --web", tokens(*RUN, "--preview", "browser"), (2, 78))
case("subcommand bench --bogus", tokens("bench", "--bogus"), 2)
case("flag --max-frames with a huge number", tokens(*RUN[:-1], "1" + "0" * 40), (0, 2),
     signal_after=(3.0, signal.SIGTERM), timeout=30)
case("argv with a NUL-free control character", tokens("--source", "images:/no\x07where", "--preview", "none"), 2)

# ------------------------------------------------------------------ 2. hostile config files (78)

BAD_CONFIGS = {
    "an unknown key": "[source]\nspeck = 'demo'\n",
    "an unknown table": "[camera]\nx = 1\n",
    "a wrong type": "[source]\nfps = 'fast'\n",
    "fps = nan": "[source]\nfps = nan\n",
    "fps = inf": "[source]\nfps = inf\n",
    "fps = -inf": "[source]\nfps = -inf\n",
    "a negative width": "[source]\nwidth = -5\n",
    "a width of 10**18": "[source]\nwidth = 1000000000000000000\n",
    "an integer past 64 bits": "[source]\nwidth = 99999999999999999999999999\n",
    "a float where an int goes": "[detector]\nthreads = 1.5\n",
    "a bool where a number goes": "[detector]\nthreads = true\n",
    "max_pixels = 0": "[source]\nmax_pixels = 0\n",
    "log.max_mb = -1": "[log]\nmax_mb = -1.0\n",
    "log.max_mb = 1e-300": "[log]\nmax_mb = 1e-300\n",
    "log.files = 0": "[log]\nfiles = 0\n",
    "hang_timeout_s = 1e-300": "[source]\nhang_timeout_s = 1e-300\n",
    "backoff_max_s = inf": "[source]\nbackoff_max_s = inf\n",
    "record_fps = 0": "[preview]\nrecord_fps = 0.0\n",
    "status_interval_s = 1e-9": "[watchdog]\nstatus_interval_s = 1e-9\n",
    "idle_grace_s = nan": "[watchdog]\nidle_grace_s = nan\n",
    "snapshot_max_files = 0": "[events]\nsnapshot_max_files = 0\n",
    "a zone of 2 points": "[events]\nzones = { a = [[0.0, 0.0], [1.0, 1.0]] }\n",
    "a self-crossing zone": "[events]\nzones = { a = [[0,0],[1,1],[1,0],[0,1]] }\n",
    "a zone with nan": "[events]\nzones = { a = [[0,0],[1,nan],[0,1]] }\n",
    "a zone outside 0..1": "[events]\nzones = { a = [[0,0],[5,0],[0,5]] }\n",
    "a line of 3 points": "[events]\nline = [[0,0],[1,1],[0,1]]\n",
    "mqtt.port = 70000": "[mqtt]\nport = 70000\n",
    "web.listen garbage": "[web]\nenabled = true\nlisten = ':::'\n",
    "a control character in log.path": "[log]\npath = \"a\\u0007b\"\n",
    "a NUL in log.path": "[log]\npath = \"a\\u0000b\"\n",
    "a newline in preview.record": "[preview]\nrecord = \"a\\nb.mp4\"\n",
    "a NUL in the model path": "[detector]\nmodel = \"m\\u0000.xnc\"\n",
    "classes of the wrong type": "[detector]\nclasses = [1, 2]\n",
    "a class threshold string": "[detector]\nclass_thresholds = { person = 'x' }\n",
    "a duplicate key": "[source]\nfps = 1.0\nfps = 2.0\n",
    "a duplicate table": "[source]\n[source]\n",
    "not TOML": "this is not = = toml\n",
    "deep arrays": "x = " + "[" * 5000 + "]" * 5000 + "\n",
    "a deep dotted key": "a" + ".a" * 20000 + " = 1\n",
    "a deep inline table": "x = " + "{a=" * 3000 + "1" + "}" * 3000 + "\n",
    "a source spec of opencv:/dev/zero": "[source]\nspec = 'opencv:/dev/zero'\n",
    "images from /dev": "[source]\nspec = 'images:/dev'\n",
}
for what, text in BAD_CONFIGS.items():
    if what == "a source spec of opencv:/dev/zero":
        case(f"config: {what}", lambda d, t=text: ["--config", str(cfg(d, t)), "--preview", "none",
                                                    "--max-frames", "3"], (65, 78), timeout=60)
        continue
    src = [] if "spec" in text else RUN
    case(f"config: {what}", lambda d, t=text, s=src: ["--config", str(cfg(d, t)), *s], 78)
case("config: not UTF-8", lambda d: ["--config", str(cfg(d, b"[source]\nspec = '\xff\xfe'\n")), *RUN], 78)
case("config: a UTF-8 BOM", lambda d: ["--config", str(cfg(d, "\ufeff[source]\nfps = 0.0\n")), *RUN], (0, 78))
case("config: UTF-16", lambda d: ["--config", str(cfg(d, "[source]\nfps = 0.0\n".encode("utf-16"))), *RUN], 78)
case("config: empty (the defaults)", lambda d: ["--config", str(cfg(d, "")), *RUN], 0)
case("config: 2 MB of comments", lambda d: ["--config", str(cfg(d, "#" * 2_000_000 + "\n")), *RUN], (0, 78))
case("config: a directory", lambda d: ["--config", str(d), *RUN], 78)
case("config: missing", lambda d: ["--config", str(d / "nope.toml"), *RUN], 78)


def fifo(d: Path, name: str = "fifo") -> Path:
    p = d / name
    os.mkfifo(p)
    return p


case("config: a FIFO nobody writes", lambda d: ["--config", str(fifo(d)), *RUN], 78, timeout=20)
case("config: /dev/zero", tokens("--config", "/dev/zero", *RUN), 78, timeout=20)
case("config: /dev/null", tokens("--config", "/dev/null", *RUN), (0, 78))


def symlink_loop(d: Path, name: str) -> Path:
    p = d / name
    p.symlink_to(p)
    return p


case("config: a symlink loop", lambda d: ["--config", str(symlink_loop(d, "loop.toml")), *RUN], 78)


def linked_config(d: Path) -> list[str]:
    real = cfg(d, "[source]\nfps = 0.0\n", "real.toml")
    (d / "link.toml").symlink_to(real)
    return ["--config", str(d / "link.toml"), *RUN]


case("config: a symlink to a good config", linked_config, 0)
case("config: a socket", lambda d: ["--config", str(unix_socket(d)), *RUN], 78)


def unix_socket(d: Path) -> Path:
    p = d / "sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(p))
    s.close()
    return p


# ------------------------------------------------------------------ 3. hostile model files (65)


def model_case(name: str, make: Callable[[Path], Path], codes=(65,), timeout=60.0) -> None:
    case(f"model: {name}", lambda d: ["--model", str(make(d)), *RUN], codes, timeout=timeout)


def flipped(offset_from: str, at: float) -> Callable[[Path], Path]:
    def make(d: Path) -> Path:
        raw = bytearray(model_bytes())
        start = modelbytes.data_start(bytes(raw)) if offset_from == "data" else 16
        end = len(raw) - 32 if offset_from == "data" else modelbytes.data_start(bytes(raw))
        i = start + int((end - start) * at)
        raw[i] ^= 0x10
        return write(d / "m.xnc", bytes(raw))
    return make


model_case("zero bytes", lambda d: write(d / "m.xnc", b""))
for cut in (4, 15, 100, 0.5, -1, -33):
    model_case(f"truncated at {cut}", lambda d, c=cut: write(
        d / "m.xnc", model_bytes()[: (int(len(model_bytes()) * c) if isinstance(c, float) else c)]))
for where, at in (("header", 0.3), ("header", 0.9), ("data", 0.0), ("data", 0.5), ("data", 0.999)):
    model_case(f"a flipped bit in the {where} at {at}", flipped(where, at))
model_case("wrong magic", lambda d: write(d / "m.xnc", b"NOTAMODL" + model_bytes()[8:]))
model_case("a PNG named .xnc", lambda d: write(d / "m.xnc", good_png()))
model_case("the config file as model", lambda d: cfg(d, "[source]\nfps = 1.0\n", "m.xnc"))
model_case("a header length of 4 GiB", lambda d: write(
    d / "m.xnc", modelbytes.PREFIX.pack(b"XNORCAM\x00", 1, 0xFFFFFFFF) + b"{}"))
model_case("version 999", lambda d: write(d / "m.xnc", modelbytes.reseal(
    model_bytes()[:8] + struct.pack("<I", 999) + model_bytes()[12:])))
model_case("a 3 GB sparse file with the magic", lambda d: sparse(d / "m.xnc", 3 << 30), timeout=30)
model_case("a directory", lambda d: d)
model_case("a FIFO", lambda d: fifo(d, "m.xnc"), timeout=20)
model_case("/dev/zero", lambda d: Path("/dev/zero"), timeout=20)
model_case("/dev/urandom", lambda d: Path("/dev/urandom"), timeout=20)
model_case("a symlink loop", lambda d: symlink_loop(d, "m.xnc"))
model_case("missing", lambda d: d / "nope.xnc")


def sparse(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.write(model_bytes()[:16])
        f.truncate(size)
    return path


def set_input(w, h, c=None):
    def mutate(header):
        header["input"]["width"], header["input"]["height"] = w, h
        if c is not None:
            header["input"]["channels"] = c
    return mutate


for label, mutate in [
    ("an input of 65536x65536", set_input(65536, 65536)),
    ("an input of 0x0", set_input(0, 0)),
    ("an input of -8x-8", set_input(-8, -8)),
    ("an input of 2**63", set_input(2**63, 2**63)),
    ("an input width as a string", set_input("192", 192)),
    ("an input width of nan", set_input(float("nan"), 192)),
    ("layers = null", lambda h: h.__setitem__("layers", None)),
    ("no layers", lambda h: h.__setitem__("layers", [])),
    ("10000 copies of the first layer", lambda h: h.__setitem__("layers", h["layers"][:1] * 10000)),
    ("a data_size past the file", lambda h: h.__setitem__("data_size", h["data_size"] * 4)),
    ("negative data_size", lambda h: h.__setitem__("data_size", -1)),
    ("class names = 5", lambda h: h.__setitem__("class_names", 5)),
    ("no class names", lambda h: h.__setitem__("class_names", [])),
    ("1e6 class names", lambda h: h.__setitem__("class_names", ["c"] * 1_000_000)),
    ("a class name with a newline and a NUL", lambda h: h.__setitem__("class_names", ["per\nson\x00"])),
    ("a class name with a lone surrogate", lambda h: h.__setitem__("class_names", ["per\udce9son"])),
    ("a score threshold of nan", lambda h: h["decode"].__setitem__("score_threshold", float("nan"))),
    ("a score threshold of 7", lambda h: h["decode"].__setitem__("score_threshold", 7)),
    ("an nms_iou of -1", lambda h: h["decode"].__setitem__("nms_iou", -1)),
    ("no anchors", lambda h: h.__setitem__("anchors", [])),
    ("an anchor of nan", lambda h: h.__setitem__("anchors", [[float("nan"), 1.0]] * 3)),
    ("an anchor of 1e308", lambda h: h.__setitem__("anchors", [[1e308, 1e308]] * 3)),
    ("format = something else", lambda h: h.__setitem__("format", "onnx")),
]:
    model_case(label, lambda d, m=mutate: write(d / "m.xnc", model_with(m)))

# ------------------------------------------------------------------ 4. hostile images and videos


def images(*files: tuple[str, bytes | None]) -> Callable[[Path], list[str]]:
    def setup(d: Path) -> list[str]:
        folder = d / "imgs"
        folder.mkdir()
        for name, data in files:
            if data is None:
                special(folder / name)
            else:
                write(folder / name, data)
        return ["--source", f"images:{folder}", "--fps", "0", "--preview", "none", "--log", str(d / "log.jsonl")]
    return setup


def special(path: Path) -> None:
    kind = path.stem.split("-")[0]
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dir":
        path.mkdir()
    elif kind == "loop":
        path.symlink_to(path)
    elif kind == "dangling":
        path.symlink_to(path.parent / "nowhere")
    elif kind == "sock":
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(path))
        s.close()
    elif kind == "devzero":
        path.symlink_to("/dev/zero")


GOOD = DEMO_JPEG.read_bytes()


def logged_frames(n: int):
    def check(d: Path, r) -> str | None:
        try:
            lines = (d / "log.jsonl").read_text().splitlines()
        except OSError as exc:
            return f"no log ({exc})"
        frames = [x for x in lines if '"event"' not in x]
        return None if len(frames) == n else f"{len(frames)} frame lines logged, expected {n}"
    return check


case("images: a zero-byte JPEG alone", images(("a.jpg", b"")), 65)
case("images: a truncated JPEG alone", images(("a.jpg", GOOD[: len(GOOD) // 3])), (0, 65))
case("images: a truncated PNG alone", images(("a.png", good_png()[:60])), 65)
case("images: a PNG header of 100000x100000", images(("a.png", png_header(100000, 100000))), 65)
case("images: a PNG header of 0x0", images(("a.png", png_header(0, 0))), 65)
case("images: a PNG header of 2**31x2**31", images(("a.png", png_header(2**31 - 1, 2**31 - 1))), 65)
case("images: a BMP header of 30000x30000", images(("a.bmp", b"BM" + struct.pack("<IHHI", 0, 0, 0, 54)
                                                   + struct.pack("<IiiHH", 40, 30000, 30000, 1, 24)
                                                   + b"\x00" * 24)), 65)
case("images: a PGM header of 100000x100000", images(("a.pgm", b"P5\n100000 100000\n255\n\x00\x00")), 65)
case("images: a PPM header with a negative size", images(("a.ppm", b"P6\n-5 -5\n255\n")), 65)
case("images: text named .jpg", images(("a.jpg", b"hello, not an image\n")), 65)
case("images: a WebP of junk", images(("a.webp", b"RIFF\x10\x00\x00\x00WEBPVP8 " + b"\xff" * 32)), 65)
case("images: a TIFF header of junk", images(("a.tif", b"II*\x00" + b"\xff" * 64)), 65)
case("images: one good among junk, FIFOs, dirs, loops, sockets, a link to /dev/zero",
     images(("0.jpg", GOOD), ("1.jpg", b""), ("2.png", png_header(40000, 40000)), ("fifo-3.jpg", None),
            ("dir-4.jpg", None), ("loop-5.jpg", None), ("dangling-6.jpg", None), ("sock-7.jpg", None),
            ("devzero-8.jpg", None), ("9.jpg", b"junk")), 0, timeout=60, check=logged_frames(1))
case("images: a good one named with a newline and a tab", images(("a\nb\tc.jpg", GOOD)), 0,
     check=logged_frames(1))
case("images: a good one named in Latin-1 bytes", lambda d: images_bytes_name(d), 0)
case("images: an empty folder", lambda d: ["--source", f"images:{mkdir(d / 'e')}", "--preview", "none"], 78)
case("images: a glob matching nothing", tokens("--source", "images:{d}/*.jpg", "--preview", "none"), 78)
case("images: a folder of 2000 zero-byte JPEGs", lambda d: many_empty(d), 65, timeout=120)


def mkdir(p: Path) -> Path:
    p.mkdir()
    return p


def images_bytes_name(d: Path) -> list[str]:
    folder = mkdir(d / "imgs")
    with open(os.path.join(bytes(folder), b"caf\xe9.jpg"), "wb") as f:
        f.write(GOOD)
    return ["--source", f"images:{folder}", "--fps", "0", "--preview", "none", "--log", str(d / "log.jsonl")]


def many_empty(d: Path) -> list[str]:
    folder = mkdir(d / "imgs")
    for i in range(2000):
        (folder / f"{i:05d}.jpg").write_bytes(b"")
    return ["--source", f"images:{folder}", "--fps", "0", "--preview", "none"]


def video(d: Path, data: bytes | None) -> list[str]:
    p = d / "v.mp4"
    if data is None:
        os.mkfifo(p)
    else:
        write(p, data)
    return ["--source", f"opencv:{p}", "--fps", "0", "--preview", "none", "--max-frames", "3"]


def latin1_video(d: Path) -> list[str]:
    name = os.fsdecode(bytes(d) + b"/caf\xe9.mp4")
    with open(name, "wb") as f:
        f.write(real_video())
    return ["--source", f"opencv:{name}", "--fps", "0", "--preview", "none", "--max-frames", "3"]


_VIDEO: list[bytes] = []


def real_video() -> bytes:
    """A short MP4 of the demo photo (made once)."""
    if not _VIDEO:
        import cv2

        path = Path(tempfile.mkdtemp(prefix="xnorcam-probe-video-")) / "v.mp4"
        img = cv2.resize(cv2.imread(str(DEMO_JPEG)), (320, 240))
        w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10, (320, 240))
        for _ in range(20):
            w.write(img)
        w.release()
        _VIDEO.append(path.read_bytes())
        shutil.rmtree(path.parent, ignore_errors=True)
    return _VIDEO[0]


case("video: zero bytes", lambda d: video(d, b""), 65)
case("video: the first 2 KB of a real one", lambda d: video(d, real_video()[:2048]), 65)
case("video: half of a real one", lambda d: video(d, real_video()[: len(real_video()) // 2]), (0, 65))
case("video: a JPEG named .mp4", lambda d: video(d, GOOD), (0, 65))
case("video: random bytes", lambda d: video(d, os.urandom(100_000)), 65)
case("video: a FIFO nobody writes", lambda d: video(d, None), 78, timeout=30)
case("video: a directory", tokens("--source", "opencv:{d}", "--preview", "none", "--max-frames", "3"), (2, 65, 78),
     timeout=30)
case("video: a good one named in Latin-1 bytes", lambda d: latin1_video(d), 78)
case("record: a name in Latin-1 bytes", lambda d: [*RUN, "--record", os.fsdecode(bytes(d) + b"/caf\xe9.mp4")], 2)
case("snapshots: a folder named in Latin-1 bytes", lambda d: [*RUN, "--snapshots", os.fsdecode(bytes(d) + b"/s\xe9")],
     0)
case("log: a name in Latin-1 bytes", lambda d: [*RUN, "--log", os.fsdecode(bytes(d) + b"/l\xe9.jsonl")], 0)
case("video: /dev/null", tokens("--source", "opencv:/dev/null", "--preview", "none", "--max-frames", "3"), (65, 78),
     timeout=30)
case("video: a missing file", tokens("--source", "opencv:{d}/nope.mp4", "--preview", "none"), 78)

# ------------------------------------------------------------------ 5. hostile log, record and snapshot paths


def precious_file(d: Path, name: str = "notes.txt", data: bytes = b"my notes\nline two") -> Path:
    return write(d / name, data)


for name, make, codes in [
    ("a directory", lambda d: d, 78),
    ("a FIFO", lambda d: fifo(d), 78),
    ("a socket", lambda d: unix_socket(d), 78),
    ("below a file", lambda d: precious_file(d) / "x.jsonl", 78),
    ("the model file", lambda d: write(d / "m.xnc", model_bytes()), 78),
    ("a notes file without a final newline", lambda d: precious_file(d), 78),
    ("a one-line token", lambda d: precious_file(d, "token", b"s3cr3t-t0ken"), 78),
    ("a symlink to a notes file", lambda d: link(d / "l.jsonl", precious_file(d)), 78),
    ("a symlink loop", lambda d: symlink_loop(d, "l.jsonl"), 78),
    ("/dev/full", lambda d: "/dev/full", 0),
    ("/dev/null", lambda d: "/dev/null", 0),
    ("a new file 20 folders deep", lambda d: d / ("x/" * 20) / "l.jsonl", 0),
    ("a name with a newline", lambda d: d / "a\nb.jsonl", 2),  # control characters in paths are refused
    ("a name of 300 bytes", lambda d: d / ("n" * 300), 78),
]:
    case(f"log: {name}", lambda d, m=make: [*RUN, "--log", str(m(d))], codes,
         precious=lambda d: [p for p in (d / "notes.txt", d / "token", d / "m.xnc") if p.exists()])


def link(p: Path, target: Path) -> Path:
    p.symlink_to(target)
    return p


def rotation_over(kind: str) -> Callable[[Path], list[str]]:
    def setup(d: Path) -> list[str]:
        log = d / "notes"
        if kind == "dir":
            mkdir(d / "notes.2")
        else:
            precious_file(d, "notes.1")
        return [*RUN, "--log", str(log), "--log-max-mb", "0.001", "--log-files", "3"]
    return setup


case("log: rotation over the user's notes.1", rotation_over("file"), 78,
     precious=lambda d: [d / "notes.1"])
case("log: rotation over a directory notes.2", rotation_over("dir"), 78)
case("log: stdout closed", tokens(*RUN, "--log", "-"), 78, stdout="closed")
case("log: stdout a pipe whose reader leaves", tokens("--source", "demo", "--fps", "0", "--preview", "none",
                                                      "--max-frames", "200", "--log", "-"), 0, stdout="broken")
case("log: stderr closed, a good run", tokens(*RUN), 0, stderr_closed=True)
case("log: stderr closed, a refused config", tokens(*RUN, "--fps", "nan"), 2, stderr_closed=True)

for name, make, codes in [
    ("a directory", lambda d: d, 2),
    ("a FIFO", lambda d: fifo(d), 2),
    ("/dev/full", lambda d: "/dev/full", 2),
    ("/dev/null", lambda d: "/dev/null", 2),
    ("below a file", lambda d: precious_file(d) / "x.mp4", 2),
    ("the user's notes file", lambda d: precious_file(d), 2),
    ("the model file", lambda d: write(d / "m.xnc", model_bytes()), 2),
    ("the user's notes named .mp4", lambda d: precious_file(d, "notes.mp4"), 2),
    ("a PNG named .mkv", lambda d: write(d / "notes.mkv", good_png()), 2),
    ("an earlier recording", lambda d: earlier_recording(d), 0),
    ("a name without a suffix", lambda d: d / "recording", 2),
    ("a symlink loop", lambda d: symlink_loop(d, "r.mp4"), 2),
    ("a new file 20 folders deep", lambda d: d / ("x/" * 20) / "r.mp4", 0),
    ("a name of 300 bytes", lambda d: d / ("n" * 296 + ".mp4"), 2),
]:
    case(f"record: {name}", lambda d, m=make: [*RUN, "--record", str(m(d))], codes,
         precious=lambda d: [p for p in (d / "notes.txt", d / "m.xnc", d / "notes.mp4", d / "notes.mkv")
                             if p.exists()])


def earlier_recording(d: Path) -> Path:
    import cv2
    import numpy as np

    w = cv2.VideoWriter(str(d / "r.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 10, (64, 48))
    for _ in range(3):
        w.write(np.zeros((48, 64, 3), np.uint8))
    w.release()
    return d / "r.mp4"

for name, make, codes in [
    ("a file", lambda d: precious_file(d), 2),
    ("a FIFO", lambda d: fifo(d), 2),
    ("/dev/null", lambda d: "/dev/null", 2),
    ("below a file", lambda d: precious_file(d) / "snaps", 2),
    ("a symlink loop", lambda d: symlink_loop(d, "snaps"), 2),
    ("a folder of the user's files", lambda d: user_folder(d), 0),
]:
    case(f"snapshots: {name}", lambda d, m=make: [*RUN, "--snapshots", str(m(d))], codes,
         precious=lambda d: [p for p in (d / "notes.txt", d / "snaps" / "keep.jpg") if p.exists()])


def user_folder(d: Path) -> Path:
    folder = mkdir(d / "snaps")
    write(folder / "keep.jpg", GOOD)
    return folder


# ------------------------------------------------------------------ 6. signals at odd times (0 within 2 s)

LONG = ["--source", "demo", "--preview", "none", "--fps", "30"]
for sig in (signal.SIGTERM, signal.SIGINT):
    for after in (0.01, 0.05, 0.3, 1.0, 3.0):
        # Before the app's handlers exist (the interpreter starting, the first imports) the signal's own
        # action ends it, which systemd counts as a clean stop for SIGTERM and SIGINT; never a traceback.
        case(f"signal {sig.name} {after} s after the start", tokens(*LONG, "--log", "{d}/log.jsonl"),
             (0, -sig) if after < 0.3 else 0, signal_after=(after, sig), timeout=30)
case("signal SIGTERM twice at 1 s", tokens(*LONG), 0, signal_after=(1.0, signal.SIGTERM), second_signal=True,
     timeout=30)
case("signal SIGTERM during the images: replay", lambda d: images(*[(f"{i}.jpg", GOOD) for i in range(40)])(d)
     + ["--loop"], 0, signal_after=(2.0, signal.SIGTERM), timeout=30)
case("signal SIGHUP 2 s after the start", tokens(*LONG), (0, -signal.SIGHUP), signal_after=(2.0, signal.SIGHUP),
     timeout=30)
case("signal SIGTERM to a live source that never opens", tokens("--source", "opencv:99", "--preview", "none"), 0,
     signal_after=(3.0, signal.SIGTERM), timeout=30)

# ------------------------------------------------------------------ 7. python -m evaluation


def dataset(d: Path, labels: dict[str, str] | None = None, yaml: str | None = None) -> Path:
    data = d / "data"
    shutil.copytree(FIXTURE, data)
    for name, text in (labels or {}).items():
        write(data / "labels" / name, text)
    if yaml is not None:
        write(data / "data.yaml", yaml)
    return data


def first_label() -> str:
    return sorted((FIXTURE / "labels").glob("*.txt"))[0].name


def ev(name: str, setup: Callable[[Path], list[str]], codes, **kw) -> None:
    case(f"eval: {name}", setup, codes, tool="evaluation", timeout=kw.pop("timeout", 180), **kw)


ev("the fixture, as it is", lambda d: ["--data", str(dataset(d))], 0)
ev("a missing folder", tokens("--data", "{d}/nope"), (2, 65))
ev("an empty folder", tokens("--data", "{d}"), (2, 65))
ev("a label with nan", lambda d: ["--data", str(dataset(d, {first_label(): "0 nan 0.5 0.1 0.1\n"}))], 65)
ev("a label with a negative size", lambda d: ["--data", str(dataset(d, {first_label(): "0 0.5 0.5 -0.1 0.1\n"}))], 65)
ev("a label outside the image", lambda d: ["--data", str(dataset(d, {first_label(): "0 5 5 0.1 0.1\n"}))], 65)
ev("a label of binary junk", lambda d: ["--data", str(dataset(d, {first_label(): "\x00\xff\x00junk"}))], 65)
ev("a label with 1e6 boxes", lambda d: ["--data", str(dataset(d, {first_label(): "0 0.5 0.5 0.1 0.1\n" * 1_000_000}))],
   65, timeout=120)
ev("a malformed label with --skip-bad", lambda d: ["--data", str(dataset(d, {first_label(): "zero 1 2\n"})),
                                                   "--skip-bad"], (0, 65))
ev("data.yaml names as a mapping", lambda d: ["--data", str(dataset(d, yaml="names: {0: person}\n"))], 0)
ev("data.yaml nested deep", lambda d: ["--data", str(dataset(d, yaml="names: " + "[" * 50000 + "]" * 50000))], 65)
ev("data.yaml of junk", lambda d: ["--data", str(dataset(d, yaml="\x00\xff: : :\n"))], 65)
ev("data.yaml names of the wrong type", lambda d: ["--data", str(dataset(d, yaml="names: 5\n"))], 65)
ev("data.yaml that is a FIFO", lambda d: ["--data", str(fifo_yaml(d))], 65, timeout=30)
ev("a class the model lacks", lambda d: ["--data", str(dataset(d)), "--class", "unicorn"], (2, 65))
ev("--limit -1", lambda d: ["--data", str(dataset(d)), "--limit", "-1"], 2)
ev("--limit 0", lambda d: ["--data", str(dataset(d)), "--limit", "0"], (0, 2))
ev("--threshold 2", lambda d: ["--data", str(dataset(d)), "--threshold", "2"], 2)
ev("--threshold nan", lambda d: ["--data", str(dataset(d)), "--threshold", "nan"], 2)
ev("--format bogus", lambda d: ["--data", str(dataset(d)), "--format", "bogus"], 2)
ev("--format coco on a YOLO folder", lambda d: ["--data", str(dataset(d)), "--format", "coco"], (2, 65))
ev("a junk model", lambda d: ["--data", str(dataset(d)), "--model", str(write(d / "m.xnc", b"junk"))], 65)
ev("--sheet into a directory", lambda d: ["--data", str(dataset(d)), "--sheet", str(d)], (2, 65))
ev("--sheet to /dev/full", lambda d: ["--data", str(dataset(d)), "--sheet", "/dev/full"], (2, 65))
ev("--sheet over the user's notes", lambda d: ["--data", str(dataset(d)), "--sheet", str(precious_file(d))], (2, 65),
   precious=lambda d: [d / "notes.txt"])
ev("--sheet-images 0", lambda d: ["--data", str(dataset(d)), "--sheet", str(d / "s.png"), "--sheet-images", "0"], 2)
ev("an image that is a FIFO", lambda d: ["--data", str(fifo_image(d))], (0, 65), timeout=60)


def fifo_yaml(d: Path) -> Path:
    data = dataset(d)
    os.mkfifo(data / "data.yaml")
    return data


def fifo_image(d: Path) -> Path:
    data = dataset(d)
    img = sorted((data / "images").iterdir())[0]
    img.unlink()
    os.mkfifo(img)
    return data


COCO_BAD = {
    "truncated JSON": '{"images": [',
    "nested deep": '{"images": ' + "[" * 100000 + "]" * 100000 + "}",
    "images of the wrong type": '{"images": 5, "annotations": [], "categories": []}',
    "a bbox of strings": None,
    "an annotation for an image that does not exist": None,
}


def coco(d: Path, what: str) -> list[str]:
    data = d / "coco"
    (data / "images").mkdir(parents=True)
    img = sorted((FIXTURE / "images").iterdir())[0]
    shutil.copy(img, data / "images" / img.name)
    doc = {"images": [{"id": 1, "file_name": img.name, "width": 640, "height": 480}],
           "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 50, 100]}],
           "categories": [{"id": 1, "name": "person"}]}
    if what == "a bbox of strings":
        doc["annotations"][0]["bbox"] = ["a", "b", "c", "d"]
        text = json.dumps(doc)
    elif what == "an annotation for an image that does not exist":
        doc["annotations"][0]["image_id"] = 99
        text = json.dumps(doc)
    else:
        text = COCO_BAD[what]
    write(data / "annotations.json", text)
    return ["--data", str(data), "--format", "coco"]


for what in COCO_BAD:
    ev(f"COCO: {what}", lambda d, w=what: coco(d, w), 65)

# ------------------------------------------------------------------ running


@dataclass
class Outcome:
    case: Case
    ok: bool
    why: str
    seconds: float


def digest(p: Path) -> str:
    if p.is_symlink():
        return "link:" + os.readlink(p)
    if p.is_dir():
        return "dir:" + ",".join(sorted(x.name for x in p.iterdir()))
    return hashlib.sha256(p.read_bytes()).hexdigest()


def env_for(c: Case) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "INVOCATION_ID", "DISPLAY",
                        "WAYLAND_DISPLAY")}
    env.update(c.env)
    return env


def run_case(c: Case, base: Path) -> Outcome:
    d = base / f"{CASES.index(c):03d}"
    d.mkdir()
    t0 = time.monotonic()
    try:
        argv = c.setup(d)
    except Exception as exc:
        return Outcome(c, False, f"probe setup failed: {exc!r}", 0.0)
    precious = {p: digest(p) for p in [MODEL, *c.precious(d)] if p.exists() or p.is_symlink()}
    cmd = [sys.executable, "-m", c.tool, *argv]
    stdout = subprocess.DEVNULL if c.stdout == "pipe" else subprocess.PIPE
    kwargs = {}
    if c.stdout == "closed" or c.stderr_closed:
        closing = ([1] if c.stdout == "closed" else []) + ([2] if c.stderr_closed else [])
        # The shell closes them (>&- / 2>&-): Python then starts with sys.stdout/sys.stderr None.
        cmd = ["sh", "-c", 'exec "$@" ' + " ".join(f"{fd}>&-" for fd in closing), "sh", *cmd]
        stdout = subprocess.DEVNULL if c.stdout == "closed" else stdout
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, cwd=ROOT, env=env_for(c), stdin=subprocess.DEVNULL, stdout=stdout,
                         stderr=subprocess.PIPE, start_new_session=True, **kwargs)
    err_chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: err_chunks.append(p.stderr.read()), daemon=True)
    reader.start()
    if c.stdout == "broken":
        p.stdout.readline()
        p.stdout.close()
    signalled = None
    try:
        if c.signal_after:
            delay, sig = c.signal_after
            try:
                p.wait(delay)
            except subprocess.TimeoutExpired:
                p.send_signal(sig)
                signalled = time.monotonic()
                if c.second_signal:
                    time.sleep(0.05)
                    p.send_signal(sig)
        rc = p.wait(c.timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        reader.join(5)
        return Outcome(c, False, f"no exit within {c.timeout:g} s (killed)", time.monotonic() - t0)
    reader.join(10)
    if c.stdout == "pipe" and p.stdout:
        p.stdout.close()
    seconds = time.monotonic() - t0
    err = b"".join(err_chunks).decode("utf-8", "replace")
    lines = [x for x in err.splitlines() if x.strip()]
    problems = []
    if rc not in c.codes:
        problems.append(f"exit {rc}, expected {'/'.join(map(str, c.codes))}")
    if "Traceback" in err or "Exception ignored" in err or "--- Logging error ---" in err:
        problems.append("a traceback on stderr")
    if rc not in (0, None) and rc > 0 and not c.stderr_closed:
        if rc == 2 and lines and lines[0].startswith("usage:"):
            if not (lines[-1].startswith("python -m ") and ": error: " in lines[-1]):
                problems.append("argparse usage without its error line")
        elif lines and lines[-1].startswith("xnorcam: source refused:"):
            pass  # a permanent source error met while running: the run's own log lines, then the one line
        elif len(lines) != 1:
            problems.append(f"{len(lines)} lines on stderr for a refusal, expected 1")
    if signalled is not None and rc == 0 and time.monotonic() - signalled > 2.5 + 0.5:
        problems.append(f"stopped {time.monotonic() - signalled:.1f} s after the signal (bound: 2 s)")
    for path, before in precious.items():
        try:
            after = digest(path)
        except OSError as exc:
            after = f"gone ({exc.strerror})"
        if after != before:
            problems.append(f"{path.name} changed")
    if c.check is not None and not problems:
        extra = c.check(d, subprocess.CompletedProcess(cmd, rc, "", err))
        if extra:
            problems.append(extra)
    why = "; ".join(problems)
    if problems:
        why += f" | stderr: {' / '.join(lines[-3:])[:400]}"
    return Outcome(c, not problems, why, seconds)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-k", default="", help="only cases whose name contains this")
    ap.add_argument("-j", type=int, default=2, help="cases run at once (default 2)")
    ap.add_argument("-v", action="store_true", help="print every case, not only the failing ones")
    args = ap.parse_args(argv)
    chosen = [c for c in CASES if args.k in c.name]
    base = Path(tempfile.mkdtemp(prefix="xnorcam-probe-"))
    outcomes: list[Outcome] = []
    try:
        with concurrent.futures.ThreadPoolExecutor(args.j) as pool:
            for o in pool.map(lambda c: run_case(c, base), chosen):
                outcomes.append(o)
                if args.v or not o.ok:
                    status = "ok  " if o.ok else "FAIL"
                    print(f"{status} {o.seconds:6.1f}s  {o.case.name}" + ("" if o.ok else f"\n      {o.why}"),
                          flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    ok = sum(o.ok and o.case.name not in FIXED for o in outcomes)
    fixed = sum(o.ok and o.case.name in FIXED for o in outcomes)
    left = [o for o in outcomes if not o.ok]
    for o in left:
        print(f"left: {o.case.name}: {LEFT.get(o.case.name, 'unexpected: ' + o.why)}")
    print(json.dumps({"tried": len(outcomes), "ok": ok, "fixed": fixed, "left": len(left)}))
    return 0 if not [o for o in left if o.case.name not in LEFT] else 1


if __name__ == "__main__":
    sys.exit(main())
