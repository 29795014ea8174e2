"""Pack a config's train and val caches for a GPU machine: JPEG pixels, under the 64 MiB it can carry.

    python -m train.pack [--config train/configs/person.toml] [--out runs/carry] [--quality 70]

Writes OUT/train.npz and OUT/val.npz (see :func:`train.data.pack_cache`), the
images shrunk to ``data.pack_long_side`` (the network's input size). On the
GPU machine, ``python -m train.train --packed OUT`` trains from them without
the datasets; ``train/gpu.sh`` runs both stages there. Exit 78 when the config
is refused or the packs would not fit.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from train.data import ConfigError, LoadReport, cached_split, pack_cache, repo_root, shrink_cache, split_key

CARRY_LIMIT = 64 * 2**20  # what one transfer to the GPU machine holds, working tree included
CODE_ALLOWANCE = 8 * 2**20  # the repo's tracked files travel too (when git cannot say how much they are)
WHEEL_ALLOWANCE = 2**20  # the pycocotools wheel in .whl/


def tree_bytes(root) -> int:
    """Bytes of the files git tracks under ``root`` (code, docs, the model and the teacher's weights)."""
    import subprocess

    try:
        out = subprocess.run(["git", "-C", str(root), "ls-files", "-z"], capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return CODE_ALLOWANCE
    files = [Path(root) / f for f in out.decode().split("\0") if f]
    return sum(f.stat().st_size for f in files if f.is_file()) or CODE_ALLOWANCE


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.pack", description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="train/configs/person.toml")
    ap.add_argument("--out", default="runs/carry", help="folder for train.npz and val.npz")
    ap.add_argument("--quality", type=int, default=70, help="JPEG quality, 50..100 (70: benchmarks/pack_quality.py)")
    args = ap.parse_args(argv)
    from train.config import load_config

    try:
        dc = load_config(args.config)["data"]
        out = Path(args.out) if Path(args.out).is_absolute() else repo_root() / args.out
        total = 0
        for split in ("train", "val"):
            report = LoadReport()
            cache = cached_split(dc, split, report)
            if dc.pack_long_side and dc.pack_long_side != dc.cache_long_side:
                cache = shrink_cache(cache, dc.pack_long_side)
            size = pack_cache(cache, out / f"{split}.npz", split_key(dc, split), args.quality)
            total += size
            print(f"{split}: {len(cache)} images, {len(cache.cutouts)} cut-outs -> {out / f'{split}.npz'} "
                  f"({size / 2**20:.1f} MiB)")
    except ConfigError as e:
        print(f"pack: {e}", file=sys.stderr)
        return 78
    code = tree_bytes(repo_root())
    budget = CARRY_LIMIT - code - WHEEL_ALLOWANCE
    print(f"total {total / 2**20:.1f} MiB of the {budget / 2**20:.1f} MiB left beside the tracked files "
          f"({code / 2**20:.1f} MiB) and a wheel")
    if total > budget:
        print(f"pack: too big to carry; lower --quality (now {args.quality})", file=sys.stderr)
        return 78
    return 0


if __name__ == "__main__":
    sys.exit(main())
