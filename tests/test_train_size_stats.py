"""train.size_stats: the height bands of training boxes, with and without augmentation."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")

from train import data as td  # noqa: E402
from train.augment import AugmentConfig, BatchMaker, no_augment  # noqa: E402
from train.size_stats import size_shares  # noqa: E402


def _cache():
    """Square 192-pixel images (the letterbox is the identity): one tall person, one short one, and a pair."""
    img = np.full((192, 192), 100, np.uint8)
    boxes = [
        np.array([[80, 10, 120, 182]], np.float32),  # 172 px: 0.896 of the input, standing
        np.array([[20, 20, 40, 50]], np.float32),  # 30 px: 0.156
        np.array([[10, 10, 60, 110], [100, 10, 150, 110]], np.float32),  # two of 100 px: 0.52
    ]
    return td.Cache([img] * 3, boxes, [np.zeros(len(b), np.int64) for b in boxes], ["s"] * 3)


def test_plain_samples_give_the_labelled_heights():
    cache = _cache()
    r = size_shares(BatchMaker(cache, no_augment(), 192, 192), np.arange(3), False, 192)
    # bands 0-.1, .1-.25, .25-.45, .45-.65, .65-.85, .85-1: 1 short, 2 medium, 1 tall of 4 boxes
    assert r["bands"] == [0.0, 0.25, 0.0, 0.5, 0.0, 0.25]
    assert r["boxes"] == 4
    assert r["one_standing"] == pytest.approx(1 / 3, abs=1e-4)  # the short one is under a quarter


def test_zooming_out_moves_boxes_down_a_band():
    half = AugmentConfig(mosaic=0, copy_paste=0, flip=0, scale_min=0.5, scale_max=0.5, translate=0,
                         brightness=0, contrast=0, noise=0)
    r = size_shares(BatchMaker(_cache(), half, 192, 192), np.arange(3), True, 192)
    assert r["bands"] == [0.25, 0.0, 0.75, 0.0, 0.0, 0.0]  # 15, 50, 50 and 86 px
    assert r["one_standing"] == pytest.approx(1 / 3, abs=1e-4)  # 86 px is still a quarter of 192
