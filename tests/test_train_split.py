"""The held-out split: near-copies (flipped, turned, re-exposed) land in one scene, and scenes never straddle."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from train import split as ts


def _scene(rng, n_copies):
    base = rng.integers(0, 256, (16, 16)).astype(np.float32)
    out = [base]
    for k in range(1, n_copies):
        v = np.rot90(base, k % 4)
        v = v[:, ::-1] if k % 2 else v
        out.append(np.clip(v * 0.8 + 20 + rng.normal(0, 3, v.shape), 0, 255))  # darker, noisy copy
    return out


def test_near_copies_are_one_scene_and_strangers_are_not():
    rng = np.random.default_rng(0)
    thumbs = np.stack(_scene(rng, 4) + _scene(rng, 3) + _scene(rng, 1)).astype(np.float32)
    label = ts.scenes(ts.similarity(thumbs) > ts.LINK)
    assert len(set(label[:4])) == 1 and len(set(label[4:7])) == 1
    assert len({label[0], label[4], label[7]}) == 3


def test_scenes_join_through_chains():
    linked = np.zeros((5, 5), bool)
    for i, j in ((0, 1), (1, 2), (3, 4)):
        linked[i, j] = linked[j, i] = True
    label = ts.scenes(linked)
    assert label[0] == label[1] == label[2] != label[3] == label[4]


def test_split_holds_out_whole_scenes_and_drops_neighbours():
    rng = np.random.default_rng(1)
    thumbs = np.stack([t for _ in range(30) for t in _scene(rng, 3)]).astype(np.float32)
    sim = ts.similarity(thumbs)
    val, drop = ts.split_source(sim, 0.2, np.random.default_rng(0))
    label = ts.scenes(sim > ts.LINK)
    for s in set(label):
        assert len(set(val[label == s])) == 1  # a scene is all in or all out
    assert 0.2 <= val.mean() < 0.35
    assert not (val & drop).any()
    train = ~val & ~drop
    assert sim[np.ix_(train, val)].max() <= ts.BUFFER


def test_split_skips_scenes_larger_than_the_cap():
    rng = np.random.default_rng(2)
    big = _scene(rng, 40)  # one camera's long run: 40 of 100 images
    rest = [t for _ in range(20) for t in _scene(rng, 3)]
    thumbs = np.stack(big + rest).astype(np.float32)
    val, _ = ts.split_source(ts.similarity(thumbs), 0.15, np.random.default_rng(0))
    assert not val[:40].any() and val[40:].any()


def test_main_writes_a_split_file(tmp_path, monkeypatch):
    rng = np.random.default_rng(3)
    for src in ts.SOURCES:
        d = tmp_path / "datasets" / src / "images"
        d.mkdir(parents=True)
        for i in range(10):
            img = cv2.resize(rng.integers(0, 256, (8, 8)).astype(np.uint8), (64, 64), interpolation=cv2.INTER_NEAREST)
            cv2.imwrite(str(d / f"{i}.png"), img)
    (photos, crops), = ts.BLOCKS
    for i in range(20):
        for folder, name in ((photos, f"{i:012d}"), (crops, f"{i:012d}_crop")):
            if folder == crops and i % 2:
                continue  # not every photo has a crop
            (tmp_path / "datasets" / folder / "images").mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(tmp_path / "datasets" / folder / "images" / f"{name}.jpg"), np.full((8, 8), i, np.uint8))
    monkeypatch.setenv("XNORCAM_SHARED", str(tmp_path))
    out = tmp_path / "split.txt"
    assert ts.main(["--out", str(out), "--fraction", "0.3", "--block-val", "0.2", "--block-drop", "0.1"]) == 0
    lines = [ln.split(" ", 1) for ln in out.read_text().splitlines() if not ln.startswith("#")]
    assert {k for k, _ in lines} <= {"val", "drop"}
    for src in ts.SOURCES:
        held = [p for k, p in lines if k == "val" and p.startswith(src + "/images/")]
        assert 3 <= len(held) <= 10
    assert all((tmp_path / "datasets" / p).exists() for _, p in lines)
    # the everyday photos: the last 4 of 20 held out, the 2 before dropped, and each crop beside its photo
    kind = {p.rsplit("/", 1)[1].split(".")[0]: k for k, p in lines if p.startswith((photos, crops))}
    assert {n for n, k in kind.items() if k == "val" and "_crop" not in n} == {f"{i:012d}" for i in (16, 17, 18, 19)}
    assert {n for n, k in kind.items() if k == "drop" and "_crop" not in n} == {f"{i:012d}" for i in (14, 15)}
    assert {n for n in kind if "_crop" in n} == {f"{i:012d}_crop" for i in (14, 16, 18)}
    assert all(kind[n] == kind[n.removesuffix("_crop")] for n in kind if "_crop" in n)


def test_blocks_are_contiguous_at_the_end_of_the_sorted_names():
    val, drop = ts.split_blocks([f"{i:03d}" for i in (5, 1, 9, 3, 7, 2, 8, 4, 6, 0)], 0.3, 0.2)
    assert val == {"007", "008", "009"} and drop == {"005", "006"}
    assert ts.split_blocks(["a", "b"], 0.0, 0.0) == (set(), set())


def test_main_without_datasets_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XNORCAM_SHARED", str(tmp_path / "nowhere"))
    assert ts.main(["--out", str(tmp_path / "x.txt")]) == 2
    assert "datasets folder missing" in capsys.readouterr().err


@pytest.mark.skipif(not (Path(__file__).resolve().parents[1] / "models" / "person-split.txt").exists(), reason="models/person-split.txt is missing")
def test_shipped_split_file_is_well_formed():
    from train.data import read_split_file

    listed = read_split_file(Path(__file__).resolve().parents[1] / "models" / "person-split.txt")
    kinds = list(listed.values())
    assert kinds.count("val") > 500
    assert {p.split("/images/")[0] for p in listed} == {
        "person/capston2", "person/fall", "person/clinic", "general/coco_person", "negatives/coco_crops"}
    for p, k in listed.items():  # a crop is held out or dropped with the photo it was cut from
        if p.startswith("negatives/coco_crops/"):
            photo = "general/coco_person/images/" + p.rsplit("/", 1)[1].replace("_crop", "")
            assert listed.get(photo) == k, p
