"""An exponential moving average of the weights, and BatchNorm statistics recomputed for it.

A binary net's latent weights can keep crossing zero late in training, so one
checkpoint's signs are a noisy draw: on the person split, cached validation of
successive checkpoints swung by ±0.015 mAP@0.5. Averaging the latent weights
over the last few hundred steps keeps the signs the recent steps agree on.

The averaged weights binarise to a different network from the live one, so the
live BatchNorm running statistics do not fit it. Export folds those statistics
into the shipped integer thresholds, so they are recomputed for the averaged
weights (``recalibrate``) before it is validated or saved.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

RAMP_STEPS = 300  # the decay ramps up over about this many updates, so early weights are forgotten quickly


class WeightAverage:
    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.decay, self.updates = decay, 0

    def current_decay(self) -> float:
        return self.decay * (1.0 - math.exp(-self.updates / RAMP_STEPS))

    @torch.no_grad()
    def update(self, model: nn.Module):
        self.updates += 1
        d = self.current_decay()
        for avg, live in zip(self.model.parameters(), model.parameters(), strict=True):
            avg.lerp_(live.detach(), 1.0 - d)
        # Buffers are not copied: the model's only buffers are BatchNorm statistics, which the live net's
        # would not fit, and ``recalibrate`` recomputes them before the average is used.

    @torch.no_grad()
    def recalibrate(self, batches) -> int:
        """Recompute every BatchNorm's running mean and variance over ``batches`` (input tensors), in float32.

        The average over all batches (momentum None), not a decaying one. Returns the number of images seen.
        """
        bns = [m for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        saved = [bn.momentum for bn in bns]
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None
        seen = 0
        self.model.train()
        try:
            for x in batches:
                self.model(x)
                seen += len(x)
        finally:
            self.model.eval()
            for bn, m in zip(bns, saved, strict=True):
                bn.momentum = m
        if not seen:
            raise ValueError("recalibrate needs at least one batch")
        return seen
