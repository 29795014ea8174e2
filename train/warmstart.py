"""Where a run starts: its weights, its anchors, and the teacher it is distilled from.

From nothing (anchors by k-means, chosen by the caller), from the float twin's
weights (the two-stage recipe of Bi-Real Net and ReActNet), from a trained binary
net (a warm start, e.g. before added Bi-Real blocks), or from a checkpoint to
resume (its weights and anchors, a fresh schedule).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from train.checkpoints import load_checkpoint, read_checkpoint
from train.data import ConfigError, repo_root
from train.model import BConv


@dataclass
class Start:
    teacher: torch.nn.Module | None = None  # eval mode, on the device; None without distillation
    # The anchors the starting or teaching head was trained with (its channels mean nothing without them);
    # None: choose them from the training boxes.
    anchors: np.ndarray | None = None
    # Steps, wall seconds and epochs before this run (a resumed checkpoint's), so totals cover both.
    prior: dict = field(default_factory=lambda: {"step": 0, "wall_s": 0.0, "epochs": 0.0})


def start(model, tc, resume, device, log=print) -> Start:
    """Load the teacher (train.distill > 0), then the weights of train.init_from or of ``resume`` into ``model``."""
    s = Start()
    if tc.distill > 0:
        if not tc.teacher:
            raise ConfigError("train.distill > 0 needs train.teacher (a checkpoint)")
        teacher, tck = load_checkpoint(_existing("train.teacher", tc.teacher))
        s.teacher, s.anchors = teacher.to(device), np.asarray(tck["anchors"], np.float32)
        log(f"distilling from {tc.teacher} (gain {tc.distill})")
    elif tc.teacher:
        log(f"no distillation: train.distill is 0, so train.teacher {tc.teacher} is not loaded")
    if resume is not None:
        ck = read_checkpoint(resume)
        model.load_state_dict(ck["model"])
        s.anchors = np.asarray(ck["anchors"], np.float32)
        s.prior = {k: ck.get(k, 0) for k in ("step", "wall_s", "epochs")}
        log(f"resumed from {resume} (step {ck.get('step')}), its anchors kept")
    elif tc.init_from:
        ck = read_checkpoint(_existing("train.init_from", tc.init_from))
        init_from(model, ck["model"], log, from_binary=bool(ck["config"]["model"].get("binary")))
        s.anchors = np.asarray(ck["anchors"], np.float32)
        log(f"weights from {tc.init_from}")
    return s


def init_from(model, state: dict, log=print, from_binary: bool = False):
    """Copy a source net's weights into ``model``: its float twin's, or a trained binary net's.

    Tensors of matching shape are copied. From the float twin, latent binary weights are scaled
    per output channel into [-1, 1], where the straight-through gradient is alive; their signs
    are the float signs. ``from_binary``: the source's latent weights are already in range and
    its BatchNorms expect their scale, so they are copied as they are. Layers the source lacks
    keep their own start (added Bi-Real blocks start as the identity).
    """
    own = model.state_dict()
    # The head is always the last layer: blocks added before it shift its index, not its meaning.
    last = lambda keys: max(int(k.split(".")[1]) for k in keys if k.startswith("layers."))  # noqa: E731
    src_head, own_head = f"layers.{last(state)}.", f"layers.{last(own)}."
    state = {(own_head + k[len(src_head) :] if k.startswith(src_head) else k): v for k, v in state.items()}
    copied = [k for k, v in state.items() if k in own and own[k].shape == v.shape]
    for k in copied:
        own[k] = state[k].clone()
    model.load_state_dict(own)
    if not from_binary:
        with torch.no_grad():
            for m in model.layers:
                if isinstance(m, BConv) and m.binary:
                    m.weight.div_(m.weight.abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12))
    source = "binary net" if from_binary else "float twin"
    log(f"init: {len(copied)} of {len(own)} tensors from the {source}")


def _existing(what: str, path) -> Path:
    """The checkpoint a config key names, relative to the working directory or the repository."""
    p = Path(path)
    p = p if p.is_absolute() or p.exists() else repo_root() / p
    if not p.is_file():
        raise ConfigError(f"{what}: {path} does not exist (train the float twin first: --float-twin)")
    return p
