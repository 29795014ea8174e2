"""``python -m app eval``: COCO-style mAP of a model file through the runtime Detector (the exact Pi code).

    python -m app eval [--model FILE] [--data DIR] [--format yolo|voc|coco] [--class NAME] [--limit N] [--threshold T]

Without ``--data`` it evaluates the shipped model's held-out validation split from
the shared datasets folder: the whole scenes listed in models/person-split.txt
(capston2, fall and clinic scenes training never saw) plus all of coco_mini. It
prints mAP@0.5 and mAP@0.5:0.95 (pycocotools), precision and recall at the
model's default score threshold (or ``--threshold``), and as the LAST line one JSON object with the
keys map50, map50_95, images, precision, recall.

Only numpy, cv2 and app modules are imported here; pycocotools (a dev
dependency, not on the Pi) and the Detector are imported when used.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
# A low threshold gives COCO's AP the whole precision-recall curve; P/R use the model's own threshold.
EVAL_SCORE_THRESHOLD = 0.005
# The shipped model's held-out split: scenes listed by train.split, plus whole sources.
VALIDATION_SPLIT_FILE = Path(__file__).resolve().parents[1] / "models" / "person-split.txt"
VALIDATION_WHOLE = (("coco_mini", "coco"),)


class EvalDataError(ValueError):
    """The evaluation data cannot be read; the message names the file."""


@dataclass
class GroundTruth:
    image: Path
    boxes: np.ndarray  # (n,4) float64 x1,y1,x2,y2 in image pixels
    names: list  # class name per box


# ------------------------------------------------------------------ data


def shared_root() -> Path:
    env = os.environ.get("XNORCAM_SHARED")
    return Path(env) if env else (Path(__file__).resolve().parents[1] / ".." / "shared").resolve()


def detect_format(folder: Path) -> str:
    if (folder / "labels").is_dir() or (folder / "data.yaml").exists():
        return "yolo"
    ann = folder / "annotations"
    if ann.is_dir() and any(ann.glob("*.json")):
        return "coco"
    if (ann.is_dir() and any(ann.glob("*.xml"))) or any(folder.glob("*.xml")):
        return "voc"
    raise EvalDataError(
        f"{folder}: cannot tell the dataset format (no labels/, annotations/*.json or *.xml); pass --format"
    )


def _yaml_names(path: Path) -> list | None:
    """``names:`` of an Ultralytics data.yaml: inline list, block list, or ``index: name`` lines."""
    if not path.exists():
        return None
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if not line.startswith("names:"):
            continue
        rest = line[6:].split("#", 1)[0].strip()
        if rest.startswith("["):
            return [s.strip().strip("'\"") for s in rest.strip("[]").split(",") if s.strip()]
        listed, numbered = [], {}
        for ln, sub in enumerate(lines[i + 1 :], start=i + 2):
            if sub.strip() and not sub.startswith((" ", "\t")):
                break
            s = sub.split("#", 1)[0].strip()
            if s.startswith("- "):
                listed.append(s[2:].strip().strip("'\""))
            elif ":" in s:
                k, v = s.split(":", 1)
                try:
                    numbered[int(k)] = v.strip().strip("'\"")
                except ValueError:
                    raise EvalDataError(f"{path}:{ln}: bad names entry {s!r}") from None
        if listed:
            return listed
        if numbered:
            return [numbered.get(k, str(k)) for k in range(max(numbered) + 1)]
        return None
    return None


def _image_size(path: Path) -> tuple:
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise EvalDataError(f"{path}: cannot decode image")
    return img.shape[1], img.shape[0]


def load_yolo(folder: Path, only: set | None = None) -> list:
    """Every labelled image of a YOLO folder, or those whose file name is in ``only``."""
    names = _yaml_names(folder / "data.yaml")
    out = []
    img_dir = folder / "images"
    if not img_dir.is_dir():
        raise EvalDataError(f"{folder}: no images/ folder")
    for img in sorted(p for p in img_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        if only is not None and img.name not in only:
            continue
        lab = folder / "labels" / (img.stem + ".txt")
        boxes, cls = [], []
        if lab.exists():
            w, h = _image_size(img)
            for ln, line in enumerate(lab.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    c, cx, cy, bw, bh = line.split()
                    c, cx, cy, bw, bh = int(c), float(cx), float(cy), float(bw), float(bh)
                except ValueError:
                    raise EvalDataError(f"{lab}:{ln}: expected 'class cx cy w h', got {line.strip()!r}") from None
                boxes.append([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h])
                cls.append(names[c] if names and 0 <= c < len(names) else str(c))
        out.append(GroundTruth(img, np.asarray(boxes, np.float64).reshape(-1, 4), cls))
    return out


def load_voc(folder: Path) -> list:
    ann = folder / "annotations" if (folder / "annotations").is_dir() else folder
    out = []
    for xml in sorted(ann.glob("*.xml")):
        try:
            root = ET.parse(xml).getroot()
        except ET.ParseError as e:
            raise EvalDataError(f"{xml}: malformed XML ({e})") from None
        img = folder / "images" / (root.findtext("filename") or "").strip()
        if not img.is_file():
            cands = [folder / "images" / (xml.stem + s) for s in IMAGE_SUFFIXES]
            img = next((c for c in cands if c.is_file()), None)
            if img is None:
                raise EvalDataError(f"{xml}: its image is not in {folder / 'images'}")
        boxes, cls = [], []
        for k, obj in enumerate(root.iter("object"), 1):
            try:
                bb = obj.find("bndbox")
                boxes.append([float(bb.findtext(t)) for t in ("xmin", "ymin", "xmax", "ymax")])
            except (AttributeError, TypeError, ValueError):
                raise EvalDataError(f"{xml}: object {k}: bad <bndbox>") from None
            cls.append((obj.findtext("name") or "").strip())
        out.append(GroundTruth(img, np.asarray(boxes, np.float64).reshape(-1, 4), cls))
    return out


def load_coco(folder: Path) -> list:
    out = []
    jsons = sorted((folder / "annotations").glob("*.json")) if (folder / "annotations").is_dir() else []
    if not jsons:
        raise EvalDataError(f"{folder}: no annotations/*.json")
    for js in jsons:
        try:
            d = json.loads(js.read_text(encoding="utf-8"))
            cats = {c["id"]: c["name"] for c in d["categories"]}
            images = {im["id"]: im for im in d["images"]}
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise EvalDataError(f"{js}: not a COCO detection file ({e!r})") from None
        # instances_val2017.json -> val2017/ (COCO's own layout), else images/
        sub = js.stem.split("_", 1)[-1]
        img_dir = folder / sub if (folder / sub).is_dir() else folder / "images"
        per = {i: ([], []) for i in images}
        for a in d.get("annotations", []):
            if a.get("iscrowd", 0) or a["image_id"] not in per:
                continue
            x, y, w, h = a["bbox"]
            per[a["image_id"]][0].append([x, y, x + w, y + h])
            per[a["image_id"]][1].append(cats.get(a["category_id"], str(a["category_id"])))
        for iid in sorted(images):
            img = img_dir / images[iid]["file_name"]
            if not img.is_file():
                raise EvalDataError(f"{js}: image {img.name!r} not found in {img_dir}")
            b, c = per[iid]
            out.append(GroundTruth(img, np.asarray(b, np.float64).reshape(-1, 4), c))
    return out


LOADERS = {"yolo": load_yolo, "voc": load_voc, "coco": load_coco}


def load_dataset(folder, fmt: str | None = None) -> list:
    folder = Path(folder)
    if not folder.is_dir():
        raise EvalDataError(f"{folder}: no such dataset folder")
    return LOADERS[fmt or detect_format(folder)](folder)


def read_split_file(path) -> list:
    """(line number, "val" | "drop", image path relative to the datasets root) per entry of a train.split file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise EvalDataError(f"{path}: {e.strerror}") from None
    out = []
    for ln, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        kind, _, rel = line.partition(" ")
        if kind not in ("val", "drop") or not rel.strip():
            raise EvalDataError(f"{path}:{ln}: expected 'val PATH' or 'drop PATH', got {line!r}")
        out.append((ln, kind, rel.strip()))
    return out


def split_images(kind: str, split_file=None) -> list:
    """GroundTruth of the split file's images of one kind: "val" (held out) or "drop" (used by neither side)."""
    split_file = VALIDATION_SPLIT_FILE if split_file is None else split_file
    root = shared_root() / "datasets"
    per_folder: dict = {}
    for ln, k, rel in read_split_file(split_file):
        if k != kind:
            continue
        folder, sep, name = rel.rpartition("/images/")
        if not sep:
            raise EvalDataError(f"{split_file}:{ln}: expected '{kind} SOURCE/images/NAME', got {rel!r}")
        per_folder.setdefault(folder, set()).add(name)
    out = []
    for folder, names in sorted(per_folder.items()):
        found = load_yolo(root / folder, only=names)
        if len(found) != len(names):
            word = {"val": "held-out", "drop": "dropped"}.get(kind, kind)
            raise EvalDataError(f"{root / folder}: {len(names) - len(found)} {word} images listed but missing")
        out += found
    return out


def validation_split() -> list:
    root = shared_root() / "datasets"
    if not root.is_dir():
        raise EvalDataError(
            f"no --data given and the shared datasets ({root}) are absent: pass --data DIR [--format yolo|voc|coco]"
        )
    out = split_images("val")
    for sub, fmt in VALIDATION_WHOLE:
        out += load_dataset(root / sub, fmt)
    return out


# ------------------------------------------------------------------ metrics


def coco_metrics(gts: list, dets: list, num_classes: int, shapes: list) -> dict:
    """mAP@0.5 and mAP@0.5:0.95 with pycocotools.

    gts: per image (boxes (n,4) xyxy px, classes (n,) int); dets: per image float32 (N,6);
    shapes: per image (h, w). Returns map50, map50_95 and the 101-point PR curve at IoU 0.5.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, anns, results = [], [], []
    for i, ((boxes, classes), (h, w)) in enumerate(zip(gts, shapes, strict=True)):
        images.append({"id": i, "width": int(w), "height": int(h)})
        for b, c in zip(np.asarray(boxes, np.float64).reshape(-1, 4), classes, strict=True):
            bw, bh = float(b[2] - b[0]), float(b[3] - b[1])
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i,
                    "category_id": int(c) + 1,
                    "iscrowd": 0,
                    "bbox": [float(b[0]), float(b[1]), bw, bh],
                    "area": bw * bh,
                }
            )
        for d in np.asarray(dets[i], np.float64).reshape(-1, 6):
            results.append(
                {
                    "image_id": i,
                    "category_id": int(d[5]) + 1,
                    "score": float(d[4]),
                    "bbox": [float(d[0]), float(d[1]), float(d[2] - d[0]), float(d[3] - d[1])],
                }
            )
    empty = {"map50": 0.0, "map50_95": 0.0, "pr_recall": np.linspace(0, 1, 101), "pr_precision": np.zeros(101)}
    if not anns or not results:
        return empty
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {
            "images": images,
            "annotations": anns,
            "categories": [{"id": k + 1, "name": str(k)} for k in range(num_classes)],
        }
        gt.createIndex()
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    prec = ev.eval["precision"][0, :, :, 0, -1]  # IoU 0.5, all recalls, classes, area all, 100 dets
    valid = prec > -1
    curve = np.where(valid, prec, 0).sum(1) / np.maximum(valid.sum(1), 1)
    return {
        "map50": max(0.0, float(ev.stats[1])),
        "map50_95": max(0.0, float(ev.stats[0])),
        "pr_recall": np.linspace(0, 1, 101),
        "pr_precision": curve,
    }


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    iw = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    ih = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = iw * ih
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    union = area(a)[:, None] + area(b)[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0)


def _match(boxes, classes, d, score_threshold: float, iou: float) -> tuple:
    """Greedy one-to-one matching (by score) of one image: (labels matched mask, false positives)."""
    boxes, classes = np.asarray(boxes, np.float64).reshape(-1, 4), np.asarray(classes)
    d = np.asarray(d, np.float64).reshape(-1, 6)
    d = d[d[:, 4] >= score_threshold]
    d = d[np.argsort(-d[:, 4], kind="stable")]
    used = np.zeros(len(boxes), bool)
    ious = _iou(d[:, :4], boxes) if len(d) and len(boxes) else np.zeros((len(d), len(boxes)))
    fp = 0
    for k in range(len(d)):
        cand = np.where(~used & (classes == d[k, 5]), ious[k], -1.0) if len(boxes) else np.zeros(0)
        j = int(np.argmax(cand)) if cand.size else -1
        if j >= 0 and cand[j] >= iou:
            used[j] = True
        else:
            fp += 1
    return used, fp


def match_counts(gts: list, dets: list, thresholds, iou: float = 0.5) -> np.ndarray:
    """Per image and threshold: (true positives, false positives, labels), shape (images, thresholds, 3).

    Kept per image so that callers can resample images (a bootstrap) without matching again.
    """
    out = np.zeros((len(gts), len(thresholds), 3), np.int64)
    for i, ((boxes, classes), d) in enumerate(zip(gts, dets, strict=True)):
        for j, t in enumerate(thresholds):
            used, f = _match(boxes, classes, d, float(t), iou)
            out[i, j] = used.sum(), f, len(used)
    return out


def precision_recall(gts: list, dets: list, score_threshold: float, iou: float = 0.5) -> tuple:
    """Precision and recall of the detections above ``score_threshold``, matched one-to-one at ``iou``."""
    tp, fp, n_gt = (int(v) for v in match_counts(gts, dets, [score_threshold], iou).sum(0)[0])
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / n_gt if n_gt else 0.0
    return precision, recall


def frames_found(gts: list, dets: list, score_threshold: float, iou: float = 0.5) -> float:
    """Share of the frames with labels in which EVERY labelled object is boxed: the camera's view of recall."""
    n = found = 0
    for (boxes, classes), d in zip(gts, dets, strict=True):
        used, _ = _match(boxes, classes, d, score_threshold, iou)
        if len(used):
            n += 1
            found += bool(used.all())
    return found / n if n else 0.0


def stands(box_w, box_h, frame_h) -> bool:
    """A box of a standing person, as "upright" counts it: taller than wide and at least a quarter of the frame tall."""
    return bool(box_h >= max(box_w, frame_h / 4))


def upright_found(gts: list, dets: list, shapes: list, score_threshold: float, iou: float = 0.5) -> tuple:
    """(share boxed, frames) over frames of ONE labelled object standing up (taller than wide) and at
    least a quarter of the frame tall: the issue's "a person walking through a room", as labels can say it.
    """
    n = found = 0
    for (boxes, classes), d, (h, _) in zip(gts, dets, shapes, strict=True):
        b = np.asarray(boxes, np.float64).reshape(-1, 4)
        if len(b) != 1 or not stands(b[0, 2] - b[0, 0], b[0, 3] - b[0, 1], h):
            continue
        used, _ = _match(boxes, classes, d, score_threshold, iou)
        n += 1
        found += bool(used.all())
    return (found / n if n else 0.0), n


def evaluate(
    detect,
    samples: list,
    class_names,
    score_threshold: float,
    limit: int = 0,
    progress=None,
    only: str | None = None,
    group_by=None,
) -> dict:
    """Run ``detect(image) -> (N,6)`` over GroundTruth samples; boxes of classes the model lacks are ignored.

    ``only``: score one class name (its labels and detections alone). ``group_by``: a key function of a
    sample; each key's samples are also scored on their own, under ``m["groups"][key]``.
    """
    index = {n: i for i, n in enumerate(class_names) if only is None or n == only}
    samples = samples[:limit] if limit else samples
    gts, dets, shapes = [], [], []
    for s in progress(samples) if progress else samples:
        img = cv2.imread(str(s.image), cv2.IMREAD_COLOR)
        if img is None:
            raise EvalDataError(f"{s.image}: cannot decode image")
        keep = [k for k, n in enumerate(s.names) if n in index]
        gts.append((s.boxes[keep], np.array([index[s.names[k]] for k in keep], np.int64)))
        d = np.asarray(detect(img), np.float32).reshape(-1, 6)
        dets.append(d[np.isin(d[:, 5], list(index.values()))])
        shapes.append(img.shape[:2])

    def score(sel):
        g, d, sh = [gts[i] for i in sel], [dets[i] for i in sel], [shapes[i] for i in sel]
        m = coco_metrics(g, d, len(class_names), sh)
        m["precision"], m["recall"] = precision_recall(g, d, score_threshold)
        m.update(images=len(sel), boxes=int(sum(len(x[0]) for x in g)), frames_found=frames_found(g, d, score_threshold))
        m["upright_found"], m["upright_frames"] = upright_found(g, d, sh, score_threshold)
        return m

    m = score(range(len(samples)))
    members: dict = {}
    for i, s in enumerate(samples if group_by else ()):
        members.setdefault(group_by(s), []).append(i)
    m["groups"] = {key: score(sel) for key, sel in sorted(members.items())}
    return m


def source_of(sample: GroundTruth) -> str:
    """The dataset folder an image came from (``person/fall``, ``coco_mini``...), for per-source scores.

    Every loader here keeps images one folder below their dataset (``images/``, ``train2017/``...).
    """
    folder = sample.image.parent.parent
    try:
        return folder.relative_to(shared_root() / "datasets").as_posix()
    except ValueError:
        return folder.name


# ------------------------------------------------------------------ CLI


REPORT_KEYS = ("map50", "map50_95", "images", "precision", "recall", "boxes", "frames_found", "upright_found",
               "upright_frames")


def print_report(m: dict, threshold: float) -> dict:
    """Print evaluate()'s metrics the way ``python -m app eval`` does; the last line is one JSON object."""
    print(f"mAP@0.5      {m['map50']:.4f}")
    print(f"mAP@0.5:0.95 {m['map50_95']:.4f}")
    print(f"precision    {m['precision']:.4f}  recall {m['recall']:.4f}  (score >= {threshold:g}, IoU 0.5)")
    print(f"frames with every labelled object boxed: {m['frames_found']:.1%}")
    print(f"frames of one upright object >= 1/4 of the frame tall, boxed: {m['upright_found']:.1%} "
          f"of {m['upright_frames']}")
    for name, g in m.get("groups", {}).items():
        print(
            f"  {name:<16} {g['images']:>4} images  mAP@0.5 {g['map50']:.3f}  mAP@0.5:0.95 {g['map50_95']:.3f}  "
            f"P {g['precision']:.3f}  R {g['recall']:.3f}  all boxed {g['frames_found']:.1%}  "
            f"upright {g['upright_found']:.1%} of {g['upright_frames']}"
        )
    out = {k: m[k] for k in REPORT_KEYS}
    out["score_threshold"] = threshold
    print(json.dumps(out))
    return out


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m app eval", description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="model file (default: the shipped models/person.xnc)")
    ap.add_argument("--data", help="dataset folder (default: the held-out validation split in ../shared)")
    ap.add_argument("--format", choices=sorted(LOADERS), help="dataset format (default: detected)")
    ap.add_argument("--class", dest="cls", help="evaluate only this class name (default: all of the model's classes)")
    ap.add_argument("--limit", type=int, default=0, help="evaluate at most N images")
    ap.add_argument(
        "--threshold",
        type=float,
        help="score threshold for precision, recall and the found-frame shares (default: the model's own); "
        "mAP is unaffected",
    )
    return ap


def main(argv=None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    if args.limit < 0:
        print("--limit must be >= 0", file=sys.stderr)
        return 2
    if args.threshold is not None and not EVAL_SCORE_THRESHOLD <= args.threshold <= 1.0:
        print(f"--threshold must be in [{EVAL_SCORE_THRESHOLD}, 1] (got {args.threshold})", file=sys.stderr)
        return 2
    from app.detector import Detector
    from app.modelfile import ModelFormatError

    try:
        det = Detector(args.model, score_threshold=EVAL_SCORE_THRESHOLD)
    except ModelFormatError as e:
        print(f"model refused: {e}", file=sys.stderr)
        return 65
    except OSError as e:
        print(f"cannot load the model: {e}", file=sys.stderr)
        return 1
    names = list(det.class_names)
    threshold = float(det.model.score_threshold) if args.threshold is None else args.threshold
    try:
        samples = load_dataset(args.data, args.format) if args.data else validation_split()
    except EvalDataError as e:
        print(f"evaluation data: {e}", file=sys.stderr)
        return 2 if not args.data else 1
    if args.cls:
        if args.cls not in names:
            print(f"--class {args.cls!r} is not one of the model's classes {names}", file=sys.stderr)
            return 2
    data = args.data or "validation split (models/person-split.txt scenes + coco_mini)"
    print(f"model: {args.model or 'default'}  data: {data}  images: {len(samples[: args.limit or None])}")
    try:
        # The default split is also scored per source, since they differ so much.
        group_by = None if args.data else source_of
        m = evaluate(det.detect, samples, names, threshold, args.limit, only=args.cls, group_by=group_by)
    except EvalDataError as e:
        print(f"evaluation data: {e}", file=sys.stderr)
        return 1
    print_report(m, threshold)
    return 0


if __name__ == "__main__":
    sys.exit(main())
