"""Batches made on the device from a resident cache (train.device_batches), checked on the CPU.

The same code runs with device="cuda" on a CUDA machine; these tests pin its geometry to the
numpy BatchMaker's and to the runtime letterbox, so a GPU's minutes are not lost to a typo.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")

import torch  # noqa: E402

from tests.test_train_data import _rect_cache  # noqa: E402
from train.augment import AugmentConfig, BatchMaker, no_augment  # noqa: E402
from train.batches import Mix  # noqa: E402
from train.device_batches import DeviceBatches, DeviceBatchMaker, DeviceCache  # noqa: E402


def _maker(cache, cfg, w=96, h=96, seed=0):
    return DeviceBatchMaker(DeviceCache(cache, "cpu"), cfg, w, h, seed)


def test_without_augmentation_it_makes_what_the_numpy_maker_makes():
    cache = _rect_cache(6, seed=3)
    idx = list(range(len(cache)))
    want_x, want_t = BatchMaker(cache, no_augment(), 96, 80).make(idx, augment=False)
    x, t = _maker(cache, no_augment(), 96, 80).make(idx, augment=False)
    assert x.shape == want_x.shape and x.dtype == torch.float32
    diff = (x - want_x).abs()
    assert float(diff.max()) <= 1.0 and float((diff > 0).float().mean()) < 0.01  # float32 vs float64 grids
    torch.testing.assert_close(t, want_t, atol=1e-3, rtol=0)


def test_without_augmentation_an_image_lands_where_the_runtime_letterbox_puts_it():
    from app.preprocess import letterbox

    cache = _rect_cache(4, seed=5)
    x, t = _maker(cache, no_augment(), 96, 96).make(list(range(4)), augment=False)
    for k, img in enumerate(cache.images):
        ref, lb = letterbox(img, 96, 96, 1)
        assert np.mean(np.abs(x[k, 0].numpy() - ref[:, :, 0]) > 40) < 0.05
        mine = t[t[:, 0] == k, 2:].numpy()
        np.testing.assert_allclose(mine, cache.boxes[k] * lb.scale + np.array([lb.pad_x, lb.pad_y] * 2), atol=1.0)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_augmented_boxes_still_cover_their_objects(seed):
    cache = _rect_cache(8, seed)
    cfg = AugmentConfig(mosaic=0.5, copy_paste=0.0, brightness=0.0, contrast=0.0, noise=0.0)
    x, t = _maker(cache, cfg, 128, 128, seed).make(list(range(8)))
    assert float(x.min()) >= 0 and float(x.max()) <= 255 and bool((x == x.round()).all())
    assert len(t) > 4
    assert (t[:, 2:] >= 0).all() and (t[:, [2, 4]] <= 128).all() and (t[:, [3, 5]] <= 128).all()
    for b, _, x1, y1, x2, y2 in t.numpy():
        inner = x[int(b), 0, int(y1) + 2 : int(y2) - 2, int(x1) + 2 : int(x2) - 2]
        if inner.numel() > 4:
            assert float(inner.mean()) > 180, "a box does not sit on its bright rectangle"


def test_mosaics_happen_and_hold_several_images():
    cache = _rect_cache(8, 4)
    cfg = AugmentConfig(mosaic=1.0, copy_paste=0.0, scale_min=0.5, scale_max=0.5, translate=0.0, flip=0.0,
                        brightness=0.0, contrast=0.0, noise=0.0)
    x, t = _maker(cache, cfg, 128, 128, 7).make(list(range(8)))
    per = torch.bincount(t[:, 0].long(), minlength=8)
    assert float(per.float().mean()) > 2.5  # 2 rectangles per image; a zoomed-out mosaic shows several images


def test_pasted_people_get_boxes_and_hide_what_they_cover():
    cache = _rect_cache(4, 6)
    mask = np.ones((60, 20), np.uint8)
    cache.cutouts = [(np.full((60, 20), 250, np.uint8), mask, 0)]
    cfg = AugmentConfig(mosaic=0.0, copy_paste=1.0, scale_min=1.0, scale_max=1.0, translate=0.0, flip=0.0,
                        brightness=0.0, contrast=0.0, noise=0.0)
    maker = _maker(cache, cfg, 128, 128, 3)
    x, t = maker.make(list(range(4)))
    bright = 0
    for b, _, x1, y1, x2, y2 in t.numpy():
        inner = x[int(b), 0, int(y1) + 2 : int(y2) - 2, int(x1) + 2 : int(x2) - 2]
        if inner.numel() > 4:
            assert float(inner.mean()) > 180
            bright += float(inner.mean()) > 245  # on a pasted patch (250), not a rectangle (240)
    assert bright >= 4  # every image got at least one paste


def test_targets_follow_a_mirrored_sample():
    cache = _rect_cache(3, 8)
    fixed = dict(mosaic=0.0, copy_paste=0.0, scale_min=0.8, scale_max=1.2, translate=0.1, brightness=0.0,
                 contrast=0.0, noise=0.0)
    x, t = _maker(cache, AugmentConfig(flip=1.0, **fixed), seed=4).make([0, 1, 2])
    plain, pt = _maker(cache, AugmentConfig(flip=0.0, **fixed), seed=4).make([0, 1, 2])  # the same draws
    torch.testing.assert_close(x, plain.flip(-1), atol=1.0, rtol=0)
    mirrored = pt.clone()
    mirrored[:, 2], mirrored[:, 4] = 96 - pt[:, 4], 96 - pt[:, 2]
    torch.testing.assert_close(t, mirrored, atol=1e-3, rtol=0)


def test_device_batches_keep_the_mix_and_count_images_per_second():
    cache = _rect_cache(12, 9)
    groups = np.array([0] * 9 + [1] * 3)
    db = DeviceBatches(cache, AugmentConfig(), 64, 64, Mix(groups, [0.5, 0.5]), 4, 0, "cpu")
    for _ in range(6):  # two epochs of 3 batches
        x, t = db.get()
        assert x.shape == (4, 1, 64, 64) and t.shape[1] == 6
    assert db.epoch == 2 and db.made == 24 and db.images_per_s > 0


def test_a_resident_cache_is_small_and_refuses_nothing_it_needs():
    cache = _rect_cache(5, 1)
    dc = DeviceCache(cache, "cpu")
    assert dc.images.dtype == torch.uint8 and dc.images.shape[0] == 5
    assert dc.nbytes < 5 * 224 * 224 + 5 * dc.kmax * 40
    with pytest.raises(ValueError):
        DeviceCache(type(cache)([], [], [], []), "cpu")


def test_no_box_is_left_on_the_grey_beyond_a_mosaics_canvas():
    """Zoomed out, a mosaic shows the canvas edge; an image hanging over it loses what hangs over, boxes too."""
    cache = _rect_cache(8, 11)
    cfg = AugmentConfig(mosaic=1.0, copy_paste=0.0, scale_min=0.3, scale_max=0.4, translate=0.0, flip=0.0,
                        brightness=0.0, contrast=0.0, noise=0.0, min_side=1.0)
    maker = _maker(cache, cfg, 128, 128, 0)
    boxes = 0
    for _ in range(6):
        x, t = maker.make(list(range(8)))
        for b, _, x1, y1, x2, y2 in t.numpy():
            inner = x[int(b), 0, int(np.ceil(y1)) : int(y2), int(np.ceil(x1)) : int(x2)]
            if inner.numel():
                boxes += 1
                assert float((inner > 180).float().mean()) > 0.5, "a box sits on grey"
    assert boxes > 50


def test_training_with_device_batches_runs_and_reports_images_per_second(tmp_path):
    import json

    from tests.test_train_loop import _config
    from train import cli

    cfg = _config(tmp_path, max_steps=4)
    rc = cli.main(["--config", str(cfg), "--float-twin", "--set", "train.batches=device", "--no-export",
                   "--out", str(tmp_path / "d")])
    assert rc == 0
    summary = json.loads((tmp_path / "d" / "history.json").read_text())["summary"]
    assert summary["step"] == 4 and summary["images_per_s"] > 0
    assert cli.main(["--config", str(cfg), "--set", "train.batches=gpu", "--no-export", "--out", str(tmp_path / "x")]) == 78
