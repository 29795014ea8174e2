"""The training loop: data, a start, steps on a time budget, validation, checkpoints.

    python -m train.train [--float-twin] [--set SECTION.KEY=VALUE ...]   (the command: train/cli.py)

Seeded. A time budget ends the run on time: the learning-rate schedule runs on
the fraction of the budget (or of the epochs) used, whichever is larger, so a
short budget still anneals. Checkpoints (train/checkpoints.py) are written at
each validation (last.pt, and best.pt when cached validation mAP@0.5 improves)
and at the end.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from train.augment import BatchMaker
from train.batches import start as start_batches
from train.checkpoints import save_checkpoint
from train.data import ConfigError, LoadReport, batch_plan, cached_split, group_of, load_packed, split_key
from train.device_batches import DeviceBatches
from train.ema import WeightAverage
from train.loss import YoloLoss, kmeans_anchors, split_head
from train.model import Detector
from train.report import plot_curves, validate
from train.warmstart import start as warm_start

RECAL_BATCHES = 16  # training batches over which the averaged weights' BatchNorm statistics are recomputed
FP32_TAIL = 0.9  # with precision "bf16", the share of the schedule after which training runs in float32


def train(cfg: dict, out_dir: Path, log=print, resume=None, packed=None) -> dict:
    """Train from scratch, or continue from checkpoint ``resume`` (its weights and anchors, a fresh schedule).

    ``packed``: a folder from ``python -m train.pack`` (train.npz, val.npz) to read instead of the datasets.
    """
    tc, mc, dc = cfg["train"], cfg["model"], cfg["data"]
    torch.set_num_threads(tc.threads)
    if keep_freed_memory():
        log("memory: freed blocks stay in the heap (glibc mallopt), not page-faulted back every step")
    seed_everything(tc.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick its fastest kernels once
    out_dir.mkdir(parents=True, exist_ok=True)
    train_cache, val_cache = load_data(dc, packed, log)
    if len(train_cache) < tc.batch_size:
        raise ConfigError(f"only {len(train_cache)} training images, fewer than batch_size {tc.batch_size}")

    # The network and where it starts.
    nc = len(dc.classes)
    model = Detector(mc, nc).to(device)
    if mc.ternary:
        log(f"ternary: layers {list(mc.ternary)} have ternary activations (two sign planes each on the Pi)")
    start = warm_start(model, tc, resume, device, log)
    teacher = start.teacher
    if start.anchors is not None:
        anchors = start.anchors
    else:
        anchors = kmeans_anchors(letterbox_wh(train_cache, mc.input_width, mc.input_height), mc.num_anchors, tc.seed)
    log(f"anchors (input px): {np.round(anchors, 1).tolist()}")

    # Loss, optimiser, schedule, batches.
    crit = YoloLoss(anchors, model.stride, nc, tc.box_gain, tc.obj_gain, tc.cls_gain)
    opt = optimiser(model, tc)
    steps_per_epoch = len(train_cache) // tc.batch_size
    total_steps = tc.epochs * steps_per_epoch
    if tc.max_steps:
        total_steps = min(total_steps, tc.max_steps)
    budget = tc.minutes * 60.0
    plan = batch_plan(dc, train_cache)
    if tc.batches == "device":
        pre = DeviceBatches(train_cache, cfg["augment"], mc.input_width, mc.input_height, plan, tc.batch_size,
                            tc.seed, device)
        log(f"batches: made on {device}, the cache resident there ({pre.maker.c.nbytes / 2**20:.0f} MiB)")
    else:
        maker = BatchMaker(train_cache, cfg["augment"], mc.input_width, mc.input_height, seed=tc.seed)
        pre = start_batches(maker, plan, tc.batch_size, tc.seed, tc.workers, device, log)
    history = {"train": [], "val": []}
    best = -1.0
    if tc.precision == "bf16":
        log(f"precision: training forwards in bfloat16 autocast on {device.type}; validation and export in float32")
    ema = WeightAverage(model, tc.ema) if tc.ema else None
    if ema is not None:
        log(f"weights: exponential moving average (decay {tc.ema}) is what is validated, saved and exported")
    fwd, teacher_fwd = model, teacher
    if tc.compile:
        fwd = torch.compile(model)
        teacher_fwd = torch.compile(teacher) if teacher is not None else None
        log("compile: training forwards through torch.compile (compiling at the first step)")

    def step_loss(x, tg, amp):
        with amp:
            head = fwd(x)
        head = head.float()
        loss, parts = crit(head, tg)
        if teacher is not None:
            with torch.no_grad(), amp:
                t_head = teacher_fwd(x)
            kd = distill_loss(head, t_head.float(), mc.num_anchors)
            loss = loss + tc.distill * kd * tc.batch_size
            parts["kd"] = float(kd.detach())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        return loss, parts

    def settled():
        """The network to validate and save: the live one, or the average with its BatchNorm statistics recomputed."""
        if ema is None:
            return model
        ema.recalibrate(pre.get()[0].to(device) for _ in range(RECAL_BATCHES))
        return ema.model

    def save(name, net, extra):
        save_checkpoint(out_dir / name, net, cfg, anchors, dc.classes, extra)

    # The loop.
    from tqdm import tqdm

    t0 = last_val = time.time()
    step = 0
    val_s = 0.0  # time spent validating, which images/s leaves out
    bar = tqdm(total=total_steps, desc=f"train {'binary' if mc.binary else 'float'}", dynamic_ncols=True,
               mininterval=2.0)
    try:
        while step < total_steps:
            elapsed = time.time() - t0
            progress = max(step / total_steps, elapsed / budget)
            if progress >= 1.0:
                break
            warm = min(1.0, (step + 1) / max(1, tc.warmup_steps))
            lr = tc.lr * warm * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * progress)))
            for g in opt.param_groups:
                g["lr"] = lr
            model.train()
            x, tg = pre.get()
            x = x.to(device)
            tg = tg.to(device)
            amp = torch.autocast(device.type, torch.bfloat16, enabled=tc.precision == "bf16" and progress < FP32_TAIL)
            try:
                loss, parts = step_loss(x, tg, amp)
            except Exception as e:  # noqa: BLE001 - any compiler failure: the eager step below says if it was ours
                if fwd is model:
                    raise
                # Compiling happens at the first step and again when the float32 tail starts: either may fail.
                log(f"compile: failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); training eagerly")
                fwd, teacher_fwd = model, teacher
                loss, parts = step_loss(x, tg, amp)
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            opt.step()
            model.clip_latent()
            if ema is not None:
                ema.update(model)
            step += 1
            rec = {"step": step, "loss": float(loss.detach()) / tc.batch_size, **parts, "lr": lr, "t": time.time() - t0}
            history["train"].append(rec)
            left = max(0.0, min(budget - (time.time() - t0), (time.time() - t0) / max(step, 1) * (total_steps - step)))
            ips = step * tc.batch_size / max(1e-9, time.time() - t0 - val_s)
            bar.set_postfix(
                img_s=f"{ips:.0f}",
                loss=f"{rec['loss']:.3f}",
                box=f"{parts['box']:.3f}",
                obj=f"{parts['obj']:.4f}",
                ep=f"{step / steps_per_epoch:.1f}",
                left=f"{int(left // 60)}:{int(left % 60):02d}",
            )
            bar.update(1)
            if time.time() - last_val > tc.val_every_minutes * 60 and len(val_cache):
                t_val = time.time()
                net = settled()
                v = validate(net, val_cache, cfg, anchors, nc)
                last_val = time.time()
                val_s += last_val - t_val
                history["val"].append({"step": step, "map50": v["map50"], "map50_95": v["map50_95"]})
                bar.write(f"val @ step {step}: mAP50 {v['map50']:.4f} mAP50-95 {v['map50_95']:.4f}")
                save("last.pt", net, {"step": step, "val": v["map50"]})
                if v["map50"] > best:
                    best = v["map50"]
                    save("best.pt", net, {"step": step, "val": best})
        wall = time.time() - t0
        images_per_s = step * tc.batch_size / max(1e-9, wall - val_s)
        net = settled()
    finally:
        bar.close()
        pre.close()

    # The end: a last validation, the checkpoints with the run's totals, history and curves.
    final = validate(net, val_cache, cfg, anchors, nc) if len(val_cache) else {"map50": 0.0, "map50_95": 0.0}
    history["val"].append({"step": step, "map50": final["map50"], "map50_95": final["map50_95"]})
    log(
        f"done: {step} steps ({step / max(1, steps_per_epoch):.2f} epochs) in {wall / 60:.1f} min on {device}; "
        f"{images_per_s:.0f} training images/s; val (cached) mAP50 {final['map50']:.4f} mAP50-95 {final['map50_95']:.4f}"
    )
    if isinstance(pre, DeviceBatches):
        log(f"batches: made at {pre.images_per_s:.0f} images/s on {device} (the maker alone)")
    extra = {
        "step": step,
        "val": final["map50"],
        "wall_s": wall,
        "epochs": step / max(1, steps_per_epoch),
        "device": str(device),
        "threads": tc.threads,
        "images_per_s": images_per_s,
    }
    if resume is not None:
        # Totals over both phases, so the model card reports the whole training.
        prior = start.prior
        extra["resumed_from"] = str(resume)
        extra["phase_steps"], extra["phase_wall_s"] = step, wall
        extra["total_steps"] = int(prior["step"]) + step
        extra["wall_s"] = float(prior["wall_s"]) + wall
        extra["epochs"] = float(prior["epochs"]) + extra["epochs"]
    save("last.pt", net, extra)
    if final["map50"] >= best:
        save("best.pt", net, extra)
    with open(out_dir / "history.json", "w") as f:
        json.dump({**history, "summary": dict(extra)}, f)
    plot_curves(history, out_dir / "curves.png")
    return {"model": net, "anchors": anchors, "final": final, **extra}


def load_data(dc, packed, log):
    """(train cache, val cache): from a ``python -m train.pack`` folder, or cached from the datasets."""
    from tqdm import tqdm

    t_data = time.time()
    report = LoadReport()
    if packed is not None:
        train_cache = load_packed(Path(packed) / "train.npz", split_key(dc, "train"))
        val_cache = load_packed(Path(packed) / "val.npz", split_key(dc, "val"))
        log(f"data: packed caches from {packed}")
    else:
        train_cache = cached_split(dc, "train", report, progress=lambda x: tqdm(x, desc="cache train", leave=False))
        val_cache = cached_split(dc, "val", report, progress=lambda x: tqdm(x, desc="cache val", leave=False))
    for p in report.problems[:20]:
        log(f"data: {p}")
    if len(report.problems) > 20:
        log(f"data: ... {len(report.problems) - 20} more problems")
    log(
        f"data: train {len(train_cache)} images ({sum(map(len, train_cache.boxes))} boxes, "
        f"{len(train_cache.cutouts)} cut-outs), val {len(val_cache)} images; {time.time() - t_data:.1f}s"
    )
    if dc.mix:
        counts = {g: 0 for g in dc.mix}
        group = {s.name: group_of(s) for s in dc.sources}
        for s in train_cache.sources:
            counts[group[s]] += 1
        log("data: every batch " + ", ".join(f"{share:.0%} {g} ({counts[g]} images)" for g, share in dc.mix.items()))
    return train_cache, val_cache


def optimiser(model, tc):
    """AdamW, with no weight decay on BatchNorm and biases, nor on latent binary weights."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        # Latent binary weights only carry a sign: decay would just pull them across zero.
        binary_latent = model.cfg.binary and name.endswith("weight") and p.dim() == 4 and "conv" not in name
        (no_decay if p.dim() == 1 or binary_latent else decay).append(p)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=tc.lr
    )


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, num_anchors: int) -> torch.Tensor:
    """Head distillation: objectness as soft BCE targets, and box/class outputs where the teacher sees an object."""
    import torch.nn.functional as F

    s, t = split_head(student, num_anchors), split_head(teacher, num_anchors)
    t_obj = t[..., 4].sigmoid()
    obj = F.binary_cross_entropy_with_logits(s[..., 4], t_obj)
    rest = torch.cat([s[..., :4], s[..., 5:]], -1).sigmoid() - torch.cat([t[..., :4], t[..., 5:]], -1).sigmoid()
    box = (t_obj * rest.pow(2).sum(-1)).sum() / t_obj.sum().clamp_min(1.0)
    return obj + box


def letterbox_wh(cache, width, height) -> np.ndarray:
    """Box sizes in input pixels as the letterbox would scale them (for anchors)."""
    out = []
    for img, b in zip(cache.images, cache.boxes, strict=True):
        if len(b):
            s = min(width / img.shape[1], height / img.shape[0])
            out.append((b[:, 2:] - b[:, :2]) * s)
    return np.concatenate(out) if out else np.zeros((0, 2))


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of returning it to the kernel; True if it applied.

    Every training step frees and reallocates the same tens of megabytes of activations and
    canvases. By default glibc serves those from fresh mmaps and unmaps them when freed, so
    each step faults every page in again: 200k page faults a second, over half the CPU time
    in the kernel on the 2-core machines. With mmap off and trimming pushed out of reach,
    ``make bench-train`` measures the step 1.45x faster (sys 2.2 s -> 0.01 s per 8 steps); the
    whole binary stage makes 1.3x the steps in the same time.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name or sys.platform != "linux":
        return False
    try:
        libc = ctypes.CDLL(name)
        m_trim_threshold, m_mmap_max = -1, -4  # from glibc's malloc.h
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))
    except (OSError, AttributeError):  # not glibc (musl has no mallopt): the default is only slower
        return False


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


if __name__ == "__main__":
    from train.cli import main

    sys.exit(main())
