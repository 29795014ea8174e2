"""False events on person-free footage: a pan over person-free photos, with and without track confirmation.

    .venv/bin/python benchmarks/false_events.py [--images N] [--footage demo|strip] [--model FILE]
                                                [--settings 1/1,3/5,5/7]

The footage is the first N photos of ``negatives/coco_crops`` in the shared
datasets (person-free crops of everyday scenes), played as 10 fps: ``demo``
(the default) shows each photo for 3 s with the demo source's slow zoom and
drift (app.sources.DemoSource), ``strip`` pans a 320x240 window 10 px a frame
along the photos laid side by side (``tests/clip.py``'s pan; the seams between
photos are extra edges the detector sees). Every frame goes through
the Detector and the detection filter as in the app (boxes down to
``tracker.low_score`` of the threshold for the tracker), then through one
tracker per confirmation setting N/M (``1/1`` = no confirmation: every box
starts a confirmed track). Each ``enter`` is a false event: there is nobody to
see. Prints one line per setting; the last line is one JSON object. Exits 0
with a message when the shared datasets are absent.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import cv2  # noqa: E402

from app.config import TrackerConfig  # noqa: E402
from app.detector import Detector  # noqa: E402
from app.events import Events  # noqa: E402
from app.pipeline import filter_for  # noqa: E402
from app.sources import DemoSource, Frame  # noqa: E402
from app.tracker import Tracker, TrackerSettings  # noqa: E402
from tests import clip  # noqa: E402


def shared() -> Path:
    return Path(os.environ["XNORCAM_SHARED"]) if os.environ.get("XNORCAM_SHARED") else ROOT / ".." / "shared"


SECONDS_PER_PHOTO = 3.0


def footage(paths: list[Path], kind: str):
    """(index, 320x240 BGR frame) of the photos filmed as ``kind``."""
    if kind == "strip":
        yield from clip.pan([cv2.imread(str(p), cv2.IMREAD_COLOR) for p in paths])
        return
    per_photo = round(SECONDS_PER_PHOTO * clip.FPS)
    with tempfile.TemporaryDirectory() as tmp:
        for p in paths:
            os.symlink(p.resolve(), Path(tmp) / p.name)
        src = DemoSource(clip.WIDTH, clip.HEIGHT, fps=0, frames_per_photo=per_photo, directory=Path(tmp))
        with src:
            for i in range(per_photo * len(paths)):
                yield i, src.read()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=300, help="person-free photos in the strip (default 300)")
    ap.add_argument("--footage", choices=("demo", "strip"), default="demo", help="how the photos are filmed")
    ap.add_argument("--model", help="model file (default models/person.xnc)")
    ap.add_argument("--settings", default="1/1,3/5,5/7", help="confirmation settings N/M, comma separated")
    args = ap.parse_args(argv)
    folder = shared() / "datasets" / "negatives" / "coco_crops" / "images"
    if not folder.is_dir():
        print(f"SKIP: the person-free photos are absent ({folder}); nothing measured")
        return 0
    paths = sorted(folder.glob("*.jpg"))[: args.images]
    det = Detector(args.model)
    low = TrackerConfig().low_score
    keep = filter_for(det, (), {}, low)
    settings = [tuple(int(v) for v in s.split("/")) for s in args.settings.split(",")]
    runs = {}
    for n, m in settings:
        out: list[dict] = []
        runs[f"{n}/{m}"] = (Events(Tracker(TrackerSettings(confirm_hits=n, confirm_frames=m)), out.append,
                                   det.class_names), out)
    frames = reported = frames_with_box = 0
    for i, px in footage(paths, args.footage):
        high, weak = keep.split(det.detect(px))
        reported += len(high)
        frames_with_box += bool(len(high))
        frame = Frame(px, i, i / clip.FPS)
        for ev, _ in runs.values():
            ev.frame(frame, high, weak)
        frames = i + 1
    minutes = frames / clip.FPS / 60
    result = {"images": len(paths), "footage": args.footage, "frames": frames, "minutes": round(minutes, 2), "reported_boxes": reported,
              "frames_with_a_box": frames_with_box, "false_enter_events": {}}
    print(f"{len(paths)} person-free photos ({args.footage}), {frames} frames ({minutes:.1f} min at {clip.FPS:g} fps): "
          f"{reported} reported boxes on {frames_with_box} frames")
    for name, (ev, out) in runs.items():
        ev.close(frames / clip.FPS)
        enters = [e for e in out if e["event"] == "enter"]
        long = sum(1 for e in out if e["event"] == "leave" and e["duration_s"] >= 1.0)
        result["false_enter_events"][name] = len(enters)
        print(f"confirmation {name}: {len(enters)} false events ({len(enters) / minutes:.1f} a minute), "
              f"{long} of them lasting 1 s or more")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
