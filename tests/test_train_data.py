"""The training data: sources by class name, the RAM cache, the split's routing, and batch augmentation geometry.

The dataset readers themselves are tested in test_evaluation_datasets.py."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

pytest.importorskip("torch")

from tests.test_evaluation_datasets import make_yolo  # noqa: E402
from train import data as td  # noqa: E402
from train.augment import AugmentConfig, BatchMaker, no_augment  # noqa: E402

SHARED = td.shared_root() / "datasets"


def test_sources_keep_their_classes_by_name_and_the_cache_indexes_them_in_config_order(tmp_path):
    root = make_yolo(tmp_path / "y", {"a": "0 0.5 0.5 0.5 0.2\n1 0.2 0.2 0.1 0.1\n", "b": ""})
    src = td.SourceConfig(name="y", path=str(root), format="yolo")
    people = td.load_source(src, tmp_path, ["person"], td.LoadReport(), stop=True)
    assert people[0].names == ("person",) and len(people[0].boxes) == 1  # the dog is background
    both = td.load_source(src, tmp_path, ["dog", "person"], td.LoadReport(), stop=True)
    cache = td.build_cache(both, 200, ["dog", "person"])
    assert cache.classes[0].tolist() == [1, 0] and cache.classes[1].tolist() == []  # "dog" first: index 0


def test_config_rejects_unknown_keys():
    with pytest.raises(td.ConfigError, match="unknown key"):
        td.DataConfig.from_dict({"classes": ["person"], "sources": [], "bogus": 1})
    with pytest.raises(td.ConfigError, match="format"):
        td.DataConfig.from_dict({"classes": ["person"], "sources": [{"name": "x", "path": "p", "format": "csv"}]})


def test_cache_round_trip_and_cutouts(tmp_path):
    root = make_yolo(
        tmp_path / "y", {"a": "0 0.5 0.5 0.5 0.5\n", "b": "0 0.25 0.25 0.2 0.2\n"}, sizes={"a": (400, 300)}
    )
    (root / "masks").mkdir()
    m = np.zeros((300, 400), np.uint8)
    m[80:220, 110:290] = 1
    cv2.imwrite(str(root / "masks" / "a.png"), m)
    samples = td.load_yolo(root, "y", td.LoadReport(), stop=False, masks=True)
    cache = td.build_cache(samples, 200, ["person"])
    assert cache.images[0].shape == (150, 200)  # long side shrunk to 200
    np.testing.assert_allclose(cache.boxes[0], [[50, 37.5, 150, 112.5]], atol=1e-4)
    assert len(cache.cutouts) == 1 and cache.cutouts[0][1].shape[0] > 60
    td.save_cache(cache, tmp_path / "c.npz")
    back = td.load_cache(tmp_path / "c.npz")
    assert len(back) == 2 and back.sources == ["y", "y"]
    for a, b in zip(cache.images + cache.boxes, back.images + back.boxes, strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(cache.cutouts[0][1], back.cutouts[0][1])


def _rect_cache(n=6, seed=0):
    """Images with bright rectangles exactly where their boxes are."""
    rng = np.random.default_rng(seed)
    imgs, boxes, classes = [], [], []
    for _ in range(n):
        h, w = int(rng.integers(120, 224)), int(rng.integers(120, 224))
        img = np.full((h, w), 30, np.uint8)
        bs = []
        for _ in range(2):
            x1, y1 = int(rng.integers(0, w - 40)), int(rng.integers(0, h - 50))
            x2, y2 = x1 + int(rng.integers(25, 40)), y1 + int(rng.integers(30, 50))
            img[y1:y2, x1:x2] = 240
            bs.append([x1, y1, x2, y2])
        imgs.append(img)
        boxes.append(np.array(bs, np.float32))
        classes.append(np.zeros(2, np.int64))
    return td.Cache(imgs, boxes, classes, ["s"] * n)


def test_no_augment_places_boxes_like_the_runtime_letterbox():
    from app.preprocess import letterbox

    cache = _rect_cache()
    x, t = BatchMaker(cache, no_augment(), 96, 96).make(list(range(len(cache))), augment=False)
    assert x.shape == (len(cache), 1, 96, 96)
    for k, img in enumerate(cache.images):
        ref, lb = letterbox(img, 96, 96, 1)
        diff = np.abs(x[k, 0].numpy() - ref[:, :, 0].astype(np.float32))
        assert np.mean(diff > 40) < 0.05  # same placement (resampling filters differ at edges)
        mine = t[t[:, 0] == k, 2:].numpy()
        want = cache.boxes[k] * lb.scale + np.array([lb.pad_x, lb.pad_y] * 2)
        np.testing.assert_allclose(mine, want, atol=1.0)


def test_runtime_letterbox_of_a_full_size_photo_sees_what_training_saw():
    """Training sees the photo through the cache (area-shrunk to its long side) and the warp; the Pi's
    letterbox shrinks the full frame at once. Fine texture must come out alike both ways."""
    from app.preprocess import letterbox

    rng = np.random.default_rng(0)
    img = cv2.resize(rng.integers(0, 256, (240, 320), dtype=np.uint8), (960, 720), interpolation=cv2.INTER_NEAREST)
    cached = td._resize_long(img, 224)
    cache = td.Cache([cached], [np.zeros((0, 4), np.float32)], [np.zeros(0, np.int64)], ["s"])
    x, _ = BatchMaker(cache, no_augment(), 192, 192).make([0], augment=False)
    ref, lb = letterbox(img, 192, 192, 1)
    inner = (slice(lb.pad_y + 2, 192 - lb.pad_y - 2), slice(2, 190))
    diff = np.abs(x[0, 0].numpy()[inner] - ref[:, :, 0][inner].astype(np.float32))
    # Area shrinking: 13 grey levels apart on average (two resamplings against one); bilinear: 52.
    assert diff.mean() < 25.0, f"mean grey difference {diff.mean():.1f}"


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_augmented_boxes_still_cover_their_objects(seed):
    cache = _rect_cache(8, seed)
    cfg = AugmentConfig(mosaic=0.5, copy_paste=0.0, brightness=0.0, contrast=0.0, noise=0.0)
    x, t = BatchMaker(cache, cfg, 128, 128, seed=seed).make(list(range(8)))
    assert x.dtype.is_floating_point and float(x.min()) >= 0 and float(x.max()) <= 255
    assert bool((x == x.round()).all())  # integer grey levels, as the Pi's uint8 input
    assert len(t) > 0
    assert (t[:, 2:] >= 0).all() and (t[:, [2, 4]] <= 128).all() and (t[:, [3, 5]] <= 128).all()
    for b, _, x1, y1, x2, y2 in t.numpy():
        inner = x[int(b), 0, int(y1) + 2 : int(y2) - 2, int(x1) + 2 : int(x2) - 2]
        if inner.numel() > 4:
            assert float(inner.mean()) > 180, "a box does not sit on its bright rectangle"


def test_copy_paste_adds_a_box_on_the_pasted_person():
    cache = _rect_cache(2)
    patch = np.full((60, 20), 250, np.uint8)
    cache.cutouts = [(patch, np.ones((60, 20), np.uint8), 0)]
    cfg = AugmentConfig(mosaic=0.0, copy_paste=1.0)
    maker = BatchMaker(cache, cfg, 96, 96, seed=0)
    img, boxes, cls = maker._image(0)
    new = boxes[-1].astype(int)
    assert img[new[1] : new[3], new[0] : new[2]].mean() > 245  # the patch (250), not a rectangle (240)
    assert (new[2] - new[0]) * 3 == pytest.approx(new[3] - new[1], abs=4)  # the patch's 1:3 shape


# ---------------------------------------------------------------- the real datasets


@pytest.mark.skipif(not SHARED.is_dir(), reason=f"no datasets folder at {SHARED} (XNORCAM_SHARED sets its parent)")
def test_real_person_config_loads_cleanly():
    cfg = td.DataConfig.from_dict(
        td.load_toml(Path(__file__).resolve().parents[1] / "train/configs/person.toml")["data"]
    )
    rep = td.LoadReport()
    val = td.load_split(cfg, "val", rep)
    train = td.load_split(cfg, "train", rep)
    assert rep.problems == []
    coco = [s for s in val if s.source == "coco_mini"]
    assert 100 < len(coco) <= 159 and any(len(s.boxes) for s in coco)
    train_sources = {src.name for src in cfg.sources if src.split == "train"}
    assert not train_sources & {s.source for s in val}  # whole sources held out
    listed = td.read_split_file(cfg.split_file)
    held = {p for p, k in listed.items() if k == "val"}
    dropped = {p for p, k in listed.items() if k == "drop"}
    root = td.data_root(cfg)
    val_paths = {s.image.relative_to(root).as_posix() for s in val if s.source != "coco_mini"}
    train_paths = {s.image.relative_to(root).as_posix() for s in train}
    assert val_paths == held  # every listed scene image, and nothing else, is validation
    assert not train_paths & (held | dropped)
    assert {s.source for s in val} >= {"capston2", "fall", "clinic", "coco_mini"}


def test_scenes_split_routes_listed_images(tmp_path):
    ds = tmp_path / "ds"
    (ds / "images").mkdir(parents=True)
    (ds / "labels").mkdir()
    for n in ("a", "b", "c"):
        cv2.imwrite(str(ds / "images" / f"{n}.jpg"), np.full((20, 20), 128, np.uint8))
        (ds / "labels" / f"{n}.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    split = tmp_path / "split.txt"
    split.write_text("# comment\nval ds/images/a.jpg\ndrop ds/images/b.jpg\n")
    cfg = td.DataConfig.from_dict(
        {
            "classes": ["person"],
            "root": str(tmp_path),
            "split_file": str(split),
            "sources": [{"name": "ds", "path": "ds", "format": "yolo", "split": "scenes"}],
        }
    )
    assert [s.image.name for s in td.load_split(cfg, "val")] == ["a.jpg"]
    assert [s.image.name for s in td.load_split(cfg, "train")] == ["c.jpg"]


def test_scenes_split_needs_a_split_file_and_a_clean_one(tmp_path):
    src = {"name": "ds", "path": "ds", "format": "yolo", "split": "scenes"}
    with pytest.raises(td.ConfigError, match="split_file"):
        td.DataConfig.from_dict({"classes": ["person"], "sources": [src]})
    bad = tmp_path / "split.txt"
    bad.write_text("val a.jpg\nkeep b.jpg\n")
    with pytest.raises(td.ConfigError, match=r"split.txt:2"):
        td.read_split_file(bad)


@pytest.mark.skipif(not (SHARED / "raccoon").is_dir(), reason=f"no raccoon dataset at {SHARED / 'raccoon'}")
def test_real_voc_raccoon():
    rep = td.LoadReport()
    samples = td.load_voc(SHARED / "raccoon", "raccoon", rep, stop=False)
    assert len(samples) + len(rep.problems) == 200
    assert sum(len(s.boxes) for s in samples) > 150
