"""Start training again from a model file: the torch net whose eval forward is the file's.

Checkpoints live in git-ignored ``runs/`` and do not outlive a machine; the model
file in ``models/`` does. It keeps what the Pi needs, not what training needs:
the signs of the latent weights (not their size) and integer thresholds (not
BatchNorm statistics). So this rebuilds a Detector in three steps:

1. the topology from the layer list (refused unless the trainer builds exactly it);
2. weights: stem q / 127 (the stem's quantiser gives q back, since export puts
   ±127 in every channel), latent binary weights sign·``latent`` (small, so
   they can still flip), the head as it is;
3. BatchNorms: running statistics measured on real training batches (the ones
   training-mode BN will see), then the affine chosen so that eval mode keeps
   the file's function: a bits channel crosses zero half-way between its
   threshold and the next integer (so the exporter's fold gives the threshold
   back whatever the float rounding), and a real channel is scale·y + bias.

Re-exporting the result gives the file back: weights, thresholds and flips
exactly, scale and bias to float32 rounding; :func:`check_round_trip` proves it.

    python -m train.from_model models/person.xnc runs/imported/last.pt
    python -m train.train --set train.init_from=runs/imported/last.pt ...
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from app import bits
from app.modelfile import Model, ModelFormatError, read_model
from train.model import TERNARY_D, BConv, Detector, Head, ModelConfig, Pool, ResBConv, Stem

# Size of every latent binary weight. The file keeps only signs. Small enough that a weight
# the gradient keeps pushing flips within ~100 Adam steps at lr 1e-3, as a trained net's
# near-zero latents do; all equal, so no weight is favoured by chance.
LATENT = 0.05
STEM_Q = 127.0  # train.model.Stem.quantised maps each channel's largest |w| to ±127


def _layer_sig(m) -> tuple:
    if isinstance(m, Stem):
        return ("stem", m.kernel, m.stride, m.in_ch, m.out_ch)
    if isinstance(m, Pool):
        return ("maxpool2",)
    if isinstance(m, ResBConv):
        return ("rbconv", m.kernel, m.stride, m.in_ch, m.out_ch)
    if isinstance(m, BConv):
        return ("bconv", m.kernel, m.stride, m.in_ch, m.out_ch, "real" if m.real_output else "bits")
    if isinstance(m, Head):
        return ("head", m.conv.in_channels, m.conv.out_channels)
    raise TypeError(type(m).__name__)


def _file_sig(layer) -> tuple:
    p = layer.params
    if layer.op == "maxpool2":
        return ("maxpool2",)
    if layer.op == "head":
        return ("head", p["in_ch"], p["out_ch"])
    sig = (layer.op, p["kernel"], p["stride"], p["in_ch"], p["out_ch"])
    # The topology, not the activations: a ternary output is a packed one like bits (config.ternary says which).
    return sig + ("real" if p["output"] == "real" else "bits",) if layer.op == "bconv" else sig


def _is_ternary(layer) -> bool:
    """Whether the layer's own sign is ternary: a stem's or bconv's output, an rbconv's input."""
    key = "input" if layer.op == "rbconv" else "output"
    return layer.params.get(key) == "ternary"


def config_of(model: Model) -> ModelConfig:
    """The trainer's config for a model file's network; ValueError if the trainer builds another one."""
    convs = [ly for ly in model.layers if ly.op in ("stem", "bconv")]
    for i, ly in enumerate(model.layers):
        band = ly.params.get("band")
        if band is not None and np.float32(band) != np.float32(TERNARY_D):
            raise ValueError(f"layer {i}: ternary band {band}, but the trainer's is {TERNARY_D}")
    cfg = ModelConfig(
        input_width=model.input_width,
        input_height=model.input_height,
        channels=model.channels,
        widths=tuple(ly.params["out_ch"] for ly in convs),
        num_anchors=model.num_anchors,
        binary=True,
        res_blocks=sum(ly.op == "rbconv" for ly in model.layers),
    )
    built = [_layer_sig(m) for m in Detector(cfg, model.num_classes).layers]
    found = [_file_sig(ly) for ly in model.layers]
    if built != found:
        at = next((i for i, (a, b) in enumerate(zip(built, found, strict=False)) if a != b), min(len(built), len(found)))
        raise ValueError(
            f"layer {at}: the file has {found[at] if at < len(found) else 'nothing'}, the trainer builds "
            f"{built[at] if at < len(built) else 'nothing'} for widths {list(cfg.widths)}; "
            "only networks the trainer builds can be trained further"
        )
    return replace(cfg, ternary=tuple(i for i, ly in enumerate(model.layers) if _is_ternary(ly)))


def _threshold_affine(thr, flip, alpha, mean, var, eps):
    """(gamma, beta) putting BN(alpha·y) = 0 half-way past each threshold, with the given statistics."""
    t = thr.astype(np.float64)
    sd = np.sqrt(var + eps)
    up = flip == 0
    gamma = np.where(up, 1.0, -1.0)
    y0 = np.where(up, t - 0.5, t + 0.5)  # bit 0 (+1) iff y >= t (flip 0) or y <= t (flip 1)
    beta = -gamma * (y0 * alpha - mean) / sd
    # A constant channel (sentinel threshold) is a flat BN whose bias says which constant.
    always_plus = np.where(up, thr == bits.INT32_MIN, thr == bits.INT32_MAX)
    always_minus = np.where(up, thr == bits.INT32_MAX, thr == bits.INT32_MIN)
    const = always_plus | always_minus
    gamma = np.where(const, 0.0, gamma)
    beta = np.where(always_plus, 1.0, np.where(always_minus, -1.0, beta))
    return gamma, beta


def _ternary_affine(thr, flip, alpha, mean, var, eps, y_min, y_max):
    """(gamma, beta) of a ternary layer: BN(alpha·y) crosses -d and +d where the lo and hi planes switch.

    Each plane's rule (2, C) is read over the reachable y in [y_min, y_max]: always +1, never +1, or
    switching half-way past its threshold. A plane that never switches is given a crossing just outside
    the range, so one line through both crossings serves every channel; a channel whose planes never
    switch is a flat BN at -2d, 0 or +2d.
    """
    d = TERNARY_D
    n = thr.shape[1]
    gamma, beta = np.zeros(n), np.zeros(n)
    sd = np.sqrt(var + eps)
    for c in range(n):
        lo_y, hi_y = float(y_min[c]), float(y_max[c])
        states = []
        for p in range(2):
            t, up = float(thr[p, c]), flip[p, c] == 0
            if up:
                states.append("all" if t <= lo_y else "none" if t > hi_y else (t - 0.5, 1))
            else:
                states.append("all" if t >= hi_y else "none" if t < lo_y else (t + 0.5, -1))
        moving = [st for st in states if isinstance(st, tuple)]
        if not moving:
            level = {("all", "all"): 2 * d, ("all", "none"): 0.0, ("none", "none"): -2 * d}.get(tuple(states))
            if level is None:
                raise ValueError(f"channel {c}: the hi plane is +1 where the lo plane is -1")
            beta[c] = level
            continue
        direction = moving[0][1]
        if any(st[1] != direction for st in moving):
            raise ValueError(f"channel {c}: the two planes switch in opposite directions")
        outside = {("all", 1): lo_y - 0.5, ("none", 1): hi_y + 0.5, ("all", -1): hi_y + 0.5, ("none", -1): lo_y - 0.5}
        c_lo, c_hi = (st[0] if isinstance(st, tuple) else outside[st, direction] for st in states)
        if (c_hi - c_lo) * direction < 0:
            raise ValueError(f"channel {c}: the hi plane is +1 where the lo plane is -1")
        if c_hi == c_lo:  # no zero band: both planes switch between the same two integers
            c_lo, c_hi = c_lo - 0.25 * direction, c_hi + 0.25 * direction
        slope = 2 * d / (c_hi - c_lo)  # z per unit of y
        gamma[c] = slope * sd[c] / alpha
        beta[c] = slope * (mean[c] / alpha - c_lo) - d
    return gamma, beta


def _candidates(m, in_ternary: bool):
    """(ys, valid): every integer pre-activation a stem or bconv can produce, per channel, (N, C)."""
    if isinstance(m, Stem):
        from train.export import stem_range

        lo, hi = stem_range(m)
        n = int((hi - lo).max()) + 1
        ys = lo[None, :] + torch.arange(n, dtype=torch.int64)[:, None]
        return ys.numpy(), (ys <= hi[None, :]).numpy()
    k = m.kernel * m.kernel * m.in_ch
    cand = np.arange(-k, k + 1) if in_ternary else k - 2 * np.arange(k + 1)
    ys = np.repeat(cand[:, None], m.out_ch, axis=1)
    return ys, np.ones_like(ys, dtype=bool)


def _set_bn(bn, gamma, beta, mean, var):
    with torch.no_grad():
        for name, v in (("weight", gamma), ("bias", beta), ("running_mean", mean), ("running_var", var)):
            getattr(bn, name).copy_(torch.as_tensor(np.asarray(v, np.float64), dtype=torch.float32))


def from_model(model: Model, latent: float = LATENT, stats: dict | None = None) -> Detector:
    """A Detector (eval mode) computing the model file's network.

    ``stats``: {layer index: (mean, var)} of each BatchNorm's input on real batches
    (:func:`bn_input_stats`); without it, mean 0 and var 1, which computes the same bits
    in eval mode but is a poor start for training-mode BatchNorm.
    """
    if not latent > 0:
        raise ValueError(f"latent must be > 0, got {latent}")
    cfg = config_of(model)
    net = Detector(cfg, model.num_classes)
    in_ternary = False  # whether the packed activation a bconv reads is ternary
    for i, (m, ly) in enumerate(zip(net.layers, model.layers, strict=True)):
        t = ly.tensors
        if isinstance(m, Pool):
            continue
        if isinstance(m, Head):
            with torch.no_grad():
                m.conv.weight.copy_(torch.from_numpy(t["weight"].astype(np.float32))[:, :, None, None])
                m.conv.bias.copy_(torch.from_numpy(t["bias"].astype(np.float32)))
            continue
        mean, var = stats[i] if stats is not None else (np.zeros(m.out_ch), np.ones(m.out_ch))
        mean, var = np.asarray(mean, np.float64), np.asarray(var, np.float64)
        eps = m.bn.eps
        with torch.no_grad():
            if isinstance(m, Stem):
                q = t["weight"].astype(np.float32)  # (out, k, k, in)
                big = np.abs(q).reshape(len(q), -1).max(1)
                if np.any((big != STEM_Q) & (big != 0)):
                    bad = int(np.nonzero((big != STEM_Q) & (big != 0))[0][0])
                    raise ValueError(f"stem channel {bad}: largest |weight| {big[bad]:.0f}, not 127 as export writes")
                m.weight.copy_(torch.from_numpy(q / STEM_Q).permute(0, 3, 1, 2))
                alpha = 1.0 / STEM_Q  # the scale s of Stem.quantised for these weights
            else:
                signs = bits.unpack(t["weight"], m.in_ch).astype(np.float32) * latent  # (out, k, k, in)
                m.weight.copy_(torch.from_numpy(signs).permute(0, 3, 1, 2))
                alpha = float(m.alpha()[0])
        if isinstance(m, BConv) and m.real_output:
            sd = np.sqrt(var + eps)
            scale, bias = t["scale"].astype(np.float64), t["bias"].astype(np.float64)
            _set_bn(m.bn, scale * sd / alpha, bias + scale * mean / alpha, mean, var)
        elif m.ternary:
            ys, valid = _candidates(m, in_ternary)
            y_min = np.where(valid, ys, np.iinfo(np.int64).max).min(0)
            y_max = np.where(valid, ys, np.iinfo(np.int64).min).max(0)
            gamma, beta = _ternary_affine(t["threshold"], t["flip"], alpha, mean, var, eps, y_min, y_max)
            _set_bn(m.bn, gamma, beta, mean, var)
        else:
            gamma, beta = _threshold_affine(t["threshold"], t["flip"], alpha, mean, var, eps)
            _set_bn(m.bn, gamma, beta, mean, var)
        if isinstance(m, Stem) or (isinstance(m, BConv) and not m.real_output):
            in_ternary = m.ternary
    return net.eval()


@torch.no_grad()
def bn_input_stats(net: Detector, batches) -> dict:
    """{layer index: (mean, var)} of each BatchNorm's input (scale·y) over ``batches`` of pixels (B,C,H,W)."""
    net.eval()
    sums: dict = {}
    hooks = []

    def grab(i, m):
        def hook(_mod, args):
            y, s = m.preact(args[0] if not isinstance(m, ResBConv) else m.sign(args[0]))
            z = (y * s.view(1, -1, 1, 1)).double()
            n, tot, sq = sums.get(i, (0, 0.0, 0.0))
            sums[i] = (n + z.numel() // z.shape[1], tot + z.sum((0, 2, 3)), sq + z.pow(2).sum((0, 2, 3)))

        return hook

    for i, m in enumerate(net.layers):
        if isinstance(m, (Stem, BConv)):
            hooks.append(m.register_forward_pre_hook(grab(i, m)))
    try:
        for x in batches:
            net(x)
    finally:
        for h in hooks:
            h.remove()
    if not sums:
        raise ValueError("no batches to measure")
    out = {}
    for i, (n, tot, sq) in sums.items():
        mean = (tot / n).numpy()
        out[i] = (mean, np.maximum((sq / n).numpy() - mean**2, 0.0))
    return out


def _same_rules(a: dict, b: dict, ys, valid) -> bool:
    """Whether two layers' threshold rules give the same bits on every reachable y (one or two planes).

    Compared as functions, not as numbers: a constant channel, or a threshold past the reachable
    range, has more than one way of being written.
    """
    ta, fa = np.atleast_2d(a["threshold"]), np.atleast_2d(a["flip"])
    tb, fb = np.atleast_2d(b["threshold"]), np.atleast_2d(b["flip"])
    if ta.shape != tb.shape:
        return False
    return all(
        np.array_equal(bits.threshold_bits(ys, ta[p], fa[p]) & valid, bits.threshold_bits(ys, tb[p], fb[p]) & valid)
        for p in range(ta.shape[0])
    )


def check_round_trip(net: Detector, model: Model, rtol: float = 1e-5) -> float:
    """Export ``net`` and compare with ``model``: AssertionError naming the first difference.

    Returns the largest error of a real layer's scale·y + bias, relative to the size of its terms.
    """
    from train.export import to_model

    again = to_model(net, model.anchors, model.class_names)
    worst = 0.0
    in_ternary = False
    for i, (a, b, m) in enumerate(zip(model.layers, again.layers, net.layers, strict=True)):
        if a.params != b.params:
            raise AssertionError(f"layer {i} {a.op}: params {b.params} after the round trip, {a.params} in the file")
        ta, tb = a.tensors, b.tensors
        for name, want in ta.items():
            if name not in ("scale", "bias", "threshold", "flip") and not np.array_equal(tb[name], want):
                raise AssertionError(f"layer {i} {a.op} {name}: differs from the model file after the round trip")
        if "threshold" in ta:
            ys, valid = _candidates(m, in_ternary)
            if not _same_rules(ta, tb, ys, valid):
                raise AssertionError(f"layer {i} {a.op} threshold: differs from the model file after the round trip")
            in_ternary = _is_ternary(a)
        if "scale" in a.tensors:
            # r = scale·y + bias with |y| <= K: the error of r against the size of its terms
            # (a bias is often a small difference of large ones, so its own relative error means little).
            k = a.params["kernel"] ** 2 * a.params["in_ch"]
            s0, b0 = a.tensors["scale"].astype(np.float64), a.tensors["bias"].astype(np.float64)
            s1, b1 = b.tensors["scale"].astype(np.float64), b.tensors["bias"].astype(np.float64)
            rel = float(np.max((np.abs(s1 - s0) * k + np.abs(b1 - b0)) / np.maximum(np.abs(s0) * k + np.abs(b0), 1e-12)))
            worst = max(worst, rel)
            if rel > rtol:
                raise AssertionError(f"layer {i} {a.op}: scale·y + bias moved by {rel:.2e} of its size (> {rtol})")
    return worst


def _training_batches(config_path: str, images: int, batch: int, seed: int):
    from train.augment import BatchMaker
    from train.config import load_config
    from train.data import LoadReport, cached_split

    cfg = load_config(config_path)
    m = cfg["model"]
    cache = cached_split(cfg["data"], "train", LoadReport())
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(cache))[: min(images, len(cache))]
    maker = BatchMaker(cache, cfg["augment"], m.input_width, m.input_height, seed=seed)
    return cfg, [maker.make(list(idx[s : s + batch]))[0] for s in range(0, len(idx), batch)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.from_model", description=__doc__.split("\n")[0])
    ap.add_argument("model", help="model file (e.g. models/person.xnc)")
    ap.add_argument("out", help="checkpoint to write, for train.init_from or train.teacher (e.g. runs/imported/last.pt)")
    ap.add_argument("--config", default="train/configs/person.toml", help="training config: its data and augmentation")
    ap.add_argument("--images", type=int, default=512, help="training images that measure the BatchNorm statistics")
    ap.add_argument("--latent", type=float, default=LATENT, help="size of every latent binary weight")
    args = ap.parse_args(argv)
    try:
        model = read_model(args.model)
        net0 = from_model(model, args.latent)
    except (OSError, ModelFormatError, ValueError) as e:
        print(f"from_model: {e}", file=sys.stderr)
        return 2
    from train.checkpoints import save_checkpoint
    from train.data import ConfigError

    try:
        cfg, batches = _training_batches(args.config, args.images, 32, seed=0)
    except (OSError, ConfigError) as e:
        print(f"from_model: training data: {e}", file=sys.stderr)
        return 78
    if list(cfg["data"].classes) != list(model.class_names):
        print(f"from_model: the config's classes {cfg['data'].classes} are not the file's {list(model.class_names)}",
              file=sys.stderr)
        return 78
    net = from_model(model, args.latent, bn_input_stats(net0, batches))
    worst = check_round_trip(net, model)
    cfg["model"] = replace(net.cfg)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    extra = {"imported_from": str(args.model), "latent": args.latent, "step": 0, "wall_s": 0.0, "epochs": 0.0}
    save_checkpoint(out, net, cfg, model.anchors, model.class_names, extra)
    n = sum(len(b) for b in batches)
    print(f"{args.model} -> {out}: {len(net.layers)} layers, BatchNorm statistics from {n} training images; "
          f"re-export equals the file (thresholds exact, scale/bias within {worst:.1e}); config {asdict(net.cfg)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
