"""Fold a trained torch Detector into an xnorcam model file (integers on the Pi).

BN + sign become one integer threshold per channel: the exporter evaluates the
model's own eval-mode expression (``_Thresholded.bn_eval``, the float32 ops
torch runs) on EVERY integer pre-activation the layer can produce and takes the
first/last one that gives +1, so the runtime's bits equal torch's bits exactly.

    python -m train.export CHECKPOINT OUT.xnc
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys

import numpy as np
import torch

from app import bits
from app.modelfile import Layer, Model, write_model
from train.checkpoints import load_checkpoint
from train.model import TERNARY_D, BConv, Detector, Head, Pool, ResBConv, Stem


def _fold(z: torch.Tensor, ys: torch.Tensor, valid: torch.Tensor, slope: torch.Tensor, const_plus: torch.Tensor):
    """Integer threshold and flip per channel from z = f(y) on candidate y (N,C) where ``valid``.

    f is monotone (non-decreasing for slope > 0, non-increasing for slope < 0), so
    ``z >= 0`` (sign +1) is an up-set or a down-set of y.
    """
    C = z.shape[1]
    thr = np.zeros(C, np.int64)
    flip = np.zeros(C, np.uint8)
    plus = (z >= 0) & valid
    for c in range(C):
        if slope[c] == 0:
            thr[c] = bits.INT32_MIN if const_plus[c] else bits.INT32_MAX
            continue
        yc = ys[:, c][plus[:, c]]
        if slope[c] > 0:
            thr[c] = int(yc.min()) if len(yc) else bits.INT32_MAX
        else:
            flip[c] = 1
            thr[c] = int(yc.max()) if len(yc) else bits.INT32_MIN
    # Prove the fold on every candidate: the threshold rule must give torch's sign.
    y_np = ys.numpy().astype(np.int64)
    rule = ~bits.threshold_bits(y_np, thr, flip)
    ok = valid.numpy()
    bad = (rule != plus.numpy()) & ok
    if bad.any():
        c = int(np.nonzero(bad.any(0))[0][0])
        raise AssertionError(f"channel {c}: BN+sign is not monotone in y; cannot fold to a threshold")
    return np.clip(thr, bits.INT32_MIN, bits.INT32_MAX).astype(np.int32), flip


def _fold_sign(m, z, ys, valid, a, b):
    """(threshold, flip) of sign(z) per channel, or of a ternary layer's two signs, sign(z ± d),
    as (2, C) arrays (row 0 lo, row 1 hi; app/bits.py). torch adds d to the float32 z, so the
    fold does too."""
    if not m.ternary:
        return _fold(z, ys, valid, a, b >= 0)
    lo = _fold(z + TERNARY_D, ys, valid, a, b + TERNARY_D >= 0)
    hi = _fold(z - TERNARY_D, ys, valid, a, b - TERNARY_D >= 0)
    return np.stack([lo[0], hi[0]]), np.stack([lo[1], hi[1]])


@torch.no_grad()
def stem_range(m: Stem):
    """(lo, hi) per channel: the reachable accumulators, every tap's u in -128..127 or 0 in the zero padding."""
    qi = m.quantised()[0].to(torch.int64)
    lo = torch.minimum(qi * -128, qi * 127).clamp(max=0).sum(dim=(1, 2, 3))
    hi = torch.maximum(qi * -128, qi * 127).clamp(min=0).sum(dim=(1, 2, 3))
    return lo, hi


@torch.no_grad()
def fold_stem(m: Stem):
    q, s = m.quantised()
    a, b = m.bn_affine()
    lo, hi = stem_range(m)
    n = int((hi - lo).max()) + 1
    ys = lo[None, :] + torch.arange(n, dtype=torch.int64)[:, None]
    valid = ys <= hi[None, :]
    z = m.bn_eval(ys.to(torch.float32), s)
    thr, flip = _fold_sign(m, z, ys, valid, a, b)
    weight = q.to(torch.int8).permute(0, 2, 3, 1).contiguous().numpy()
    return weight, thr, flip


@torch.no_grad()
def fold_bconv(m: BConv, ternary_input: bool = False):
    """A ternary input makes y = Σ w·v any integer in [-K, K]; a binary one only K - 2·popcount."""
    k = m.kernel * m.kernel * m.in_ch
    weight = bits.pack(m.weight.permute(0, 2, 3, 1).contiguous().numpy())  # w >= 0 -> +1 -> bit 0
    a, b = m.bn_affine()
    alpha = m.alpha()
    if m.real_output:
        scale = (alpha * a).numpy().astype(np.float32)
        return weight, {"scale": scale, "bias": b.numpy().astype(np.float32)}
    cand = torch.arange(-k, k + 1, dtype=torch.int64) if ternary_input else k - 2 * torch.arange(k + 1)
    ys = cand[:, None].expand(len(cand), m.out_ch).contiguous()
    z = m.bn_eval(ys.to(torch.float32), alpha)
    thr, flip = _fold_sign(m, z, ys, torch.ones_like(ys, dtype=torch.bool), a, b)
    return weight, {"threshold": thr, "flip": flip}


def to_model(net: Detector, anchors, class_names, metadata=None) -> Model:
    if not net.cfg.binary:
        raise ValueError("only the binary network can be exported (the float twin has no integer form)")
    net.eval()
    layers = []
    ternary_in = False  # whether the packed activation the next bconv reads is ternary
    for m in net.layers:
        if isinstance(m, Stem):
            w, thr, flip = fold_stem(m)
            params = {"kernel": m.kernel, "stride": m.stride, "in_ch": m.in_ch, "out_ch": m.out_ch}
            if m.ternary:  # a binary stem keeps the params of files from before ternary layers
                params["output"] = "ternary"
            layers.append(Layer("stem", params, {"weight": w, "threshold": thr, "flip": flip}))
            ternary_in = m.ternary
        elif isinstance(m, Pool):
            layers.append(Layer("maxpool2", {}, {}))
        elif isinstance(m, ResBConv):
            w, t = fold_bconv(m)
            params = {"kernel": m.kernel, "stride": m.stride, "in_ch": m.in_ch, "out_ch": m.out_ch}
            if m.ternary:
                params.update(input="ternary", band=TERNARY_D)
            layers.append(Layer("rbconv", params, {"weight": w, **t}))
        elif isinstance(m, BConv):
            w, t = fold_bconv(m, ternary_in)
            params = {
                "kernel": m.kernel,
                "stride": m.stride,
                "in_ch": m.in_ch,
                "out_ch": m.out_ch,
                "output": "real" if m.real_output else ("ternary" if m.ternary else "bits"),
            }
            layers.append(Layer("bconv", params, {"weight": w, **t}))
            ternary_in = m.ternary and not m.real_output
        elif isinstance(m, Head):
            w = m.conv.weight.detach()
            layers.append(
                Layer(
                    "head",
                    {"in_ch": w.shape[1], "out_ch": w.shape[0]},
                    {
                        "weight": w[:, :, 0, 0].numpy().astype(np.float32).copy(),
                        "bias": m.conv.bias.detach().numpy().astype(np.float32).copy(),
                    },
                )
            )
        else:
            raise TypeError(f"cannot export layer {type(m).__name__}")
    c = net.cfg
    return Model(
        c.input_width,
        c.input_height,
        c.channels,
        tuple(class_names),
        np.asarray(anchors, np.float32).reshape(-1, 2),
        tuple(layers),
        dict(metadata or {}),
    )


def export_checkpoint(ckpt, out, command: str = "") -> Model:
    """Write the model file of a binary checkpoint, with the training command and config as metadata."""
    net, ck = load_checkpoint(ckpt)
    meta = {
        "training_command": command or "python -m train.train --config train/configs/person.toml",
        "exported": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "checkpoint_step": int(ck.get("step", 0)),
        "data": [{"name": s["name"], "path": s["path"], "split": s["split"]} for s in ck["config"]["data"]["sources"]],
        "train": {
            k: ck.get(k)
            for k in ("wall_s", "epochs", "device", "threads", "total_steps", "resumed_from", "phase_wall_s")
            if k in ck
        },
        "config": ck["config"],
    }
    model = to_model(net, ck["anchors"], ck["class_names"], meta)
    write_model(out, model)
    return model


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.export", description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("out")
    args = ap.parse_args(argv)
    export_checkpoint(args.checkpoint, args.out, command=f"python -m train.export {args.checkpoint} {args.out}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
