"""Training batches, made while the model trains: a helper thread, or worker processes for a GPU.

Both give ``(x, targets)``: ``x`` float32 (B,1,H,W) grey levels on ``device``,
``targets`` (M,6) b,cls,x1,y1,x2,y2 on the CPU (the loss builds its grid there).

- :class:`Prefetch` (``train.workers = 0``): one thread makes whole batches on the
  CPU. Right for the 2-core machines: torch ops release the GIL.
- :class:`WorkerBatches` (``train.workers = N``): N processes run the numpy half
  (:meth:`BatchMaker.sources`: canvases, mosaic, copy-paste, boxes); the main
  process warps on ``device``. A GPU eats thousands of images a second, which
  one Python thread cannot place on canvases.

Either way every epoch is a fresh seeded permutation, cut into whole batches, or
with a :class:`Mix` the images of each group (person sets, everyday scenes,
person-free images) fill a fixed share of every batch, whatever their counts.
"""

from __future__ import annotations

import queue
import threading

import numpy as np
import torch

from train.augment import BatchMaker


class Mix:
    """Every batch takes a fixed share of its images from each group (``data.mix``).

    An epoch is still len(images) // batch batches. Each group is walked in its own seeded
    permutation, starting a fresh one when it runs out, so a small group repeats more often
    and a large one less, but within a group no image repeats before all have been seen.
    A share that is not a whole number of images in a batch is rounded per batch at random
    (largest remainders), so over many batches each group gets its share exactly.
    """

    def __init__(self, groups, shares):
        self.groups = np.asarray(groups, np.int64)
        self.shares = np.asarray(shares, np.float64)
        if self.groups.ndim != 1 or len(self.shares) == 0 or self.groups.min(initial=0) < 0:
            raise ValueError("Mix needs one group index (>= 0) per image and one share per group")
        if self.groups.max(initial=-1) >= len(self.shares):
            raise ValueError(f"Mix: group {self.groups.max()} has no share (only {len(self.shares)} given)")
        if (self.shares < 0).any() or not np.isclose(self.shares.sum(), 1.0):
            raise ValueError(f"Mix: shares must be >= 0 and sum to 1, got {self.shares.tolist()}")
        counts = np.bincount(self.groups, minlength=len(self.shares))
        empty = [g for g in range(len(self.shares)) if self.shares[g] > 0 and counts[g] == 0]
        if empty:
            raise ValueError(f"Mix: group(s) {empty} have a share but no images")

    def __len__(self):
        return len(self.groups)

    def batches(self, batch: int, seed: int, epoch: int) -> list:
        rng = np.random.default_rng([seed, epoch, 1])
        members = [np.flatnonzero(self.groups == g) for g in range(len(self.shares))]
        n_batches = len(self.groups) // batch
        want = self.shares * batch
        per = np.zeros((n_batches, len(want)), np.int64)
        for b in range(n_batches):
            k = np.floor(want).astype(np.int64)
            frac = want - k
            short = batch - int(k.sum())
            if short:
                k[rng.choice(len(want), short, replace=False, p=frac / frac.sum())] += 1
            per[b] = k
        streams = []
        for g, idx in enumerate(members):
            need = int(per[:, g].sum())
            if need == 0:
                streams.append(np.zeros(0, np.int64))
                continue
            laps = -(-need // len(idx))
            streams.append(np.concatenate([idx[rng.permutation(len(idx))] for _ in range(laps)])[:need])
        out, used = [], np.zeros(len(members), np.int64)
        for b in range(n_batches):
            parts = []
            for g in range(len(members)):
                parts.append(streams[g][used[g] : used[g] + per[b, g]])
                used[g] += per[b, g]
            out.append(rng.permutation(np.concatenate(parts)))
        return out


def epoch_batches(plan, batch: int, seed: int, epoch: int) -> list:
    """The index batches of one epoch: of ``plan`` images, a permutation seeded by (seed, epoch) with the
    ragged end dropped; or, when ``plan`` is a :class:`Mix`, batches that keep its shares."""
    if isinstance(plan, Mix):
        return plan.batches(batch, seed, epoch)
    n = int(plan)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return [perm[s : s + batch] for s in range(0, n - batch + 1, batch)]


class Prefetch:
    """Makes augmented batches on a helper thread while the model trains."""

    def __init__(self, maker: BatchMaker, n: int | Mix, batch: int, seed: int, depth: int = 3, device="cpu"):
        self.maker, self.n, self.batch, self.seed = maker, n, batch, seed
        self.device = torch.device(device)
        self.q: queue.Queue = queue.Queue(depth)
        self.stop = False
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self):
        epoch = 0
        while not self.stop:
            for idx in epoch_batches(self.n, self.batch, self.seed, epoch):
                if self.stop:
                    return
                try:
                    item = self.maker.make(idx)
                except Exception as exc:  # noqa: BLE001 - reported in the main thread, never kills the epoch silently
                    item = exc
                self.q.put(item)
            epoch += 1

    def get(self):
        item = self.q.get()
        if isinstance(item, Exception):
            raise item
        x, tg = item
        return x.to(self.device), tg

    def close(self):
        self.stop = True
        while not self.q.empty():
            self.q.get_nowait()


class _Sources(torch.utils.data.IterableDataset):
    """Each worker makes every ``workers``-th batch of each epoch with its own seeded BatchMaker."""

    def __init__(self, maker: BatchMaker, n: int | Mix, batch: int, seed: int):
        self.maker, self.n, self.batch, self.seed = maker, n, batch, seed

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        self.maker.rng = np.random.default_rng([self.seed, 1000 + wid])
        epoch = 0
        while True:
            for k, idx in enumerate(epoch_batches(self.n, self.batch, self.seed, epoch)):
                if k % nw == wid:
                    canvases, params, tg = self.maker.sources(idx)
                    jitter_seed = int(self.maker.rng.integers(1 << 62))
                    yield torch.from_numpy(canvases), torch.from_numpy(params), torch.from_numpy(tg), jitter_seed
            epoch += 1


class WorkerBatches:
    """Worker processes place the images; the warp and jitter run here, on ``device``."""

    def __init__(self, maker: BatchMaker, n: int | Mix, batch: int, seed: int, workers: int, device="cpu"):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.maker, self.device = maker, torch.device(device)
        self.loader = torch.utils.data.DataLoader(
            _Sources(maker, n, batch, seed),
            batch_size=None,
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
            prefetch_factor=2,  # each batch is B x 448 x 448 bytes of shared memory
            persistent_workers=False,
        )
        self.it = iter(self.loader)

    def get(self):
        canvases, params, tg, jitter_seed = next(self.it)
        canvases = canvases.to(self.device, non_blocking=True)
        return self.maker.warp(canvases, params, augment=True, seed=int(jitter_seed)), tg

    def close(self):
        # Ends the worker processes (the iterator's shutdown), so a finished run leaves none behind.
        del self.it


class _First:
    """A started loader whose first batch was already taken (to prove the workers run)."""

    def __init__(self, loader, first):
        self.loader, self.first = loader, first

    def get(self):
        if self.first is not None:
            item, self.first = self.first, None
            return item
        return self.loader.get()

    def close(self):
        self.loader.close()


def start(maker: BatchMaker, n: int | Mix, batch: int, seed: int, workers: int, device="cpu", log=print):
    """The batch source for ``workers``; worker processes that cannot start fall back to the thread.

    A container's small /dev/shm, say, fails the first batch; a slow run beats a lost one.
    """
    if not workers:
        return Prefetch(maker, n, batch, seed, device=device)
    loader = None
    try:
        loader = WorkerBatches(maker, n, batch, seed, workers, device)
        return _First(loader, loader.get())
    except (RuntimeError, OSError) as exc:
        if loader is not None:
            loader.close()
        log(f"batches: {workers} worker processes failed ({type(exc).__name__}: {exc}); one thread makes them instead")
        return Prefetch(maker, n, batch, seed, device=device)
