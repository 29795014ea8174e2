"""The one reader of detection datasets (YOLO txt, PASCAL VOC xml, COCO json), and the held-out split.

Every loader returns :class:`Sample` s: the image path, its boxes as normalised
``x1, y1, x2, y2`` in 0..1 of the image, and the class NAME of every box, as the
dataset names it (data.yaml ``names``, VOC ``<name>``, COCO categories). A
caller keeps the classes it knows by name (:meth:`Sample.select`), so labels of
other classes count as background.

A malformed label raises :class:`LabelError` naming the file (and line). With
``stop=False`` the image is skipped and the message kept in a
:class:`LoadReport` instead, so a bad file never stops a training epoch half way;
evaluation stops at the first one, since a score over silently skipped images
would be a different score.

Only numpy, cv2 and app.limits are imported: the trainer reads its data through
here, and nothing here needs torch.
"""

from __future__ import annotations

import json
import math
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from app.limits import json_too_deep
from app.sources import imread

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
FORMATS = ("yolo", "voc", "coco")
# Normalised coordinates a hair outside 0..1 are rounding in the exporter, not errors.
_EDGE_TOLERANCE = 0.01

REPO = Path(__file__).resolve().parents[1]
# The shipped model's held-out split: scenes and blocks listed by train.split, plus whole sources.
VALIDATION_SPLIT_FILE = REPO / "models" / "person-split.txt"
VALIDATION_WHOLE = (("coco_mini", "coco"),)


class DataError(ValueError):
    """Data that cannot be read; the message names the file."""


class LabelError(DataError):
    """One malformed label: the message names the file (and line) and what is wrong."""


def shared_root() -> Path:
    """``$XNORCAM_SHARED``, or ``shared/`` beside the repository (datasets, the ARM meter)."""
    env = os.environ.get("XNORCAM_SHARED")
    return Path(env) if env else (REPO / ".." / "shared").resolve()


@dataclass(frozen=True)
class Sample:
    image: Path
    boxes: np.ndarray  # (N,4) float32 normalised x1,y1,x2,y2
    names: tuple  # class name of every box
    source: str = ""
    mask: Path | None = None  # YOLO masks/NAME.png: one instance id per pixel (copy-paste cut-outs)

    def select(self, classes) -> tuple:
        """(boxes (n,4), indices (n,) int64 into ``classes``) of the boxes whose class is one of ``classes``."""
        classes = list(classes)
        keep = [k for k, n in enumerate(self.names) if n in classes]
        return self.boxes[keep], np.array([classes.index(self.names[k]) for k in keep], np.int64)


@dataclass
class LoadReport:
    problems: list = field(default_factory=list)

    def add(self, msg: str):
        self.problems.append(msg)


def _finish_box(x1, y1, x2, y2, where: str):
    vals = (x1, y1, x2, y2)
    if not all(math.isfinite(v) for v in vals):
        raise LabelError(f"{where}: non-finite coordinate in {vals}")
    t = _EDGE_TOLERANCE
    if min(vals) < -t or max(vals) > 1 + t:
        raise LabelError(f"{where}: box {tuple(round(v, 4) for v in vals)} lies outside the image")
    x1, y1, x2, y2 = (min(max(v, 0.0), 1.0) for v in vals)
    if x2 <= x1 or y2 <= y1:
        raise LabelError(f"{where}: box has no area ({x1:.4f},{y1:.4f},{x2:.4f},{y2:.4f})")
    return x1, y1, x2, y2


# Far beyond any real image (COCO's busiest has a few hundred): matching a million boxes ran for minutes
# in gigabytes.
MAX_BOXES_PER_IMAGE = 10_000


def _regular(path: Path) -> Path:
    """``path``, unless it exists and is not a regular file: a FIFO blocks the read for good, a device never
    ends."""
    import stat

    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return path
    except OSError as exc:
        raise LabelError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if not stat.S_ISREG(mode):
        raise LabelError(f"{path}: not a regular file (a FIFO, device or directory cannot be read as data)")
    return path


def _sample(img, boxes, names, source, mask=None) -> Sample:
    if len(boxes) > MAX_BOXES_PER_IMAGE:
        raise LabelError(f"{img}: {len(boxes)} labelled boxes, more than any image holds "
                         f"(at most {MAX_BOXES_PER_IMAGE})")
    return Sample(Path(img), np.asarray(boxes, dtype=np.float32).reshape(-1, 4), tuple(names), source, mask)


def _what(exc: Exception) -> str:
    """A malformed entry in words: a missing key names the key."""
    if isinstance(exc, KeyError):
        return f"missing {exc.args[0]!r}"
    return f"malformed entry ({exc})"


def _problem(exc: Exception, report: LoadReport, stop: bool):
    if stop:
        raise LabelError(str(exc)) from None
    report.add(str(exc))


def parse_yaml_names(path: Path) -> list:
    """The ``names:`` of an Ultralytics data.yaml (dict form ``0: person``, block list, or inline list)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise LabelError(f"{path}: cannot read ({exc})") from None
    for i, line in enumerate(lines):
        stripped = line.split("#", 1)[0].rstrip()
        if not stripped.startswith("names:"):
            continue
        rest = stripped[len("names:") :].strip()
        if rest.startswith("["):
            return [s.strip().strip("'\"") for s in rest.strip("[]").split(",") if s.strip()]
        if rest.startswith("{"):  # the mapping inline: names: {0: person, 1: car}
            if not rest.endswith("}"):
                raise LabelError(f"{path}:{i + 1}: names mapping is not closed on its line: {rest!r}")
            inline: dict = {}
            for item in filter(str.strip, rest[1:-1].split(",")):
                k, _, v = item.partition(":")
                v = v.strip().strip("'\"")
                try:
                    inline[int(k.strip().strip("'\""))] = v
                except ValueError:
                    v = ""
                if not v:
                    raise LabelError(f"{path}:{i + 1}: bad names entry {item.strip()!r} (expected ID: NAME)")
            if not inline:
                raise LabelError(f"{path}:{i + 1}: names mapping is empty")
            return _names_from_ids(path, inline)
        names: dict = {}
        listed = []
        for j, sub in enumerate(lines[i + 1 :], start=i + 2):
            s = sub.split("#", 1)[0].rstrip()
            if not s.strip():
                continue
            if not s.startswith((" ", "\t")):
                break
            s = s.strip()
            if s.startswith("- "):
                listed.append(s[2:].strip().strip("'\""))
            elif ":" in s:
                k, v = s.split(":", 1)
                try:
                    names[int(k)] = v.strip().strip("'\"")
                except ValueError:
                    raise LabelError(f"{path}:{j}: bad names entry {s!r}") from None
        if listed:
            return listed
        if names:
            return _names_from_ids(path, names)
        break
    raise LabelError(f"{path}: no 'names:' list found")


def _names_from_ids(path: Path, names: dict) -> list:
    if min(names) < 0 or max(names) >= 10000:
        raise LabelError(f"{path}: class ids {min(names)}..{max(names)} are not 0..9999")
    return [names.get(k, f"class{k}") for k in range(max(names) + 1)]


def _find_image(folder: Path, stem: str) -> Path | None:
    for suf in IMAGE_SUFFIXES:
        p = folder / (stem + suf)
        if p.is_file():
            return p
    return None


def load_yolo(folder, source: str = "", report: LoadReport | None = None, stop: bool = True, masks: bool = False,
              only: set | None = None, names: list | None = None) -> list:
    """``images/NAME`` with ``labels/NAME.txt`` (``class cx cy w h`` normalised; no file or an empty one = no
    objects). ``only``: read just the images whose file names are in it. ``names``: the class names of the ids
    when the folder has no data.yaml (without either, a box's class is its id as text, "0")."""
    report = report if report is not None else LoadReport()
    folder = Path(folder)
    yaml = folder / "data.yaml"
    names = parse_yaml_names(_regular(yaml)) if yaml.exists() else (list(names) if names is not None else None)
    img_dir, lab_dir = folder / "images", folder / "labels"
    if not img_dir.is_dir():
        raise LabelError(f"{folder}: no images/ folder")
    out = []
    # Regular files only: a FIFO named x.jpg would block the decoder for good.
    images = sorted(p for p in img_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if only is None:
        label_stems = {p.stem for p in lab_dir.glob("*.txt")} if lab_dir.is_dir() else set()
        for stem in sorted(label_stems - {p.stem for p in images}):
            _problem(LabelError(f"{lab_dir / (stem + '.txt')}: label has no image in {img_dir}"), report, stop)
    else:
        images = [p for p in images if p.name in only]
    for img in images:
        lab = lab_dir / (img.stem + ".txt")
        try:
            boxes, classes = [], []
            if lab.exists():
                text = _regular(lab).read_text(encoding="utf-8", errors="replace")
                for ln, line in enumerate(text.splitlines(), 1):
                    if not line.strip():
                        continue
                    where = f"{lab}:{ln}"
                    parts = line.split()
                    if len(parts) != 5:
                        raise LabelError(f"{where}: expected 'class cx cy w h', got {line.strip()!r}")
                    try:
                        cls = int(parts[0])
                        cx, cy, w, h = (float(v) for v in parts[1:])
                    except ValueError:
                        raise LabelError(f"{where}: bad number in {line.strip()!r}") from None
                    if names is not None and not 0 <= cls < len(names):
                        raise LabelError(f"{where}: unknown class {cls} ({'data.yaml' if yaml.exists() else 'the model'}"
                                         f" names {len(names)} classes)")
                    if w <= 0 or h <= 0:
                        raise LabelError(f"{where}: box width/height must be > 0, got {w}, {h}")
                    boxes.append(_finish_box(cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2, where))
                    classes.append(names[cls] if names is not None else str(cls))
            mask = None
            if masks:
                m = folder / "masks" / (img.stem + ".png")
                mask = m if m.exists() else None
            out.append(_sample(img, boxes, classes, source, mask))
        except (LabelError, OSError) as exc:
            _problem(exc, report, stop)
    return out


def load_voc(folder, source: str = "", report: LoadReport | None = None, stop: bool = True) -> list:
    """``annotations/*.xml`` (or ``*.xml`` in the folder) beside ``images/``."""
    report = report if report is not None else LoadReport()
    folder = Path(folder)
    ann_dir = folder / "annotations" if (folder / "annotations").is_dir() else folder
    img_dir = folder / "images"
    out = []
    for xml in sorted(ann_dir.glob("*.xml")):
        try:
            try:
                root = ET.parse(_regular(xml)).getroot()
            except ET.ParseError as exc:
                raise LabelError(f"{xml}:{exc.position[0]}: malformed XML ({exc})") from None
            fname = (root.findtext("filename") or "").strip()
            img = img_dir / fname if fname else None
            if img is None or not img.exists():
                img = _find_image(img_dir, xml.stem)
            if img is None:
                raise LabelError(f"{xml}: image {fname or xml.stem!r} not found in {img_dir}")
            try:
                w = float(root.findtext("size/width") or 0)
                h = float(root.findtext("size/height") or 0)
            except ValueError:
                raise LabelError(f"{xml}: bad <size>") from None
            if w <= 0 or h <= 0:
                shape = imread(img, cv2.IMREAD_GRAYSCALE)
                if shape is None:
                    raise LabelError(f"{img}: cannot decode image")
                h, w = shape.shape[:2]
            boxes, classes = [], []
            for k, obj in enumerate(root.iter("object"), 1):
                where = f"{xml}: object {k}"
                name = (obj.findtext("name") or "").strip()
                if not name:
                    raise LabelError(f"{where}: missing <name>")
                bb = obj.find("bndbox")
                if bb is None:
                    raise LabelError(f"{where}: missing <bndbox>")
                try:
                    x1, y1, x2, y2 = (float(bb.findtext(t)) for t in ("xmin", "ymin", "xmax", "ymax"))
                except (TypeError, ValueError):
                    raise LabelError(f"{where}: bad number in <bndbox>") from None
                boxes.append(_finish_box(x1 / w, y1 / h, x2 / w, y2 / h, where))
                classes.append(name)
            out.append(_sample(img, boxes, classes, source))
        except (LabelError, OSError) as exc:
            _problem(exc, report, stop)
    return out


def load_coco(json_path, img_dir, source: str = "", report: LoadReport | None = None, stop: bool = True) -> list:
    """One COCO detection json and its image folder. Crowd regions are skipped: neither objects to find nor
    background to punish. An image with a malformed annotation is left out whole."""
    report = report if report is not None else LoadReport()
    json_path, img_dir = Path(json_path), Path(img_dir)
    try:
        text = _regular(json_path).read_bytes()
        deep = json_too_deep(text)  # json.loads recurses once per level: refuse before the stack runs out
        if deep:
            raise LabelError(f"{json_path}: not a COCO detection file: {deep}")
        d = json.loads(text.decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LabelError(f"{json_path}: cannot read COCO json ({exc})") from None
    except RecursionError:
        raise LabelError(f"{json_path}: not a COCO detection file: JSON nested too deeply to read") from None
    if not isinstance(d, dict):
        raise LabelError(f"{json_path}: not a COCO detection file (the top level is a {type(d).__name__}, "
                         "not an object)")
    for key in ("categories", "images"):
        if not isinstance(d.get(key), list):
            raise LabelError(f"{json_path}: not a COCO detection file (no {key!r} list)")
    anns = d.get("annotations", [])
    if not isinstance(anns, list):
        raise LabelError(f"{json_path}: not a COCO detection file ('annotations' is not a list)")
    cats: dict = {}
    for k, c in enumerate(d["categories"]):
        try:
            cats[int(c["id"])] = str(c["name"])
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise LabelError(f"{json_path}: categories[{k}]: {_what(exc)}") from None
    images: dict = {}
    for k, im in enumerate(d["images"]):
        where = f"{json_path}: images[{k}]"
        try:
            iid = int(im["id"])
            name = im["file_name"]
            if not isinstance(name, str) or not name or "/" in name.replace(os.sep, "/") or "\0" in name:
                raise LabelError(f"{where}: file_name {name!r} is not a file name")
            iw, ih = float(im["width"]), float(im["height"])
            if not (math.isfinite(iw) and math.isfinite(ih) and iw > 0 and ih > 0):
                raise LabelError(f"{where}: width and height must be > 0, got {im['width']!r}, {im['height']!r}")
            images[iid] = im
        except (LabelError, KeyError, TypeError, ValueError, OverflowError) as exc:
            # an image entry that cannot be used: its annotations are dropped with it (unknown image_id)
            _problem(exc if isinstance(exc, LabelError) else LabelError(f"{where}: {_what(exc)}"), report, stop)
    per_image: dict = {i: ([], []) for i in images}
    bad_images: set = set()
    for k, a in enumerate(anns):
        where = f"{json_path}: annotations[{k}]"
        try:
            iid = int(a["image_id"])
            if iid not in images:
                raise LabelError(f"{where}: unknown image_id {iid}")
            cid = int(a["category_id"])
            if cid not in cats:
                raise LabelError(f"{where}: unknown category_id {cid}")
            bbox = a["bbox"]
            if not isinstance(bbox, list) or len(bbox) != 4:
                raise LabelError(f"{where}: bbox {bbox!r} is not [x, y, width, height]")
            x, y, w, h = (float(v) for v in bbox)
            if not all(math.isfinite(v) for v in (x, y, w, h)):
                raise LabelError(f"{where}: non-finite number in bbox {bbox!r}")
            if w <= 0 or h <= 0:
                raise LabelError(f"{where}: bbox width/height must be > 0, got {w}, {h}")
            iw, ih = float(images[iid]["width"]), float(images[iid]["height"])
            box = _finish_box(x / iw, y / ih, (x + w) / iw, (y + h) / ih, where)
            if a.get("iscrowd", 0):
                continue
            per_image[iid][0].append(box)
            per_image[iid][1].append(cats[cid])
        except (LabelError, KeyError, TypeError, ValueError, OverflowError) as exc:
            msg = str(exc) if isinstance(exc, LabelError) else f"{where}: {_what(exc)}"
            _problem(LabelError(msg), report, stop)
            if isinstance(a, dict) and isinstance(a.get("image_id"), int):
                bad_images.add(a["image_id"])  # a half-labelled image would teach that its missing object is background
    out = []
    for iid in sorted(images):
        if iid in bad_images:
            continue
        img = img_dir / str(images[iid].get("file_name", ""))
        if not img.is_file():
            _problem(LabelError(f"{json_path}: image {img.name!r} (id {iid}) not found in {img_dir}"), report, stop)
            continue
        out.append(_sample(img, *per_image[iid], source))
    return out


def coco_layout(folder) -> list:
    """(json, image folder) pairs of a COCO folder: ``annotations/instances_val2017.json`` reads ``val2017/``
    (COCO's own layout), any other json ``images/``."""
    folder = Path(folder)
    jsons = sorted((folder / "annotations").glob("*.json")) if (folder / "annotations").is_dir() else []
    if not jsons:
        raise DataError(f"{folder}: no annotations/*.json")
    pairs = []
    for js in jsons:
        sub = js.stem.split("_", 1)[-1]
        pairs.append((js, folder / sub if (folder / sub).is_dir() else folder / "images"))
    return pairs


def detect_format(folder: Path) -> str:
    folder = Path(folder)
    if (folder / "labels").is_dir() or (folder / "data.yaml").exists():
        return "yolo"
    ann = folder / "annotations"
    if ann.is_dir() and any(ann.glob("*.json")):
        return "coco"
    if (ann.is_dir() and any(ann.glob("*.xml"))) or any(folder.glob("*.xml")):
        return "voc"
    raise DataError(f"{folder}: cannot tell the dataset format (no labels/, annotations/*.json or *.xml); pass --format")


def load_dataset(folder, fmt: str | None = None, source: str = "", report: LoadReport | None = None,
                 stop: bool = True, names: list | None = None) -> list:
    """Every image of one dataset folder, its format detected unless ``fmt`` names it. ``names``: the class names
    of a YOLO folder's ids when it has no data.yaml."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such dataset folder")
    fmt = fmt or detect_format(folder)
    if fmt not in FORMATS:
        raise DataError(f"{folder}: unknown format {fmt!r} (one of {FORMATS})")
    if fmt == "yolo":
        return load_yolo(folder, source, report, stop, names=names)
    if fmt == "voc":
        return load_voc(folder, source, report, stop)
    return [s for js, imgs in coco_layout(folder) for s in load_coco(js, imgs, source, report, stop)]


# ------------------------------------------------------------------ the held-out split


def read_split_file(path) -> list:
    """(line number, "val" | "drop", image path relative to the datasets root) per entry of a train.split file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise DataError(f"{path}: {e.strerror}") from None
    out = []
    for ln, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        kind, _, rel = line.partition(" ")
        if kind not in ("val", "drop") or not rel.strip():
            raise DataError(f"{path}:{ln}: expected 'val PATH' or 'drop PATH', got {line!r}")
        out.append((ln, kind, rel.strip()))
    return out


def split_images(kind: str, split_file=None) -> list:
    """The split file's images of one kind: "val" (held out) or "drop" (used by neither side)."""
    split_file = VALIDATION_SPLIT_FILE if split_file is None else split_file
    root = shared_root() / "datasets"
    per_folder: dict = {}
    for ln, k, rel in read_split_file(split_file):
        if k != kind:
            continue
        folder, sep, name = rel.rpartition("/images/")
        if not sep:
            raise DataError(f"{split_file}:{ln}: expected '{kind} SOURCE/images/NAME', got {rel!r}")
        per_folder.setdefault(folder, set()).add(name)
    out = []
    for folder, names in sorted(per_folder.items()):
        found = load_yolo(root / folder, folder, only=names)
        if len(found) != len(names):
            word = {"val": "held-out", "drop": "dropped"}.get(kind, kind)
            raise DataError(f"{root / folder}: {len(names) - len(found)} {word} images listed but missing")
        out += found
    return out


def validation_split() -> list:
    """The shipped model's held-out images: the split file's "val" entries and every image of the whole sources."""
    root = shared_root() / "datasets"
    if not root.is_dir():
        raise DataError(
            f"no --data given and the shared datasets ({root}) are absent: pass --data DIR [--format yolo|voc|coco]"
        )
    out = split_images("val")
    for sub, fmt in VALIDATION_WHOLE:
        out += load_dataset(root / sub, fmt, sub)
    return out


def source_of(sample: Sample) -> str:
    """The dataset folder an image came from (``person/fall``, ``coco_mini``...), for per-source scores.

    Every loader here keeps images one folder below their dataset (``images/``, ``train2017/``...).
    """
    folder = sample.image.parent.parent
    try:
        return folder.relative_to(shared_root() / "datasets").as_posix()
    except ValueError:
        return folder.name
