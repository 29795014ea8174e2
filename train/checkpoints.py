"""Training checkpoints: the weights with the config, anchors and class names that give them meaning.

``torch.save`` of tensors and plain data, read back with ``weights_only=True``:
nothing is unpickled. A checkpoint's config must be one the trainer can run.
Options the trainer no longer has are accepted in the config of an older
checkpoint while they are off (every checkpoint records every option) and
dropped; a checkpoint trained with one of them on is refused, since resuming,
distilling or exporting it would claim a recipe the trainer cannot replay.
"""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import torch

from train.data import ConfigError
from train.model import Detector, ModelConfig
from train.weights import WeightsError, is_weights_file, load_weights

# section -> {key: what it was}: options older checkpoints record, accepted only when off.
RETIRED = {
    "model": {"real_act": "the real-activation probe (layers kept hardtanh, not exportable)"},
    "train": {"distill_attention": "attention transfer from the teacher's real stream"},
}


def config_dict(cfg: dict) -> dict:
    """Plain JSON-able form of a {section: frozen config} dict (for checkpoints and model metadata)."""

    def plain(x):
        if isinstance(x, tuple):
            return [plain(v) for v in x]
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        return x

    return {k: plain(asdict(v)) for k, v in cfg.items()}


def save_checkpoint(path, model, cfg, anchors, class_names, extra):
    torch.save(
        {
            "model": model.state_dict(),
            "config": config_dict(cfg),
            "anchors": np.asarray(anchors, np.float32).tolist(),
            "class_names": list(class_names),
            **extra,
        },
        path,
    )


def read_checkpoint(path) -> dict:
    """The checkpoint dict, its config in the current form; ConfigError if it used a retired option.

    ``path`` is a ``torch.save`` checkpoint, or a ``.npz`` weights file (train/weights.py: what the
    repository keeps of a teacher or a best binary net).
    """
    if is_weights_file(path):
        try:
            ck = load_weights(path)
        except WeightsError as e:
            raise ConfigError(str(e)) from None
    else:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    config = ck.get("config", {})
    for section, keys in RETIRED.items():
        table = config.get(section, {})
        for key, what in keys.items():
            value = table.pop(key, None)
            if value:
                raise ConfigError(
                    f"{path} was trained with {section}.{key} = {value!r} ({what}), "
                    "which the trainer no longer has; it cannot be loaded"
                )
    return ck


def load_checkpoint(path):
    """(model in eval mode, checkpoint dict)."""
    ck = read_checkpoint(path)
    model = Detector(ModelConfig(**ck["config"]["model"]), num_classes=len(ck["class_names"]))
    model.load_state_dict(ck["model"])
    model.eval()
    return model, ck
