"""Train the binary detector (or its float twin), then export and evaluate it.

    python -m train.train --config train/configs/person.toml [--float-twin] [--minutes M] [--smoke]

Seeded; checkpoints carry their config (torch.save of tensors and plain data,
loaded with weights_only=True). A time budget ends the run on time: the
learning-rate schedule runs on the fraction of the budget (or of the epochs)
used, whichever is larger, so a short budget still anneals.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from train.augment import AugmentConfig, BatchMaker, no_augment
from train.batches import start as start_batches
from train.data import (
    ConfigError,
    DataConfig,
    LoadReport,
    batch_plan,
    cached_split,
    load_packed,
    load_toml,
    repo_root,
    split_key,
    strict,
)
from train.ema import WeightAverage
from train.loss import YoloLoss, kmeans_anchors
from train.model import BConv, Detector, ModelConfig, ResBConv

RECAL_BATCHES = 16  # training batches over which the averaged weights' BatchNorm statistics are recomputed
FP32_TAIL = 0.9  # with precision "bf16", the share of the schedule after which training runs in float32


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    batch_size: int = 32
    epochs: int = 300
    minutes: float = 45.0
    float_minutes: float = 0.0  # the float twin's budget (0 = minutes)
    float_lr: float = 0.0  # the float twin's peak learning rate (0 = lr)
    lr: float = 0.002
    weight_decay: float = 0.0005
    warmup_steps: int = 200
    threads: int = 2
    workers: int = 0  # 0: batches from one helper thread; N: N worker processes (a GPU machine's cores)
    val_every_minutes: float = 10.0
    out_dir: str = "runs/person"
    export_to: str = "models/person.xnc"
    box_gain: float = 0.15
    obj_gain: float = 1.0
    cls_gain: float = 0.05
    grad_clip: float = 10.0
    max_steps: int = 0  # 0 = no limit (smoke runs set it)
    init_from: str = ""  # checkpoint (e.g. the float twin's best.pt) whose weights start this run
    teacher: str = ""  # checkpoint whose head the binary net is distilled from (with distill > 0)
    distill: float = 0.0  # gain of the distillation loss (0 = off)
    # Gain of attention transfer on the real stream (0 = off): each real-stream layer's spatial map of mean squared
    # activation, normalised, is pulled towards the teacher's (Zagoruyko & Komodakis 2017; Real-to-Binary,
    # Martinez et al. 2020). The head term alone passes the twin's answers, this passes where it looks.
    # Needs a teacher of the same topology.
    distill_attention: float = 0.0
    # "bf16": the training forwards (student and teacher) under bfloat16 autocast, where the CPU or GPU has it,
    # except after FP32_TAIL of the schedule (the last tenth): the final weights and BatchNorm statistics, which export folds
    # into the shipped thresholds, are then settled in the float32 arithmetic that export and validation use.
    precision: str = "fp32"
    # Decay of an exponential moving average of the weights (0 = off). When on, validation, checkpoints and export
    # use the averaged weights, with BatchNorm statistics recomputed for them (train/ema.py says why).
    ema: float = 0.0
    # Train through torch.compile's graph of the student and teacher (inductor): on this 2-core CPU 1.27x the steps
    # per second of eager training with a teacher, after a minute of compiling at the start (and again when the
    # float32 tail begins; make bench-train: 1.57x per model step). If compiling fails, training goes on eagerly.
    compile: bool = False

    def __post_init__(self):
        if not (self.distill >= 0.0 and math.isfinite(self.distill)):
            raise ConfigError(f"train.distill must be a finite gain >= 0 (0 = off) (got {self.distill})")
        if not (self.distill_attention >= 0.0 and math.isfinite(self.distill_attention)):
            raise ConfigError(f"train.distill_attention must be a finite gain >= 0 (got {self.distill_attention})")
        if self.distill_attention > 0 and not self.distill > 0:
            raise ConfigError("train.distill_attention > 0 needs a teacher: set train.distill > 0 and train.teacher")
        if not (self.ema == 0.0 or 0.0 < self.ema < 1.0):
            raise ConfigError(f"train.ema must be 0 (off) or a decay in (0, 1) (got {self.ema})")
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError(f"train.precision must be fp32 or bf16 (got {self.precision!r})")
        if self.batch_size < 1 or self.workers < 0 or self.threads < 1:
            raise ConfigError(
                f"train: batch_size and threads must be >= 1 and workers >= 0 "
                f"(got {self.batch_size}, {self.threads}, {self.workers})"
            )


def load_config(path) -> dict:
    raw = load_toml(path)
    unknown = sorted(set(raw) - {"data", "model", "train", "augment"})
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {unknown}")
    return {
        "data": DataConfig.from_dict(raw.get("data", {})),
        "model": strict(ModelConfig, raw.get("model", {}), "model"),
        "train": strict(TrainConfig, raw.get("train", {}), "train"),
        "augment": strict(AugmentConfig, raw.get("augment", {}), "augment"),
    }


def config_dict(cfg: dict) -> dict:
    """Plain JSON-able form (for checkpoints and model metadata)."""

    def plain(x):
        if isinstance(x, tuple):
            return [plain(v) for v in x]
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        return x

    return {k: plain(asdict(v)) for k, v in cfg.items()}


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


def _repo_path(p) -> Path:
    p = Path(p)
    return p if p.is_absolute() or p.exists() else repo_root() / p


def init_from_float(model, state: dict, log=print, from_binary: bool = False, src_cfg: dict | None = None):
    """Start a binary net from its float twin's weights (Bi-Real / ReActNet's two-stage recipe).

    Tensors of matching shape are copied. Latent binary weights are scaled per output channel
    into [-1, 1], where the straight-through gradient is alive; their signs are the float signs.
    ``from_binary``: the source is a trained binary net (a warm start, e.g. before added Bi-Real
    blocks): its latent weights are already in range and its BatchNorms expect their scale, so
    they are copied as they are. Layers the source lacks keep their own start (identity blocks).
    ``src_cfg``: the source's model config; a source one bits bconv longer and one block shorter
    is promoted (:func:`promote_last_bconv`).
    """
    own = model.state_dict()
    # The head is always the last layer: blocks added before it shift its index, not its meaning.
    last = lambda keys: max(int(k.split(".")[1]) for k in keys if k.startswith("layers."))  # noqa: E731
    src_head, own_head = f"layers.{last(state)}.", f"layers.{last(own)}."
    state = {(own_head + k[len(src_head) :] if k.startswith(src_head) else k): v for k, v in state.items()}
    copied = [k for k, v in state.items() if k in own and own[k].shape == v.shape]
    for k in copied:
        own[k] = state[k].clone()
    model.load_state_dict(own)
    if not from_binary:
        with torch.no_grad():
            for m in model.layers:
                if isinstance(m, BConv) and m.binary:
                    m.weight.div_(m.weight.abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12))
    source = "binary net" if from_binary else "float twin"
    log(f"init: {len(copied)} of {len(own)} tensors from the {source}")
    if src_cfg is not None and _is_promotion(src_cfg, model.cfg):
        promote_last_bconv(model, log)


# How small the promoted layer's real output starts: small enough that the new shortcut barely
# moves the stream, large enough that Adam grows it within a few hundred steps.
PROMOTE_EPS = 1.0 / 16


def _is_promotion(src: dict, own) -> bool:
    """The source's last bits bconv becomes the real-output one, its real-output bconv a Bi-Real block."""
    sw, ow = tuple(src.get("widths", ())), tuple(own.widths)
    return (
        len(sw) == len(ow) + 1
        and len(sw) >= 5  # the default net pools after two bconvs: a shorter source pools after its last
        and sw[:-1] == ow
        and sw[-1] == sw[-2]
        and own.res_blocks == src.get("res_blocks", 0) + 1
        and bool(src.get("binary")) == own.binary
    )


def promote_last_bconv(model, log=print):
    """Give the source's last bits bconv a real shortcut around the layer after it (Bi-Real).

    The layer list keeps its length and tensor names: layer i, once a bits bconv, now outputs
    r = BN(α·y) as real, and layer i+1, once the real-output bconv, becomes r + BN(bconv(sign r)).
    Scaling layer i's BN affine by PROMOTE_EPS keeps sign(r), so layer i+1 sees the same input,
    and makes the shortcut's r small, so the network starts close to the source. The float twin's
    ReLU passes ε·r on, so the next BN's running statistics are rescaled to match.
    """
    layers = list(model.layers)
    i = next(j for j, m in enumerate(layers) if isinstance(m, BConv) and m.real_output and not isinstance(m, ResBConv))
    promoted, block = layers[i], layers[i + 1]
    with torch.no_grad():
        promoted.bn.weight.mul_(PROMOTE_EPS)
        promoted.bn.bias.mul_(PROMOTE_EPS)
        if not model.cfg.binary:
            block.bn.running_mean.mul_(PROMOTE_EPS)
            block.bn.running_var.mul_(PROMOTE_EPS**2)
    log(f"init: layer {i} promoted to the real stream (shortcut scale {PROMOTE_EPS}) around layer {i + 1}")


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, num_anchors: int) -> torch.Tensor:
    """Head distillation: objectness as soft BCE targets, and box/class outputs where the teacher sees an object."""
    import torch.nn.functional as F

    from train.loss import split_head

    s, t = split_head(student, num_anchors), split_head(teacher, num_anchors)
    t_obj = t[..., 4].sigmoid()
    obj = F.binary_cross_entropy_with_logits(s[..., 4], t_obj)
    rest = torch.cat([s[..., :4], s[..., 5:]], -1).sigmoid() - torch.cat([t[..., :4], t[..., 5:]], -1).sigmoid()
    box = (t_obj * rest.pow(2).sum(-1)).sum() / t_obj.sum().clamp_min(1.0)
    return obj + box


def real_stream_layers(model) -> list:
    """Indices of the layers whose output is the real stream: the real-output bconv and every Bi-Real block."""
    return [i for i, m in enumerate(model.layers) if isinstance(m, BConv) and m.real_output]


def attention_map(r: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H·W): mean squared activation over channels, scaled to unit length per image."""
    a = r.float().pow(2).mean(1).flatten(1)
    return a / a.norm(dim=1, keepdim=True).clamp_min(1e-12)


def attention_loss(student: list, teacher: list) -> torch.Tensor:
    """Mean over layers and images of the squared distance between the two nets' attention maps (0..4)."""
    per = [(attention_map(s) - attention_map(t)).pow(2).sum(1).mean() for s, t in zip(student, teacher, strict=True)]
    return torch.stack(per).mean()


def letterbox_wh(cache, width, height) -> np.ndarray:
    """Box sizes in input pixels as the letterbox would scale them (for anchors)."""
    out = []
    for img, b in zip(cache.images, cache.boxes, strict=True):
        if len(b):
            s = min(width / img.shape[1], height / img.shape[0])
            out.append((b[:, 2:] - b[:, :2]) * s)
    return np.concatenate(out) if out else np.zeros((0, 2))


@torch.no_grad()
def predict_cache(model, cache, width, height, anchors, batch=64):
    """Detections (in cached-image pixels) for every cached image, decoded by the runtime's app.decode."""
    from app.decode import decode
    from app.preprocess import Letterbox

    model.eval()
    maker = BatchMaker(cache, no_augment(), width, height)
    dets = []
    for start in range(0, len(cache), batch):
        idx = list(range(start, min(len(cache), start + batch)))
        canvases, params, _ = maker.sources(idx, augment=False)
        dev = next(model.parameters()).device
        x = maker.warp(torch.from_numpy(canvases).to(dev), torch.from_numpy(params), augment=False)
        head = model(x).permute(0, 2, 3, 1).contiguous().cpu().numpy()
        for k, i in enumerate(idx):
            h, w = cache.images[i].shape
            s = min(width / w, height / h)
            lb = Letterbox(s, (width - round(w * s)) // 2, (height - round(h * s)) // 2)
            dets.append(decode(head[k], anchors, (width, height), lb, (h, w), score_threshold=0.005))
    return dets


def validate(model, cache, cfg, anchors, num_classes) -> dict:
    from evaluation.metrics import coco_metrics, precision_recall

    m = cfg["model"]
    dets = predict_cache(model, cache, m.input_width, m.input_height, anchors)
    gts = list(zip(cache.boxes, cache.classes, strict=True))
    out = coco_metrics(gts, dets, num_classes, [im.shape for im in cache.images])
    out["precision"], out["recall"] = precision_recall(gts, dets, 0.25)
    return out


def save_checkpoint(path, model, cfg, anchors, class_names, extra):
    torch.save(
        {
            "model": model.state_dict(),
            "config": config_dict(cfg),
            "anchors": np.asarray(anchors, np.float32).tolist(),
            "class_names": list(class_names),
            **extra,
        },
        path,
    )


def load_checkpoint(path):
    """(model in eval mode, checkpoint dict). weights_only=True: nothing is unpickled."""
    ck = torch.load(path, map_location="cpu", weights_only=True)
    model = Detector(ModelConfig(**ck["config"]["model"]), num_classes=len(ck["class_names"]))
    model.load_state_dict(ck["model"])
    model.eval()
    return model, ck


def plot_curves(history, out_png):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    steps = [h["step"] for h in history["train"]]
    for key in ("loss", "box", "obj"):
        vals = [h[key] for h in history["train"]]
        if key == "loss":
            k = max(1, len(vals) // 50)
            vals = np.convolve(vals, np.ones(k) / k, mode="same")
        ax[0].plot(steps, vals, label=key)
    ax[0].set_yscale("log")
    ax[0].set_xlabel("step")
    ax[0].legend()
    ax[0].set_title("training loss")
    if history["val"]:
        vs = [h["step"] for h in history["val"]]
        ax[1].plot(vs, [h["map50"] for h in history["val"]], "o-", label="mAP@0.5")
        ax[1].plot(vs, [h["map50_95"] for h in history["val"]], "o-", label="mAP@0.5:0.95")
        ax[1].legend()
    ax[1].set_xlabel("step")
    ax[1].set_title("validation (cached val images)")
    fig.tight_layout()
    fig.savefig(out_png, dpi=90)
    plt.close(fig)


def plot_pr(metrics: dict, out_png, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot(metrics["pr_recall"], metrics["pr_precision"])
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(f"{title}: AP@0.5 = {metrics['map50']:.3f}")
    fig.tight_layout()
    fig.savefig(out_png, dpi=90)
    plt.close(fig)


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
        group = {s.name: (s.group or s.name) for s in dc.sources}
        for s in train_cache.sources:
            counts[group[s]] += 1
        log("data: every batch " + ", ".join(f"{share:.0%} {g} ({counts[g]} images)" for g, share in dc.mix.items()))
    if len(train_cache) < tc.batch_size:
        raise ConfigError(f"only {len(train_cache)} training images, fewer than batch_size {tc.batch_size}")

    nc = len(dc.classes)
    model = Detector(mc, nc).to(device)
    if mc.real_act:
        log(f"probe: layers {list(mc.real_act)} keep real activations (hardtanh); this net cannot be exported")
    if mc.ternary:
        log(f"ternary: layers {list(mc.ternary)} have ternary activations (two sign planes each on the Pi)")
    teacher = None
    # The anchors the starting or teaching head was trained with: its channels mean nothing without them.
    inherited = None

    def checkpoint(what, path):
        p = _repo_path(path)
        if not p.is_file():
            raise ConfigError(f"{what}: {path} does not exist (train the float twin first: --float-twin)")
        return p

    if tc.distill > 0:
        if not tc.teacher:
            raise ConfigError("train.distill > 0 needs train.teacher (a checkpoint)")
        teacher, tck = load_checkpoint(checkpoint("train.teacher", tc.teacher))
        teacher, inherited = teacher.to(device), tck["anchors"]
        log(f"distilling from {tc.teacher} (gain {tc.distill})")
    at_layers = real_stream_layers(model) if tc.distill_attention > 0 else []
    if at_layers:
        if real_stream_layers(teacher) != at_layers or [m.out_ch for m in teacher.layers if isinstance(m, BConv)] != [
            m.out_ch for m in model.layers if isinstance(m, BConv)
        ]:
            raise ConfigError(f"train.distill_attention needs a teacher of the same topology; {tc.teacher} differs")
        log(f"attention transfer on layers {at_layers} (gain {tc.distill_attention})")
    if tc.init_from and resume is None:
        ck = torch.load(checkpoint("train.init_from", tc.init_from), map_location="cpu", weights_only=True)
        src_cfg = ck.get("config", {}).get("model", {})
        init_from_float(model, ck["model"], log, from_binary=bool(src_cfg.get("binary")), src_cfg=src_cfg)
        inherited = ck["anchors"]
        log(f"weights from {tc.init_from}")
    if resume is not None:
        ck = torch.load(resume, map_location="cpu", weights_only=True)
        model.load_state_dict(ck["model"])
        anchors = np.asarray(ck["anchors"], np.float32)
        prior = {k: ck.get(k, 0) for k in ("step", "wall_s", "epochs")}
        log(f"resumed from {resume} (step {ck.get('step')}), its anchors kept")
    else:
        prior = {"step": 0, "wall_s": 0.0, "epochs": 0.0}
        if inherited is not None:
            anchors = np.asarray(inherited, np.float32)
        else:
            wh = letterbox_wh(train_cache, mc.input_width, mc.input_height)
            anchors = kmeans_anchors(wh, mc.num_anchors, tc.seed)
    log(f"anchors (input px): {np.round(anchors, 1).tolist()}")
    crit = YoloLoss(anchors, model.stride, nc, tc.box_gain, tc.obj_gain, tc.cls_gain)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        # Latent binary weights only carry a sign: decay would just pull them across zero.
        binary_latent = mc.binary and name.endswith("weight") and p.dim() == 4 and "conv" not in name
        (no_decay if p.dim() == 1 or binary_latent else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=tc.lr
    )
    steps_per_epoch = len(train_cache) // tc.batch_size
    total_steps = tc.epochs * steps_per_epoch
    if tc.max_steps:
        total_steps = min(total_steps, tc.max_steps)
    budget = tc.minutes * 60.0
    maker = BatchMaker(train_cache, cfg["augment"], mc.input_width, mc.input_height, seed=tc.seed)
    pre = start_batches(maker, batch_plan(dc, train_cache), tc.batch_size, tc.seed, tc.workers, device, log)
    history = {"train": [], "val": []}
    best = -1.0
    if tc.precision == "bf16":
        log(f"precision: training forwards in bfloat16 autocast on {device.type}; validation and export in float32")
    kind = "binary" if mc.binary else "float"
    ema = WeightAverage(model, tc.ema) if tc.ema else None
    if ema is not None:
        log(f"weights: exponential moving average (decay {tc.ema}) is what is validated, saved and exported")

    fwd, teacher_fwd = model, teacher
    if tc.compile:
        fwd = torch.compile(model)
        teacher_fwd = torch.compile(teacher) if teacher is not None else None
        log("compile: training forwards through torch.compile (compiling at the first step)")

    def run(net, x):
        """(head, the real stream's layer outputs) of one forward; the layers only when attention is matched."""
        if not at_layers:
            return net(x), []
        head, outs = net(x, trace=True)
        return head, [outs[i] for i in at_layers]

    def step_loss(x, tg, amp):
        with amp:
            head, stream = run(fwd, x)
        head = head.float()
        loss, parts = crit(head, tg)
        if teacher is not None:
            with torch.no_grad(), amp:
                t_head, t_stream = run(teacher_fwd, x)
            kd = distill_loss(head, t_head.float(), mc.num_anchors)
            loss = loss + tc.distill * kd * tc.batch_size
            parts["kd"] = float(kd.detach())
            if at_layers:
                at = attention_loss(stream, t_stream)
                loss = loss + tc.distill_attention * at * tc.batch_size
                parts["at"] = float(at.detach())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        return loss, parts

    def settled():
        """The network to validate and save: the live one, or the average with its BatchNorm statistics recomputed."""
        if ema is None:
            return model
        ema.recalibrate(pre.get()[0].to(device) for _ in range(RECAL_BATCHES))
        return ema.model

    t0 = last_val = time.time()
    step = 0
    bar = tqdm(total=total_steps, desc=f"train {kind}", dynamic_ncols=True, mininterval=2.0)
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
            bar.set_postfix(
                loss=f"{rec['loss']:.3f}",
                box=f"{parts['box']:.3f}",
                obj=f"{parts['obj']:.4f}",
                ep=f"{step / steps_per_epoch:.1f}",
                left=f"{int(left // 60)}:{int(left % 60):02d}",
            )
            bar.update(1)
            if time.time() - last_val > tc.val_every_minutes * 60 and len(val_cache):
                net = settled()
                v = validate(net, val_cache, cfg, anchors, nc)
                last_val = time.time()
                history["val"].append({"step": step, "map50": v["map50"], "map50_95": v["map50_95"]})
                bar.write(f"val @ step {step}: mAP50 {v['map50']:.4f} mAP50-95 {v['map50_95']:.4f}")
                save_checkpoint(out_dir / "last.pt", net, cfg, anchors, dc.classes, {"step": step, "val": v["map50"]})
                if v["map50"] > best:
                    best = v["map50"]
                    save_checkpoint(out_dir / "best.pt", net, cfg, anchors, dc.classes, {"step": step, "val": best})
        wall = time.time() - t0
        net = settled()
    finally:
        bar.close()
        pre.close()
    final = validate(net, val_cache, cfg, anchors, nc) if len(val_cache) else {"map50": 0.0, "map50_95": 0.0}
    history["val"].append({"step": step, "map50": final["map50"], "map50_95": final["map50_95"]})
    log(
        f"done: {step} steps ({step / max(1, steps_per_epoch):.2f} epochs) in {wall / 60:.1f} min on {device}; "
        f"val (cached) mAP50 {final['map50']:.4f} mAP50-95 {final['map50_95']:.4f}"
    )
    extra = {
        "step": step,
        "val": final["map50"],
        "wall_s": wall,
        "epochs": step / max(1, steps_per_epoch),
        "device": str(device),
        "threads": tc.threads,
    }
    if resume is not None:
        # Totals over both phases, so the model card reports the whole training.
        extra["resumed_from"] = str(resume)
        extra["phase_steps"], extra["phase_wall_s"] = step, wall
        extra["total_steps"] = int(prior["step"]) + step
        extra["wall_s"] = float(prior["wall_s"]) + wall
        extra["epochs"] = float(prior["epochs"]) + extra["epochs"]
    save_checkpoint(out_dir / "last.pt", net, cfg, anchors, dc.classes, extra)
    if final["map50"] >= best:
        save_checkpoint(out_dir / "best.pt", net, cfg, anchors, dc.classes, extra)
    with open(out_dir / "history.json", "w") as f:
        json.dump({**history, "summary": {k: v for k, v in extra.items()}}, f)
    plot_curves(history, out_dir / "curves.png")
    return {"model": net, "anchors": anchors, "final": final, **extra}


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m train.train", description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="train/configs/person.toml")
    ap.add_argument("--float-twin", action="store_true", help="train the float twin (same topology, real values)")
    ap.add_argument("--minutes", type=float, help="time budget override")
    ap.add_argument("--out", help="output folder override")
    ap.add_argument("--threads", type=int, help="torch threads override")
    ap.add_argument("--workers", type=int, help="batch-making worker processes override (0 = one thread)")
    ap.add_argument("--batch-size", type=int, help="batch size override")
    ap.add_argument("--val-every", type=float, help="minutes between validations override")
    ap.add_argument("--packed", help="train from python -m train.pack's folder instead of the datasets")
    ap.add_argument("--widths", help="model widths override, e.g. 64,64,128,256,256")
    ap.add_argument("--res-blocks", type=int, help="Bi-Real blocks before the head override")
    ap.add_argument(
        "--real-act",
        help="probe: layer indices whose sign becomes hardtanh (binary weights kept; not exportable), e.g. 0,2",
    )
    ap.add_argument(
        "--ternary",
        help="layer indices whose activations are ternary (-1, 0, +1: two sign planes at runtime), e.g. 0,2,4",
    )
    ap.add_argument("--lr", type=float, help="peak learning rate override")
    ap.add_argument("--precision", choices=("fp32", "bf16"), help="training forwards in float32 or bfloat16 autocast")
    ap.add_argument(
        "--ema", type=float, help="decay of a moving average of the weights, which is then what is saved (0 = off)"
    )
    ap.add_argument(
        "--compile", action="store_true", help="train through torch.compile (faster steps after a minute of compiling)"
    )
    ap.add_argument("--resume", help="continue from this checkpoint (weights and anchors; new schedule)")
    ap.add_argument("--init-from", help="start from this checkpoint's weights (e.g. the float twin's best.pt)")
    ap.add_argument("--teacher", help="distil the head from this checkpoint (sets train.distill to 1 if it is 0)")
    ap.add_argument("--distill", type=float, help="gain of the distillation loss override (0 = off)")
    ap.add_argument(
        "--distill-attention", type=float, help="gain of attention transfer on the real stream (same-topology teacher)"
    )
    ap.add_argument(
        "--augment",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one [augment] setting, e.g. --augment mosaic=0.1 (repeatable)",
    )
    ap.add_argument("--smoke", action="store_true", help="a few steps on a few images: checks the pipeline")
    ap.add_argument("--no-export", action="store_true", help="skip export and evaluation after training")
    ap.add_argument(
        "--eval-only", action="store_true", help="no training: export and evaluate OUT/best.pt (or --checkpoint)"
    )
    ap.add_argument(
        "--checkpoint",
        choices=("best", "last"),
        default="best",
        help="which checkpoint of OUT to export and evaluate: the one validation picked, or the last (default best)",
    )
    ap.add_argument("--export-to", help="model file to write (default: train.export_to of the config)")
    return ap


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        cfg = _overridden(load_config(args.config), args)
    except ConfigError as e:
        print(f"config: {e}", file=sys.stderr)
        return 78
    out = Path(args.out) if args.out else repo_root() / cfg["train"].out_dir
    if args.float_twin and not args.out:
        out = out.with_name(out.name + "-float")
    if not args.eval_only:
        try:
            train(cfg, out, resume=args.resume, packed=args.packed)
        except ConfigError as e:
            print(f"config: {e}", file=sys.stderr)
            return 78
    return _export_and_evaluate(cfg, out, args, argv)


def _overridden(cfg: dict, args) -> dict:
    """The config with the command line's overrides applied (ConfigError when one is out of range)."""
    try:
        if args.widths:
            cfg["model"] = replace(cfg["model"], widths=tuple(int(v) for v in args.widths.split(",")))
        if args.res_blocks is not None:
            cfg["model"] = replace(cfg["model"], res_blocks=args.res_blocks)
        if args.real_act:
            cfg["model"] = replace(cfg["model"], real_act=tuple(int(v) for v in args.real_act.split(",")))
        if args.ternary:
            cfg["model"] = replace(cfg["model"], ternary=tuple(int(v) for v in args.ternary.split(",")))
        if args.float_twin:
            # The twin of a net with ternary layers is the same float net: ternary is an activation of
            # the binary net only, so one MODEL_ARGS can serve both stages (train/gpu.sh).
            cfg["model"] = replace(cfg["model"], binary=False, ternary=())
        if cfg["model"].real_act or cfg["model"].ternary:
            Detector(cfg["model"])  # a layer that takes no sign, from the flag or the file, before any data loads
    except ValueError as e:
        raise ConfigError(f"model: {e}") from e
    if args.float_twin:
        # The twin is the yardstick and the binary net's starting point: it starts from nothing.
        tc = cfg["train"]
        cfg["train"] = replace(
            tc,
            init_from="",
            teacher="",
            distill=0.0,
            distill_attention=0.0,
            minutes=tc.float_minutes or tc.minutes,
            lr=tc.float_lr or tc.lr,
        )
    if args.minutes is not None:
        cfg["train"] = replace(cfg["train"], minutes=args.minutes)
    if args.threads:
        cfg["train"] = replace(cfg["train"], threads=args.threads)
    if args.lr:
        cfg["train"] = replace(cfg["train"], lr=args.lr)
    if args.precision:
        cfg["train"] = replace(cfg["train"], precision=args.precision)
    if args.ema is not None:
        cfg["train"] = replace(cfg["train"], ema=args.ema)
    if args.compile:
        cfg["train"] = replace(cfg["train"], compile=True)
    for flag, field in (("workers", "workers"), ("batch_size", "batch_size"), ("val_every", "val_every_minutes")):
        if getattr(args, flag) is not None:
            cfg["train"] = replace(cfg["train"], **{field: getattr(args, flag)})
    if args.init_from:
        cfg["train"] = replace(cfg["train"], init_from=args.init_from)
    if args.teacher:
        cfg["train"] = replace(cfg["train"], teacher=args.teacher, distill=cfg["train"].distill or 1.0)
    if args.distill is not None:
        cfg["train"] = replace(cfg["train"], distill=args.distill)
    if args.distill_attention is not None:
        cfg["train"] = replace(cfg["train"], distill_attention=args.distill_attention)
    if args.augment:
        cfg["augment"] = augment_overridden(cfg["augment"], args.augment)
    if args.smoke:
        srcs = tuple(replace(s, limit=40) for s in cfg["data"].sources)
        cfg["data"] = replace(cfg["data"], sources=srcs, cache_file="")
        cfg["train"] = replace(cfg["train"], max_steps=6, batch_size=8, val_every_minutes=1e9)
    return cfg


def augment_overridden(aug: AugmentConfig, items: list) -> AugmentConfig:
    """``aug`` with the command line's KEY=VALUE settings; ConfigError names a bad key, value or range."""
    return strict(AugmentConfig, {**asdict(aug), **_augment_overrides(items)}, "--augment")


def _augment_overrides(items: list) -> dict:
    """{key: float} from KEY=VALUE strings (unknown keys and ranges are checked by AugmentConfig)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        try:
            out[key.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise ConfigError(f"--augment: expected KEY=NUMBER, got {item!r}")
    return out


def _export_and_evaluate(cfg: dict, out: Path, args, argv) -> int:
    if args.no_export or args.smoke:
        return 0
    if cfg["model"].real_act:
        # A probe has no integer form; its checkpoints and curves are the result.
        print(f"probe (--real-act): not exported; checkpoints and curves are in {out}")
        return 0
    if cfg["model"].binary:
        from app.detector import Detector as RuntimeDetector
        from evaluation.datasets import validation_split
        from evaluation.score import EVAL_SCORE_THRESHOLD, evaluate
        from train.export import export_checkpoint

        target = Path(args.export_to) if args.export_to else repo_root() / cfg["train"].export_to
        export_checkpoint(
            out / f"{args.checkpoint}.pt", target, command=" ".join(["python -m train.train", *(argv or sys.argv[1:])])
        )
        print(f"exported {target}")
        from train.export import calibrate_score_threshold

        thr, f1, p, r = calibrate_score_threshold(target, cfg["data"])
        # The exported file through the runtime Detector: the numbers the Pi would get.
        det = RuntimeDetector(target, score_threshold=EVAL_SCORE_THRESHOLD)
        on = det.model.metadata["score_threshold_calibration"]["on"]  # training images when the split drops none
        print(f"default score threshold {thr} (F1 {f1:.3f}, P {p:.3f}, R {r:.3f} on {on})")
        m = evaluate(det.detect, validation_split(), list(det.class_names), det.model.score_threshold)
        title = "binary (runtime)"
    else:
        from train.export import evaluate_torch

        m = evaluate_torch(out / f"{args.checkpoint}.pt")
        title = "float twin (torch)"
    plot_pr(m, out / "pr.png", title)
    summary = {k: m[k] for k in ("map50", "map50_95", "images", "precision", "recall", "frames_found", "upright_found")}
    (out / "metrics.json").write_text(json.dumps(summary))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
