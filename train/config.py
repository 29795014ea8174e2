"""The training config: a TOML file of four tables, changed for one run by ``--set`` and ``--augment``.

    [data]     DataConfig (train/data.py): classes, sources, split file, per-group batch shares
    [model]    ModelConfig (train/model.py): input size, widths, Bi-Real blocks, ternary layers
    [train]    TrainConfig (below): schedule, warm start, teacher, precision, moving average
    [augment]  AugmentConfig (train/augment.py)

``--set SECTION.KEY=VALUE`` sets one key as if the file said it; VALUE is a
TOML value, and a string key also takes a bare word (nothing after ``=`` is the
empty string)::

    --set train.lr=3e-4  --set model.ternary=[2,4]  --set train.precision=bf16
    --set data.mix={person=0.4, everyday=0.35, empty=0.25}

An unknown section or key, a value that is not TOML or not of the key's type,
and a value out of range are a ``ConfigError`` naming the key (exit 78), before
any data loads.
"""

from __future__ import annotations

import math
import tomllib
import typing
from dataclasses import dataclass, fields, replace

from train.augment import AugmentConfig
from train.data import ConfigError, DataConfig, load_toml, strict
from train.model import Detector, ModelConfig


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
    # Where batches are made: "cpu" (numpy on a helper thread or `workers` processes, warped on the device) or
    # "device" (the whole cache resident on the training device, every augmentation there: train/device_batches.py;
    # what a GPU needs to be fed thousands of images a second).
    batches: str = "cpu"
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
    # "bf16": the training forwards (student and teacher) under bfloat16 autocast, where the CPU or GPU has it,
    # except for the last tenth of the schedule (train.FP32_TAIL): the final weights and BatchNorm statistics, which
    # export folds into the shipped thresholds, are then settled in the float32 arithmetic export and validation use.
    precision: str = "fp32"
    # Decay of an exponential moving average of the weights (0 = off). When on, validation, checkpoints and export
    # use the averaged weights, with BatchNorm statistics recomputed for them (train/ema.py says why).
    ema: float = 0.0
    # Train through torch.compile's graph of the student and teacher (inductor): on a 2-core CPU 1.27x the steps
    # per second of eager training with a teacher, after a minute of compiling at the start (and again when the
    # float32 tail begins; make bench-train: 1.57x per model step). If compiling fails, training goes on eagerly.
    compile: bool = False

    def __post_init__(self):
        if not (self.distill >= 0.0 and math.isfinite(self.distill)):
            raise ConfigError(f"train.distill must be a finite gain >= 0 (0 = off) (got {self.distill})")
        if not (self.ema == 0.0 or 0.0 < self.ema < 1.0):
            raise ConfigError(f"train.ema must be 0 (off) or a decay in (0, 1) (got {self.ema})")
        if self.batches not in ("cpu", "device"):
            raise ConfigError(f"train.batches must be cpu or device (got {self.batches!r})")
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError(f"train.precision must be fp32 or bf16 (got {self.precision!r})")
        if self.batch_size < 1 or self.workers < 0 or self.threads < 1:
            raise ConfigError(
                f"train: batch_size and threads must be >= 1 and workers >= 0 "
                f"(got {self.batch_size}, {self.threads}, {self.workers})"
            )


SECTIONS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig, "augment": AugmentConfig}


def load_config(path, sets=(), augment=()) -> dict:
    """{section: frozen config} from a TOML file, with ``--set`` items and ``--augment`` KEY=NUMBER items applied."""
    raw = load_toml(path)
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {unknown}")
    for item in sets:
        section, key, value = parse_set(item)
        raw.setdefault(section, {})[key] = value
    for key, value in parse_augment(augment).items():
        raw.setdefault("augment", {})[key] = value
    return {
        "data": DataConfig.from_dict(raw.get("data", {})),
        "model": strict(ModelConfig, raw.get("model", {}), "model"),
        "train": strict(TrainConfig, raw.get("train", {}), "train"),
        "augment": strict(AugmentConfig, raw.get("augment", {}), "augment"),
    }


def parse_set(item: str) -> tuple:
    """(section, key, value) of one ``SECTION.KEY=VALUE``; the value's type is checked when the config is built."""
    name, sep, text = item.partition("=")
    section, dot, key = name.strip().partition(".")
    if not (sep and dot and key):
        raise ConfigError(f"--set {item!r}: expected SECTION.KEY=VALUE, e.g. train.lr=3e-4")
    if section not in SECTIONS:
        raise ConfigError(f"--set {name}: no section {section!r}; sections: {sorted(SECTIONS)}")
    kinds = typing.get_type_hints(SECTIONS[section])
    known = {f.name for f in fields(SECTIONS[section])}
    if key not in known:
        raise ConfigError(f"--set {name}: [{section}] has no key {key!r}; keys: {sorted(known)}")
    try:
        return section, key, tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        if kinds[key] is str and "\n" not in text:  # a bare word, or nothing: the empty string
            return section, key, text.strip()
        raise ConfigError(f"--set {name}: {text!r} is not a TOML value") from None


def parse_augment(items) -> dict:
    """{key: float} from ``--augment`` KEY=NUMBER items (keys and ranges are checked by AugmentConfig)."""
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


def set_keys(sets) -> set:
    """The ``section.key`` names a list of ``--set`` items sets."""
    return {item.partition("=")[0].strip() for item in sets}


def float_twin(cfg: dict, explicit=frozenset()) -> dict:
    """The float twin's config: the same network in real values, trained from nothing.

    The twin is the yardstick and the binary net's starting point: no warm start, teacher or
    distillation, and ``train.float_minutes`` and ``train.float_lr`` where they are set. It has no
    ternary layers (ternary is an activation of the binary net), so one set of model settings
    serves both stages. A train key named in ``explicit`` (set on the command line) keeps its value.
    """
    tc = cfg["train"]
    derived = {
        "init_from": "",
        "teacher": "",
        "distill": 0.0,
        "minutes": tc.float_minutes or tc.minutes,
        "lr": tc.float_lr or tc.lr,
    }
    derived = {k: v for k, v in derived.items() if f"train.{k}" not in explicit}
    return {**cfg, "model": replace(cfg["model"], binary=False, ternary=()), "train": replace(tc, **derived)}


def smoke(cfg: dict) -> dict:
    """A few steps on a few images: checks the pipeline, not the model."""
    sources = tuple(replace(s, limit=40) for s in cfg["data"].sources)
    return {
        **cfg,
        "data": replace(cfg["data"], sources=sources, cache_file=""),
        "train": replace(cfg["train"], max_steps=6, batch_size=8, val_every_minutes=1e9),
    }


def check_model(cfg: dict) -> None:
    """Build the network once, so a model setting it cannot take stops the run before any data loads."""
    try:
        Detector(cfg["model"], len(cfg["data"].classes))
    except (ValueError, TypeError) as e:
        raise ConfigError(f"model: {e}") from None
