"""data.mix: every training batch takes a fixed share of its images from each group, whatever the groups' sizes."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")

from train import data as td  # noqa: E402
from train.batches import Mix, epoch_batches  # noqa: E402

# 60 person images, 30 everyday, 10 empty: by size, a batch of 20 would hold 12, 6 and 2.
GROUPS = np.array([0] * 60 + [1] * 30 + [2] * 10)


def test_every_batch_holds_each_groups_share():
    mix = Mix(GROUPS, [0.5, 0.3, 0.2])
    batches = epoch_batches(mix, 20, seed=0, epoch=0)
    assert len(batches) == 5 and all(len(b) == 20 for b in batches)
    for b in batches:
        assert np.bincount(GROUPS[b], minlength=3).tolist() == [10, 6, 4]  # shares, not sizes


def test_a_share_that_is_not_whole_rounds_per_batch_and_holds_over_many():
    mix = Mix(GROUPS, [0.45, 0.35, 0.2])  # 4.5 and 3.5 of a batch of 10
    counts = np.array([np.bincount(GROUPS[b], minlength=3) for e in range(40) for b in mix.batches(10, 1, e)])
    assert set(counts[:, 0].tolist()) <= {4, 5} and set(counts[:, 1].tolist()) <= {3, 4}
    assert (counts.sum(1) == 10).all() and (counts[:, 2] == 2).all()
    np.testing.assert_allclose(counts.mean(0) / 10, [0.45, 0.35, 0.2], atol=0.01)


def test_within_a_group_no_image_repeats_before_all_are_seen():
    mix = Mix(GROUPS, [0.5, 0.3, 0.2])
    drawn = np.concatenate(mix.batches(20, seed=2, epoch=0))
    empty = [i for i in drawn if GROUPS[i] == 2]  # 20 draws from a group of 10: each image exactly twice
    assert sorted(np.bincount(empty, minlength=100)[90:].tolist()) == [2] * 10
    person = [i for i in drawn if GROUPS[i] == 0]  # 50 draws from 60: none twice
    assert len(set(person)) == len(person) == 50


def test_batches_are_seeded_and_reshuffle_each_epoch():
    mix = Mix(GROUPS, [0.5, 0.3, 0.2])
    a, b = mix.batches(20, 3, 0), mix.batches(20, 3, 0)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(np.concatenate(a), np.concatenate(mix.batches(20, 3, 1)))


@pytest.mark.parametrize(
    "groups, shares, needle",
    [
        (GROUPS, [0.5, 0.5], "no share"),
        (GROUPS, [0.5, 0.3, 0.3], "sum to 1"),
        (GROUPS, [1.2, -0.4, 0.2], ">= 0"),
        (np.array([0, 0, 2]), [0.5, 0.3, 0.2], "no images"),
    ],
)
def test_a_mix_that_cannot_be_drawn_is_refused(groups, shares, needle):
    with pytest.raises(ValueError, match=needle):
        Mix(groups, shares)


def _cfg(mix, groups=("person", "everyday", "empty")):
    sources = [{"name": f"s{i}", "path": f"p{i}", "format": "yolo", "group": g} for i, g in enumerate(groups)]
    return td.DataConfig.from_dict({"classes": ["person"], "sources": sources, "mix": mix})


@pytest.mark.parametrize(
    "mix, needle",
    [
        ({"person": 0.5, "everyday": 0.5}, "missing \\['empty'\\]"),
        ({"person": 0.5, "everyday": 0.3, "empty": 0.1, "cars": 0.1}, "unknown \\['cars'\\]"),
        ({"person": 0.5, "everyday": 0.3, "empty": 0.3}, "sum to 1"),
        ({"person": 0.5, "everyday": 0.6, "empty": -0.1}, "shares >= 0"),
        ({"person": "half", "everyday": 0.3, "empty": 0.2}, "shares >= 0"),
    ],
)
def test_config_refuses_a_mix_that_does_not_cover_the_groups(mix, needle):
    with pytest.raises(td.ConfigError, match=needle):
        _cfg(mix)


def test_batch_plan_maps_each_cached_image_to_its_sources_group():
    cfg = _cfg({"person": 0.5, "everyday": 0.3, "empty": 0.2})
    cache = td.Cache([np.zeros((4, 4), np.uint8)] * 6, [np.zeros((0, 4), np.float32)] * 6,
                     [np.zeros(0, np.int64)] * 6, ["s2", "s0", "s0", "s1", "s0", "s2"])
    plan = td.batch_plan(cfg, cache)
    assert isinstance(plan, Mix) and plan.groups.tolist() == [2, 0, 0, 1, 0, 2]
    assert td.batch_plan(td.DataConfig.from_dict({"classes": ["person"], "sources": []}), cache) == 6  # no mix
    stray = td.Cache(cache.images, cache.boxes, cache.classes, ["s0", "elsewhere", "s1", "s2", "s0", "s0"])
    with pytest.raises(td.ConfigError, match="elsewhere"):
        td.batch_plan(cfg, stray)


def test_a_source_without_a_group_is_its_own_group():
    cfg = _cfg({"s0": 0.6, "everyday": 0.2, "empty": 0.2}, groups=("", "everyday", "empty"))
    assert td.group_of(cfg.sources[0]) == "s0"
