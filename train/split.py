"""Make the held-out validation split: whole scenes, never near-copies of a training image.

    python -m train.split [--out models/person-split.txt] [--fraction 0.12] [--seed 0]

The Roboflow sets in person/ hold augmented near-copies of one photo and runs of
frames from one fixed camera, so a random split leaks. Here every image becomes a
16x16 grey thumbnail; two images are linked when the cosine similarity of their
mean-removed thumbnails, maximised over the 8 flips and quarter turns (the
exporter's augmentations), exceeds ``LINK``. Linked images form one scene
(connected components). Whole scenes go to validation, drawn at random (seeded)
until ``fraction`` of each source's images is held out, skipping scenes larger
than ``MAX_SCENE`` of the source (one camera's hour of footage would be all of
the split). Any training image still closer than ``BUFFER`` to a validation image
is dropped from both.

The output lists ``val PATH`` and ``drop PATH`` lines (paths relative to the
datasets root). Training (``split = "scenes"`` sources) and ``python -m evaluation``
read it. Sources not named here are handled by their config (coco_mini stays a
whole held-out source; pennfudan stays in training as the copy-paste mask source).

Everyday scenes (``general/coco_person``, one COCO photo per file, named by its
COCO id) hold no near-copies, so they are split in contiguous blocks of the
sorted names: the last ``block_val`` of them are held out and the ``block_drop``
before those are dropped (the calibration images). A person-free crop
(``negatives/coco_crops/ID_crop.jpg``) follows the photo it was cut from, so a
held-out photo never has its crop in training.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np

from evaluation.datasets import IMAGE_SUFFIXES, shared_root
from train.data import repo_root

SOURCES = ("person/capston2", "person/fall", "person/clinic")
# (photo folder, folder of crops named PHOTO_crop): split in contiguous blocks of sorted names.
BLOCKS = (("general/coco_person", "negatives/coco_crops"),)
CROP_SUFFIX = "_crop"
LINK = 0.85
BUFFER = 0.80
MAX_SCENE = 0.05


def thumbnails(files: list) -> np.ndarray:
    out = np.empty((len(files), 16, 16), np.float32)
    for i, f in enumerate(files):
        g = cv2.imread(str(f), cv2.IMREAD_GRAYSCALE)
        if g is None:
            raise SystemExit(f"{f}: cannot decode image")
        out[i] = cv2.resize(g, (16, 16), interpolation=cv2.INTER_AREA)
    return out


def _unit(t: np.ndarray) -> np.ndarray:
    a = t.reshape(len(t), -1)
    a = a - a.mean(1, keepdims=True)
    return a / (np.linalg.norm(a, axis=1, keepdims=True) + 1e-6)


def similarity(thumbs: np.ndarray) -> np.ndarray:
    """(N,N) cosine similarity, maximised over the dihedral group; the diagonal is -1."""
    base = _unit(thumbs)
    sim = np.full((len(thumbs), len(thumbs)), -1.0, np.float32)
    for k in range(4):
        for flip in (False, True):
            v = np.rot90(thumbs, k, axes=(1, 2))
            v = v[:, :, ::-1] if flip else v
            np.maximum(sim, base @ _unit(np.ascontiguousarray(v)).T, out=sim)
    sim = np.maximum(sim, sim.T)
    np.fill_diagonal(sim, -1.0)
    return sim


def scenes(linked: np.ndarray) -> np.ndarray:
    """Connected components of a boolean adjacency matrix → label per node (union-find)."""
    parent = np.arange(len(linked))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in zip(*np.nonzero(np.triu(linked, 1)), strict=True):
        a, b = find(i), find(j)
        if a != b:
            parent[max(a, b)] = min(a, b)
    return np.unique([find(i) for i in range(len(linked))], return_inverse=True)[1]


def split_source(sim: np.ndarray, fraction: float, rng: np.random.Generator) -> tuple:
    """(val mask, drop mask) for one source from its similarity matrix."""
    n = len(sim)
    label = scenes(sim > LINK)
    sizes = np.bincount(label)
    val = np.zeros(n, bool)
    for s in rng.permutation(len(sizes)):
        if val.sum() >= fraction * n:
            break
        if sizes[s] <= max(1, MAX_SCENE * n):
            val |= label == s
    near_val = (sim[:, val] > BUFFER).any(1) if val.any() else np.zeros(n, bool)
    return val, near_val & ~val


def split_blocks(names: list, block_val: float, block_drop: float) -> tuple:
    """(val set, drop set) of sorted ``names``: the last ``block_val`` held out, the ``block_drop`` before dropped."""
    names = sorted(names)
    n_val, n_drop = round(block_val * len(names)), round(block_drop * len(names))
    start = len(names) - n_val
    return set(names[start:]), set(names[start - n_drop : start])


def block_lines(root: Path, photos: str, crops: str, block_val: float, block_drop: float) -> tuple:
    """(split lines, summary) for one photo folder and its crops."""
    files = sorted(p for p in (root / photos / "images").iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    cut = sorted(p for p in (root / crops / "images").iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    val, drop = split_blocks([f.stem for f in files], block_val, block_drop)
    lines = []
    for group in (files, cut):
        for f in group:
            stem = f.stem.removesuffix(CROP_SUFFIX)
            kind = "val" if stem in val else "drop" if stem in drop else None
            if kind:
                lines.append(f"{kind} {f.relative_to(root).as_posix()}")
    counts = {k: sum(ln.startswith(k + " ") for ln in lines) for k in ("val", "drop")}
    summary = (
        f"{photos} + {crops}: {len(files)} + {len(cut)} images, the last {len(val)} photos held out and the "
        f"{len(drop)} before dropped: {counts['val']} val, {counts['drop']} dropped (crops follow their photo)"
    )
    return lines, summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.split", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(repo_root() / "models" / "person-split.txt"))
    ap.add_argument("--fraction", type=float, default=0.12, help="share of each source's images to hold out")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--block-val", type=float, default=0.18, help="share of everyday photos held out (last block)")
    ap.add_argument("--block-drop", type=float, default=0.09, help="share dropped, the block before (calibration)")
    args = ap.parse_args(argv)
    root = shared_root() / "datasets"
    if not root.is_dir():
        print(f"{root}: datasets folder missing (set XNORCAM_SHARED)", file=sys.stderr)
        return 2
    rng = np.random.default_rng(args.seed)
    lines = [
        "# Held-out validation split of the default person detector (models/person.xnc).",
        f"# Made by: python -m train.split --fraction {args.fraction} --seed {args.seed} "
        f"--block-val {args.block_val} --block-drop {args.block_drop}",
        f"# Scenes: thumbnails linked at cosine > {LINK} (max over flips/turns); whole scenes held out,",
        f"# none larger than {MAX_SCENE:.0%} of a source; training images within {BUFFER} of a held-out one dropped.",
        "# Also held out whole: coco_mini (every image). Paths are relative to the datasets root.",
    ]
    for src in SOURCES:
        files = sorted(p for p in (root / src / "images").iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        val, drop = split_source(similarity(thumbnails(files)), args.fraction, rng)
        lines.append(f"# {src}: {len(files)} images, {val.sum()} val, {drop.sum()} dropped, {len(files) - val.sum() - drop.sum()} train")
        lines += [f"val {f.relative_to(root).as_posix()}" for f, v in zip(files, val, strict=True) if v]
        lines += [f"drop {f.relative_to(root).as_posix()}" for f, d in zip(files, drop, strict=True) if d]
        print(f"{src}: {len(files)} images, {val.sum()} val, {drop.sum()} dropped")
    for photos, crops in BLOCKS:
        block, summary = block_lines(root, photos, crops, args.block_val, args.block_drop)
        lines.append(f"# {summary}")
        lines += block
        print(summary)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
