"""Trained weights kept in the repository: a compact, strict file that is not pickle.

A training checkpoint (``torch.save``) lives in git-ignored ``runs/`` and is a
pickle. What a lineage needs to outlive a machine, the float teacher and the
best binary checkpoint, is kept as one ``.npz`` (``numpy.savez_compressed``,
read with ``allow_pickle=False``):

- ``__meta__``: UTF-8 JSON with ``format`` ("xnorcam-weights"), ``version``,
  the training config (``config``), ``anchors``, ``class_names`` and the rest
  of the checkpoint's plain numbers (step, epochs, wall time...);
- every tensor of the model's state dict under its own name: floating-point
  tensors as float16 unless ``exact`` (float32), integer tensors as they are.

float16 keeps a teacher's answers (its head is distilled through a sigmoid) and
a binary net's signs; a binary net's latent weights lose precision that the next
training stage regains in a few steps. ``load_weights`` returns the same dict
as a checkpoint, so ``train.init_from``, ``train.teacher`` and ``--resume`` take either.

    python -m train.weights runs/person-float/best.pt models/person-float.npz [--exact]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

FORMAT = "xnorcam-weights"
VERSION = 1
_META = "__meta__"


class WeightsError(ValueError):
    """A weights file that cannot be used; the message names the file and what is wrong."""


def _plain(x):
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return x


def _half(a: np.ndarray) -> np.ndarray:
    """float16 that keeps every sign: a binary net's latent weight too small for float16 becomes its smallest
    subnormal, not zero (sign(0) is another weight). A tensor beyond float16's range stays float32."""
    if np.abs(a).max(initial=0.0) > np.finfo(np.float16).max:
        return a.astype(np.float32)
    h = a.astype(np.float16)
    lost = (h == 0) & (a != 0)
    h[lost] = np.copysign(np.float16(2.0**-24), a[lost]).astype(np.float16)
    return h


def save_weights(ck: dict, path, exact: bool = False) -> int:
    """Write a checkpoint dict (``model`` state dict, ``config``, ``anchors``, ``class_names``, plain extras).

    Returns the file size in bytes. The write is atomic (a temporary file renamed over the target).
    """
    for key in ("model", "config", "anchors", "class_names"):
        if key not in ck:
            raise WeightsError(f"{path}: the checkpoint has no {key!r}")
    arrays = {}
    for name, t in ck["model"].items():
        if name == _META:
            raise WeightsError(f"{path}: a tensor may not be called {_META!r}")
        a = t.detach().cpu().numpy()
        arrays[name] = (a.astype(np.float32) if exact else _half(a)) if a.dtype.kind == "f" else a
    meta = {k: _plain(v) for k, v in ck.items() if k != "model"}
    meta.update(format=FORMAT, version=VERSION, exact=bool(exact))
    try:
        blob = json.dumps(meta, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise WeightsError(f"{path}: the checkpoint's extras are not plain JSON ({e})") from None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, **{_META: np.frombuffer(blob.encode(), np.uint8)}, **arrays)
    os.replace(tmp, path)
    return path.stat().st_size


def load_weights(path) -> dict:
    """The checkpoint dict of a :func:`save_weights` file (tensors float32), refused with WeightsError if it is not one."""
    path = Path(path)
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise WeightsError(f"{path}: not a weights file ({e})") from None
    with z:
        if _META not in z.files:
            raise WeightsError(f"{path}: no {_META} entry: not an xnorcam weights file")
        try:
            meta = json.loads(bytes(z[_META]).decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise WeightsError(f"{path}: unreadable {_META} ({e})") from None
        if meta.get("format") != FORMAT:
            raise WeightsError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
        if meta.get("version") != VERSION:
            raise WeightsError(f"{path}: version {meta.get('version')!r}; this reader knows version {VERSION}")
        state = {}
        for name in z.files:
            if name == _META:
                continue
            a = z[name]
            state[name] = torch.from_numpy(a.astype(np.float32) if a.dtype.kind == "f" else a.copy())
    for key in ("config", "anchors", "class_names"):
        if key not in meta:
            raise WeightsError(f"{path}: {_META} has no {key!r}")
    ck = {k: v for k, v in meta.items() if k not in ("format", "version", "exact")}
    ck["model"] = state
    return ck


def is_weights_file(path) -> bool:
    return Path(path).suffix == ".npz"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.weights", description="Keep a training checkpoint as a .npz.")
    ap.add_argument("checkpoint", help="a torch.save checkpoint (best.pt / last.pt)")
    ap.add_argument("out", help="the .npz to write")
    ap.add_argument("--exact", action="store_true", help="float32 tensors (default float16, every sign kept)")
    args = ap.parse_args(argv)
    if not is_weights_file(args.out):
        print(f"{args.out}: the weights file must end in .npz", file=sys.stderr)
        return 2
    try:
        ck = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
        size = save_weights(ck, args.out, args.exact)
        load_weights(args.out)  # what was written reads back
    except (OSError, RuntimeError, WeightsError) as e:
        print(f"{e}", file=sys.stderr)
        return 1
    print(f"{args.checkpoint} -> {args.out} ({size / 2**20:.2f} MiB, {'float32' if args.exact else 'float16'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
