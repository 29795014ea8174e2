"""The training data: its strict config, the sources of each split, the in-RAM image cache and its packed form.

The datasets themselves (YOLO txt, PASCAL VOC xml, COCO json) are read by
:mod:`evaluation.datasets`, the one reader the evaluation uses too. Classes are
matched by NAME; labels of other classes are dropped, so their objects count as
background. A malformed label raises ``LabelError`` naming the file and line;
with ``on_error = "skip"`` the image is skipped and the message kept in a
report instead, so a bad file never stops an epoch half way.
"""

from __future__ import annotations

import hashlib
import math
import os
import tomllib
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import cv2
import numpy as np

from evaluation.datasets import (
    FORMATS,
    DataError,
    LabelError,
    LoadReport,
    Sample,
    load_coco,
    load_voc,
    load_yolo,
    shared_root,
)
from evaluation.datasets import read_split_file as split_entries


class ConfigError(ValueError):
    """A training/dataset config that cannot be used."""


# ------------------------------------------------------------------ config


def strict(cls, data: dict, where: str):
    """Build frozen dataclass ``cls`` from ``data``, rejecting unknown keys and values of the wrong type by name."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a table, got {type(data).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(known)}")
    kinds = typing.get_type_hints(cls)
    for key, value in data.items():
        if not fits(value, kinds[key]):
            raise ConfigError(f"{where}.{key} must be {KIND_NAMES.get(kinds[key], kinds[key])}, got {value!r}")
    try:
        return cls(**data)
    except (TypeError, ValueError) as exc:  # a missing key, or a value out of range (__post_init__)
        raise ConfigError(f"{where}: {exc}") from None


KIND_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", tuple: "a list",
              dict: "a table"}


def fits(value, kind) -> bool:
    """Whether a TOML value can stand for a config field of type ``kind`` (an integer for a float too)."""
    if kind is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is tuple:
        return isinstance(value, list | tuple)
    return not isinstance(kind, type) or isinstance(value, kind)


@dataclass(frozen=True)
class SourceConfig:
    name: str
    path: str  # relative to the data root, or absolute
    format: str
    split: str = "train"  # "train", "val", or "scenes" (held-out scenes listed in data.split_file)
    annotations: str = ""  # COCO: json file(s), relative to path; "a.json,b.json" allowed
    images: str = ""  # COCO: image folder(s) matching annotations, comma separated
    masks: bool = False  # YOLO: masks/NAME.png instance masks for copy-paste
    limit: int = 0  # keep at most this many images (0 = all), for smoke runs
    group: str = ""  # the data.mix group its training images are drawn in ("" = the source's own name)

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ConfigError(f"source {self.name!r}: format must be one of {FORMATS}, got {self.format!r}")
        if self.split not in ("train", "val", "scenes"):
            raise ConfigError(f"source {self.name!r}: split must be 'train', 'val' or 'scenes', got {self.split!r}")


@dataclass(frozen=True)
class DataConfig:
    classes: tuple
    sources: tuple
    root: str = "auto"  # "auto": $XNORCAM_SHARED/datasets or <repo>/../shared/datasets
    on_error: str = "skip"  # "skip" or "stop"
    cache_long_side: int = 224
    cache_file: str = ""  # e.g. runs/cache-person.npz; "" = no disk cache
    # Long side of the images in packed caches (python -m train.pack), 0 = cache_long_side. The network's input
    # size: the GPU machine takes 64 MiB, and the cached 224 px are more than a 192 px input resolves.
    pack_long_side: int = 0
    split_file: str = ""  # "val PATH" / "drop PATH" lines (train.split), for split = "scenes" sources
    # {group: share of every training batch}; {} = every image equally likely (each source's share is its size).
    # Groups are the sources' `group` names; with a mix, every training source's group must have a share.
    mix: dict = field(default_factory=dict)

    def __post_init__(self):
        if not (self.pack_long_side == 0 or 32 <= self.pack_long_side <= self.cache_long_side):
            raise ConfigError(
                f"data.pack_long_side must be 0 (= cache_long_side) or 32..cache_long_side ({self.cache_long_side}), "
                f"got {self.pack_long_side}"
            )
        if self.on_error not in ("skip", "stop"):
            raise ConfigError(f"data.on_error must be 'skip' or 'stop', got {self.on_error!r}")
        if not self.classes:
            raise ConfigError("data.classes must name at least one class")
        if any(s.split == "scenes" for s in self.sources) and not self.split_file:
            raise ConfigError("a source has split = 'scenes' but data.split_file is not set")
        if self.mix:
            if not isinstance(self.mix, dict) or not all(
                isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
                for v in self.mix.values()
            ):
                raise ConfigError(f"data.mix must map group names to shares >= 0, got {self.mix!r}")
            if not math.isclose(sum(self.mix.values()), 1.0, abs_tol=1e-6):
                raise ConfigError(f"data.mix: the shares must sum to 1, got {sum(self.mix.values()):g}")
            groups = {group_of(s) for s in self.sources if s.split in ("train", "scenes")}
            missing, extra = sorted(groups - set(self.mix)), sorted(set(self.mix) - groups)
            if missing or extra:
                raise ConfigError(
                    f"data.mix must give a share to each training group {sorted(groups)}: "
                    f"missing {missing}, unknown {extra}"
                )

    @staticmethod
    def from_dict(d: dict) -> DataConfig:
        d = dict(d)
        srcs = tuple(strict(SourceConfig, s, f"data.sources[{i}]") for i, s in enumerate(d.pop("sources", [])))
        d["classes"] = tuple(d.get("classes", ()))
        return strict(DataConfig, {**d, "sources": srcs}, "data")


def group_of(src: SourceConfig) -> str:
    return src.group or src.name


def batch_plan(cfg: DataConfig, cache):
    """What train.batches draws batches from: the image count, or a Mix that keeps ``data.mix``'s shares."""
    if not cfg.mix:
        return len(cache)
    from train.batches import Mix

    names = list(cfg.mix)
    group = {s.name: names.index(group_of(s)) for s in cfg.sources if group_of(s) in cfg.mix}
    unknown = sorted({s for s in cache.sources if s not in group})
    if unknown:
        raise ConfigError(f"data.mix: training images from source(s) {unknown} have no group with a share")
    try:
        return Mix([group[s] for s in cache.sources], [float(cfg.mix[n]) for n in names])
    except ValueError as e:
        raise ConfigError(f"data.mix: {e}") from None


def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


def data_root(cfg: DataConfig) -> Path:
    return shared_root() / "datasets" if cfg.root == "auto" else Path(cfg.root)


def load_toml(path) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from None


# ------------------------------------------------------------------ samples


def known(sample: Sample, classes) -> Sample:
    """``sample`` with only the boxes of ``classes`` (by name): the others are background to this detector."""
    keep = [k for k, n in enumerate(sample.names) if n in classes]
    return replace(sample, boxes=sample.boxes[keep], names=tuple(sample.names[k] for k in keep))


def load_source(src: SourceConfig, root: Path, classes: list, report: LoadReport, stop: bool) -> list:
    """The source's samples (evaluation.datasets readers), keeping the boxes of ``classes`` only."""
    path = Path(src.path) if Path(src.path).is_absolute() else root / src.path
    if not path.exists():
        raise LabelError(f"source {src.name!r}: {path} does not exist")
    if src.format == "yolo":
        samples = load_yolo(path, src.name, report, stop, masks=src.masks)
    elif src.format == "voc":
        samples = load_voc(path, src.name, report, stop)
    else:
        anns = [a.strip() for a in src.annotations.split(",") if a.strip()]
        imgs = [a.strip() for a in src.images.split(",") if a.strip()]
        if not anns or len(anns) != len(imgs):
            raise ConfigError(f"source {src.name!r}: COCO needs matching 'annotations' and 'images' lists")
        samples = []
        for a, i in zip(anns, imgs, strict=True):
            samples += load_coco(path / a, path / i, src.name, report, stop)
    samples = [known(x, classes) for x in samples]
    return samples[: src.limit] if src.limit else samples


def read_split_file(path) -> dict:
    """{relative image path: "val" | "drop"} from a train.split file (format: evaluation.datasets.read_split_file)."""
    path = Path(path) if Path(path).is_absolute() else repo_root() / path
    try:
        return {rel: kind for _, kind, rel in split_entries(path)}
    except DataError as exc:
        raise ConfigError(f"data.split_file: {exc}") from None


def load_split(cfg: DataConfig, split: str, report: LoadReport | None = None) -> list:
    report = report if report is not None else LoadReport()
    root = data_root(cfg)
    listed = read_split_file(cfg.split_file) if cfg.split_file else {}
    out = []
    for src in cfg.sources:
        if src.split == split:
            out += load_source(src, root, list(cfg.classes), report, cfg.on_error == "stop")
        elif src.split == "scenes":
            for s in load_source(src, root, list(cfg.classes), report, cfg.on_error == "stop"):
                kind = listed.get(_relative(s.image, root), "train")
                if kind == split:
                    out.append(s)
    return out


def _relative(image: Path, root: Path) -> str:
    try:
        return Path(image).resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return Path(image).as_posix()


# ------------------------------------------------------------------ RAM cache


@dataclass
class Cache:
    """Decoded grey images shrunk to a long side, with their boxes in cached-image pixels.

    ``cutouts`` are person instances (grey patch + 0/1 mask) from instance masks,
    for copy-paste augmentation.
    """

    images: list  # uint8 (h,w)
    boxes: list  # float32 (n,4) x1,y1,x2,y2 in cached pixels
    classes: list  # int64 (n,)
    sources: list  # str per image
    cutouts: list = field(default_factory=list)  # (patch uint8 (h,w), mask uint8 (h,w), class)

    def __len__(self):
        return len(self.images)


def _resize_long(img: np.ndarray, long_side: int) -> np.ndarray:
    h, w = img.shape[:2]
    s = long_side / max(h, w)
    if s >= 1:
        return img
    return cv2.resize(img, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)


def build_cache(samples: list, long_side: int, classes, report: LoadReport | None = None, progress=None) -> Cache:
    """Decode and shrink every sample; boxes of ``classes`` (names) become class indices, others are dropped."""
    report = report if report is not None else LoadReport()
    cache = Cache([], [], [], [])
    it = progress(samples) if progress else samples
    for s in it:
        img = cv2.imread(str(s.image), cv2.IMREAD_GRAYSCALE)
        if img is None:
            report.add(f"{s.image}: cannot decode image (skipped)")
            continue
        small = _resize_long(img, long_side)
        h, w = small.shape
        cache.images.append(small)
        boxes, idx = s.select(classes)
        cache.boxes.append((boxes * np.array([w, h, w, h], np.float32)).astype(np.float32))
        cache.classes.append(idx)
        cache.sources.append(s.source)
        if s.mask is not None:
            cache.cutouts += _cutouts(small, s, int(idx[0]) if len(idx) else 0)
    return cache


def _cutouts(small: np.ndarray, s: Sample, cls: int) -> list:
    m = cv2.imread(str(s.mask), cv2.IMREAD_UNCHANGED)
    if m is None or m.ndim != 2:
        return []
    h, w = small.shape
    m = cv2.resize(m, (w, h), interpolation=cv2.INTER_NEAREST)
    out = []
    for inst in np.unique(m):
        if inst == 0:
            continue
        ys, xs = np.nonzero(m == inst)
        if len(ys) < 64:
            continue
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        out.append((small[y0:y1, x0:x1].copy(), (m[y0:y1, x0:x1] == inst).astype(np.uint8), cls))
    return out


def _flat(cache: Cache) -> dict:
    """Everything but the pixels as flat arrays plus counts (no object arrays: loads with allow_pickle=False)."""
    cat = lambda xs, dt: np.concatenate([x.ravel() for x in xs]).astype(dt) if xs else np.zeros(0, dt)  # noqa: E731
    return {
        "shapes": np.array([im.shape for im in cache.images], np.int64).reshape(-1, 2),
        "boxes": cat(cache.boxes, np.float32).reshape(-1, 4),
        "classes": cat(cache.classes, np.int64),
        "counts": np.array([len(b) for b in cache.boxes], np.int64),
        "sources": np.array(cache.sources, dtype=np.str_),
        "cut_pixels": cat([c[0] for c in cache.cutouts], np.uint8),
        "cut_masks": cat([c[1] for c in cache.cutouts], np.uint8),
        "cut_shapes": np.array([c[0].shape for c in cache.cutouts], np.int64).reshape(-1, 2),
        "cut_classes": np.array([c[2] for c in cache.cutouts], np.int64),
    }


def _unflat(z, images: list) -> Cache:
    cache = Cache(images, [], [], [str(s) for s in z["sources"]])
    boxes, classes, b = z["boxes"], z["classes"], 0
    for n in z["counts"]:
        cache.boxes.append(boxes[b : b + n])
        cache.classes.append(classes[b : b + n])
        b += n
    p = 0
    for (h, w), c in zip(z["cut_shapes"], z["cut_classes"], strict=True):
        cache.cutouts.append(
            (z["cut_pixels"][p : p + h * w].reshape(h, w), z["cut_masks"][p : p + h * w].reshape(h, w), int(c))
        )
        p += h * w
    return cache


def _write_npz(path, arrays: dict, compress: bool = False) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(str(path) + ".tmp.npz")
    (np.savez_compressed if compress else np.savez)(tmp, **arrays)
    os.replace(tmp, path)


def save_cache(cache: Cache, path) -> None:
    """One .npz of flat arrays plus offsets (no object arrays, so it loads with allow_pickle=False)."""
    pixels = np.concatenate([im.ravel() for im in cache.images]) if cache.images else np.zeros(0, np.uint8)
    _write_npz(path, {"pixels": pixels.astype(np.uint8), **_flat(cache)})


def load_cache(path) -> Cache:
    with np.load(path, allow_pickle=False) as z:
        pix, images, p = z["pixels"], [], 0
        for h, w in z["shapes"]:
            images.append(pix[p : p + h * w].reshape(h, w))
            p += h * w
        return _unflat(z, images)


def cached_split(cfg: DataConfig, split: str, report: LoadReport | None = None, progress=None) -> Cache:
    """The split's cache, from ``cache_file`` (suffixed by split) when it exists, else built (and saved)."""
    path = None
    if cfg.cache_file:
        base = Path(cfg.cache_file)
        base = base if base.is_absolute() else repo_root() / base
        listed = sorted(read_split_file(cfg.split_file).items()) if cfg.split_file else []
        key = hashlib.sha1(repr((cfg.classes, cfg.sources, str(data_root(cfg)), listed)).encode()).hexdigest()[:8]
        path = base.with_name(f"{base.stem}-{split}-{cfg.cache_long_side}-{key}.npz")
        if path.exists():
            return load_cache(path)
    cache = build_cache(load_split(cfg, split, report), cfg.cache_long_side, cfg.classes, report, progress)
    if path is not None:
        save_cache(cache, path)
    return cache


# ------------------------------------------------------------------ packed caches (carried to a GPU machine)

# A GPU machine may take little (64 MiB with the code) and has no datasets: a split travels as
# JPEG-compressed cached images (~6x smaller than the raw cache), with a key that
# says which config and split they are, so a stale pack is refused, not trained on.
PACK_VERSION = 1


def split_key(cfg: DataConfig, split: str) -> str:
    """What a split's cached images are, wherever the datasets live: classes, sources, held-out list, size."""
    listed = sorted(read_split_file(cfg.split_file).items()) if cfg.split_file else []
    what = (PACK_VERSION, split, cfg.classes, cfg.sources, cfg.cache_long_side, listed)
    if cfg.pack_long_side and cfg.pack_long_side != cfg.cache_long_side:
        what += (cfg.pack_long_side,)
    return hashlib.sha1(repr(what).encode()).hexdigest()[:12]


def shrink_cache(cache: Cache, long_side: int) -> Cache:
    """``cache`` with every image longer than ``long_side`` area-shrunk to it, and its boxes scaled alike.

    Person cut-outs stay as they are: copy-paste scales them to the image they land on.
    """
    out = Cache([], [], list(cache.classes), list(cache.sources), list(cache.cutouts))
    for im, b in zip(cache.images, cache.boxes, strict=True):
        small = _resize_long(im, long_side)
        sy, sx = small.shape[0] / im.shape[0], small.shape[1] / im.shape[1]
        out.images.append(small)
        out.boxes.append((b * np.array([sx, sy, sx, sy], np.float32)).astype(np.float32))
    return out


def pack_cache(cache: Cache, path, key: str, quality: int = 80) -> int:
    """Write ``cache`` with JPEG pixels; returns the file size in bytes (shrink it first with :func:`shrink_cache`)."""
    if not 50 <= quality <= 100:
        raise ConfigError(f"JPEG quality must be 50..100, got {quality}")
    blobs = []
    for im in cache.images:
        ok, buf = cv2.imencode(".jpg", im, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
        if not ok:
            raise ValueError(f"cannot JPEG-encode a cached image of shape {im.shape}")
        blobs.append(buf.ravel())
    jpeg = np.concatenate(blobs) if blobs else np.zeros(0, np.uint8)
    sizes = np.array([len(b) for b in blobs], np.int64)
    meta = {"pack_version": np.int64(PACK_VERSION), "key": np.str_(key)}
    _write_npz(path, {"jpeg": jpeg, "jpeg_sizes": sizes, **meta, **_flat(cache)}, compress=True)
    return Path(path).stat().st_size


def load_packed(path, key: str) -> Cache:
    """A :func:`pack_cache` file, refused (ConfigError) unless it is this version and this split's ``key``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no packed cache here (make it with python -m train.pack)")
    with np.load(path, allow_pickle=False) as z:
        if "jpeg" not in z.files or int(z["pack_version"]) != PACK_VERSION:
            raise ConfigError(f"{path}: not a version-{PACK_VERSION} packed cache (remake it with python -m train.pack)")
        if str(z["key"]) != key:
            raise ConfigError(
                f"{path}: packed for another data config or split (key {z['key']}, this config needs {key}); "
                "remake it with python -m train.pack"
            )
        jpeg, images, p = z["jpeg"], [], 0
        for (h, w), n in zip(z["shapes"], z["jpeg_sizes"], strict=True):
            im = cv2.imdecode(jpeg[p : p + n], cv2.IMREAD_GRAYSCALE)
            if im is None or im.shape != (h, w):
                raise ConfigError(f"{path}: image {len(images)} does not decode to {h}x{w}")
            images.append(im)
            p += n
        return _unflat(z, images)
