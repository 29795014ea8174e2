"""What training on a CUDA machine from packed caches needs: packs that fit the carry, batches made by worker
processes, the warp on any device.

All of it runs on the CPU here (a CUDA machine runs the same code with device="cuda").
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

pytest.importorskip("torch")

import torch  # noqa: E402

from tests.test_train_data import _rect_cache  # noqa: E402
from tests.test_train_loop import _config  # noqa: E402
from train import cli  # noqa: E402
from train import data as td  # noqa: E402
from train.augment import AugmentConfig, BatchMaker  # noqa: E402
from train.batches import Prefetch, WorkerBatches, epoch_batches, start  # noqa: E402
from train.checkpoints import load_checkpoint  # noqa: E402
from train.config import load_config  # noqa: E402


def _with_cutout(cache):
    mask = np.zeros((40, 16), np.uint8)
    mask[5:35, 3:13] = 1
    cache.cutouts = [(np.full((40, 16), 200, np.uint8), mask, 0)]
    return cache


def test_pack_round_trip_keeps_labels_exactly_and_pixels_closely(tmp_path):
    cache = _with_cutout(_rect_cache(5, seed=4))
    size = td.pack_cache(cache, tmp_path / "p.npz", "k1", quality=80)
    assert size == (tmp_path / "p.npz").stat().st_size
    raw = sum(im.nbytes for im in cache.images)
    assert size < raw  # the point of packing
    back = td.load_packed(tmp_path / "p.npz", "k1")
    assert back.sources == cache.sources
    for a, b in zip(cache.boxes + cache.classes, back.boxes + back.classes, strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(cache.images, back.images, strict=True):
        assert a.shape == b.shape
        assert np.abs(a.astype(int) - b.astype(int)).mean() < 3.0  # JPEG q80 on flat rectangles
    for a, b in zip(cache.cutouts[0], back.cutouts[0], strict=True):
        np.testing.assert_array_equal(a, b)  # cut-outs stay lossless: their masks are exact


def test_packs_shrink_to_the_pack_long_side_with_their_boxes(tmp_path):
    cache = _with_cutout(_rect_cache(4, seed=2))
    small = td.shrink_cache(cache, 96)
    for im, b, sim, sb in zip(cache.images, cache.boxes, small.images, small.boxes, strict=True):
        assert max(sim.shape) == 96 and abs(sim.shape[1] / sim.shape[0] - im.shape[1] / im.shape[0]) < 0.02
        np.testing.assert_allclose(sb[:, [0, 2]], b[:, [0, 2]] * sim.shape[1] / im.shape[1], rtol=1e-5)
        np.testing.assert_allclose(sb[:, [1, 3]], b[:, [1, 3]] * sim.shape[0] / im.shape[0], rtol=1e-5)
        x1, y1, x2, y2 = (int(round(v)) for v in sb[0])
        assert sim[y1 + 1 : y2 - 1, x1 + 1 : x2 - 1].mean() > 200  # still on its bright rectangle
    assert small.cutouts == cache.cutouts and small.sources == cache.sources
    assert td.shrink_cache(cache, 400).images[0] is cache.images[0]  # nothing to shrink


def test_the_pack_long_side_is_part_of_the_key_and_checked(tmp_path):
    base = {"classes": ["person"], "sources": [{"name": "s", "path": "p", "format": "yolo"}]}
    same = td.split_key(td.DataConfig.from_dict(base), "train")
    assert td.split_key(td.DataConfig.from_dict({**base, "pack_long_side": 224}), "train") == same
    assert td.split_key(td.DataConfig.from_dict({**base, "pack_long_side": 192}), "train") != same
    for bad in (16, 300):
        with pytest.raises(td.ConfigError, match="pack_long_side"):
            td.DataConfig.from_dict({**base, "pack_long_side": bad})


def test_a_stale_or_foreign_pack_is_refused_with_the_remedy(tmp_path):
    cache = _rect_cache(2)
    td.pack_cache(cache, tmp_path / "p.npz", "k1")
    with pytest.raises(td.ConfigError, match="another data config or split.*train.pack"):
        td.load_packed(tmp_path / "p.npz", "k2")
    td.save_cache(cache, tmp_path / "raw.npz")
    with pytest.raises(td.ConfigError, match="not a version-1 packed cache"):
        td.load_packed(tmp_path / "raw.npz", "k1")
    with pytest.raises(td.ConfigError, match="no packed cache here"):
        td.load_packed(tmp_path / "absent.npz", "k1")
    with pytest.raises(td.ConfigError, match="quality"):
        td.pack_cache(cache, tmp_path / "q.npz", "k1", quality=20)


def test_split_key_names_the_data_not_where_it_lives(tmp_path):
    base = td.DataConfig(classes=("person",), sources=(td.SourceConfig("a", "a", "yolo"),), root=str(tmp_path / "r1"))
    moved = replace(base, root=str(tmp_path / "r2"))
    assert td.split_key(base, "train") == td.split_key(moved, "train")
    assert td.split_key(base, "train") != td.split_key(base, "val")
    assert td.split_key(base, "train") != td.split_key(replace(base, cache_long_side=160), "train")
    assert td.split_key(base, "train") != td.split_key(replace(base, classes=("person", "dog")), "train")


@pytest.mark.parametrize("augment", [True, False])
def test_sources_then_warp_is_make(augment):
    """The worker half and the device half together give exactly the one-process batch."""
    cache = _with_cutout(_rect_cache(6, seed=2))
    cfg = AugmentConfig(mosaic=0.5, copy_paste=0.5)
    x, t = BatchMaker(cache, cfg, 96, 80, seed=7).make(range(6), augment)
    m = BatchMaker(cache, cfg, 96, 80, seed=7)
    canvases, params, tg = m.sources(range(6), augment)
    y = m.warp(torch.from_numpy(canvases), torch.from_numpy(params), augment)
    assert torch.equal(x, y)
    assert torch.equal(t, torch.from_numpy(tg))


def test_epoch_batches_are_full_disjoint_and_seeded():
    a = epoch_batches(50, 8, seed=3, epoch=0)
    assert len(a) == 6 and all(len(b) == 8 for b in a)
    flat = np.concatenate(a)
    assert len(set(flat.tolist())) == 48 and flat.max() < 50
    assert all(np.array_equal(p, q) for p, q in zip(a, epoch_batches(50, 8, 3, 0), strict=True))
    assert not np.array_equal(np.concatenate(epoch_batches(50, 8, 3, 1)), flat)  # each epoch reshuffles


def _batches(loader, n):
    try:
        return [loader.get() for _ in range(n)]
    finally:
        loader.close()


@pytest.mark.parametrize("workers", [1, 2])
def test_worker_batches_are_valid_and_reproducible(workers):
    cache = _rect_cache(12, seed=5)
    cfg = AugmentConfig(mosaic=0.3, copy_paste=0.0)

    def run():
        return _batches(WorkerBatches(BatchMaker(cache, cfg, 64, 64), len(cache), 4, 0, workers), 5)

    first, again = run(), run()
    for (x, t), (x2, t2) in zip(first, again, strict=True):
        assert x.shape == (4, 1, 64, 64) and bool((x == x.round()).all())
        assert len(t) == 0 or (t[:, 0].min() >= 0 and t[:, 0].max() < 4)
        assert torch.equal(x, x2) and torch.equal(t, t2)
    assert not torch.equal(first[0][0], first[1][0])


def test_thread_and_worker_batches_both_cover_the_epoch_in_whole_batches():
    cache = _rect_cache(12, seed=6)
    cfg = AugmentConfig(mosaic=0.0, copy_paste=0.0)
    for loader in (
        Prefetch(BatchMaker(cache, cfg, 64, 64), len(cache), 4, 0),
        WorkerBatches(BatchMaker(cache, cfg, 64, 64), len(cache), 4, 0, 2),
    ):
        got = _batches(loader, 3)
        # No mosaic, no paste: each sample keeps its own two boxes unless the zoom pushes one out of view.
        assert all(x.shape[0] == 4 and len(t) <= 8 for x, t in got)
        assert sum(len(t) for _, t in got) > 0


def test_trainer_trains_from_a_pack_with_workers_and_refuses_a_stale_one(tmp_path, capsys):
    cfg_path = _config(tmp_path)
    dc = load_config(cfg_path)["data"]
    packed = tmp_path / "carry"
    for split in ("train", "val"):
        td.pack_cache(td.cached_split(dc, split), packed / f"{split}.npz", td.split_key(dc, split))
    args = ["--config", str(cfg_path), "--float-twin", "--no-export", "--packed", str(packed)]
    assert cli.main([*args, "--set", "train.workers=2", "--out", str(tmp_path / "f")]) == 0
    assert (tmp_path / "f" / "best.pt").is_file()
    (packed / "val.npz").replace(packed / "train.npz")  # the wrong split under the train name
    assert cli.main([*args, "--out", str(tmp_path / "g")]) == 78
    assert "another data config or split" in capsys.readouterr().err


def test_bad_loader_settings_are_config_errors(tmp_path, capsys):
    cfg_path = _config(tmp_path)
    for bad in ("model.widths=[8,x]", "model.res_blocks=99", "train.workers=-1", "train.batch_size=0"):
        assert cli.main(["--config", str(cfg_path), "--set", bad, "--no-export", "--out", str(tmp_path / "x")]) == 78
    assert "workers >= 0" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_gpu_script_runs_both_stages_from_a_pack_and_returns_the_checkpoints(tmp_path):
    """train/gpu.sh as a CUDA machine runs it (CPU here, tiny config): what comes back is what export needs."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    cfg_path = _config(tmp_path)
    dc = load_config(cfg_path)["data"]
    for split in ("train", "val"):
        td.pack_cache(td.cached_split(dc, split), tmp_path / "carry" / f"{split}.npz", td.split_key(dc, split))
    env = {**os.environ, "PY": sys.executable, "CONFIG": str(cfg_path), "CARRY": str(tmp_path / "carry"),
           "RUNS": str(tmp_path / "runs"), "OUT": str(tmp_path / "out"), "WORKERS": "1", "BATCH": "8",
           "FLOAT_MIN": "1", "BINARY_MIN": "1", "MODEL_ARGS": "--set model.res_blocks=1"}
    proc = subprocess.run(["bash", str(root / "train" / "gpu.sh")], cwd=root, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    back = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert back == ["binary-best.pt", "binary-curves.png", "binary-history.json", "binary.log",
                    "float-best.npz", "float-history.json", "float.log"]  # seven files, each small
    # The batches were made from the resident cache, and each stage says how fast it trained.
    for stage in ("float", "binary"):
        log = (tmp_path / "out" / f"{stage}.log").read_text()
        assert "batches: made on cpu, the cache resident there" in log and "training images/s" in log
    _, kept = load_checkpoint(tmp_path / "out" / "float-best.npz")  # the compact teacher reads back
    assert not kept["config"]["model"]["binary"]
    _, ck = load_checkpoint(tmp_path / "out" / "binary-best.pt")
    assert ck["config"]["model"]["binary"] and "done:" in (tmp_path / "out" / "binary.log").read_text()
    assert ck["config"]["model"]["res_blocks"] == 1  # MODEL_ARGS reached both stages (the binary inits from the twin)
    assert ck["config"]["train"]["precision"] == "bf16"  # gpu.sh trains in bfloat16 unless PRECISION says not


def test_workers_that_cannot_start_fall_back_to_the_thread(monkeypatch):
    cache = _rect_cache(12, seed=7)
    cfg = AugmentConfig(mosaic=0.0, copy_paste=0.0)

    def no_shm(self):
        raise RuntimeError("unable to write to file </torch_1_2>: No space left on device")

    said = []
    ok = start(BatchMaker(cache, cfg, 64, 64), len(cache), 4, 0, 2, log=said.append)
    assert type(ok).__name__ == "_First" and not said
    first = _batches(ok, 2)
    assert first[0][0].shape == (4, 1, 64, 64) and not torch.equal(first[0][0], first[1][0])
    monkeypatch.setattr(WorkerBatches, "get", no_shm)
    loader = start(BatchMaker(cache, cfg, 64, 64), len(cache), 4, 0, 2, log=said.append)
    assert isinstance(loader, Prefetch) and "No space left" in said[0] and "one thread" in said[0]
    assert _batches(loader, 1)[0][0].shape == (4, 1, 64, 64)


def test_kept_freed_memory_stops_the_page_faults_of_every_step():
    """The same 64 MB allocated and freed 60 times: fresh page faults each time by default, not after."""
    import subprocess
    import sys

    probe = (
        "import resource, sys, torch\n"
        "torch.set_num_threads(1)\n"  # other threads' first touches made the count vary by up to 4 rounds
        "from train.train import keep_freed_memory\n"
        "ok = keep_freed_memory() if sys.argv[1] == 'keep' else None\n"
        "torch.ones(16 << 20)\n"
        "r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "for _ in range(60):\n"
        "    torch.ones(16 << 20).sum()\n"
        "print(ok, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)\n"
    )
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]

    def faults(mode):
        out = subprocess.run([sys.executable, "-c", probe, mode], cwd=root, capture_output=True, text=True, check=True)
        ok, n = out.stdout.split()
        return ok, int(n)

    ok, kept = faults("keep")
    if ok != "True":
        pytest.skip("not glibc on Linux: mallopt is not there to set")
    _, default = faults("default")
    assert default > 60 * 10000  # every 64 MB tensor faults its 16k pages in again
    # A few rounds while the heap settles (0 to 4 measured, whatever the count of allocations), not one
    # per allocation: with 20 allocations the bound of a fifth failed at random, so the probe makes 60.
    assert kept < default / 5


def test_the_carry_budget_counts_the_tracked_files(tmp_path):
    import subprocess

    from train.pack import CODE_ALLOWANCE, tree_bytes

    assert tree_bytes(tmp_path) == CODE_ALLOWANCE  # not a git checkout: the fixed allowance
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "a.bin").write_bytes(b"x" * 3000)
    (tmp_path / "untracked.bin").write_bytes(b"x" * 5000)
    subprocess.run(["git", "-C", str(tmp_path), "add", "a.bin"], check=True)
    assert tree_bytes(tmp_path) == 3000
