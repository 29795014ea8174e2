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
    monkeypatch.setenv("XNORCAM_SHARED", str(tmp_path))
    out = tmp_path / "split.txt"
    assert ts.main(["--out", str(out), "--fraction", "0.3"]) == 0
    lines = [ln.split(" ", 1) for ln in out.read_text().splitlines() if not ln.startswith("#")]
    assert {k for k, _ in lines} <= {"val", "drop"}
    for src in ts.SOURCES:
        held = [p for k, p in lines if k == "val" and p.startswith(src + "/images/")]
        assert 3 <= len(held) <= 10
    assert all((tmp_path / "datasets" / p).exists() for _, p in lines)


def test_main_without_datasets_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XNORCAM_SHARED", str(tmp_path / "nowhere"))
    assert ts.main(["--out", str(tmp_path / "x.txt")]) == 2
    assert "datasets folder missing" in capsys.readouterr().err


@pytest.mark.skipif(not (Path(__file__).resolve().parents[1] / "models" / "person-split.txt").exists(), reason="no split")
def test_shipped_split_file_is_well_formed():
    from train.data import read_split_file

    listed = read_split_file(Path(__file__).resolve().parents[1] / "models" / "person-split.txt")
    kinds = list(listed.values())
    assert kinds.count("val") > 500 and all(p.split("/")[0] == "person" for p in listed)
