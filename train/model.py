"""The torch mirror of the runtime network, layer for layer, and its float twin from the same definition.

Binary mode computes exactly what the Pi computes (see app/bits.py):

- stem: int8 weights q = round(w / s_c) (s_c = max|w_c| / 127) on u = pixel - 128,
  zero padding in u, stride 2; the integer accumulator y is exact in float32.
- bconv: activations and weights are ±1 with sign(0) = +1 (``w >= 0`` is +1),
  padded with +1 explicitly, so y = K - 2·popcount is exact.
- BatchNorm + sign: in eval mode BN is the explicit float32 expression
  ``(scale·y)·a + b`` (see :meth:`_Thresholded.bn_eval`); export evaluates the
  SAME expression on every candidate integer y to find the integer threshold,
  which makes the folded thresholds bit-exact.
- max-pool after the sign (AND of bits on the Pi).
- the last bconv outputs r = y·(α·a) + b (real), the head is a float 1x1 conv.
- optional Bi-Real blocks (``res_blocks``) on that real stream: r + (y·(α·a) + b) with y the
  binary conv of sign(r), the same float32 operations in the same order as the runtime's rbconv.
- optional ternary layers (``ternary``): the sign becomes -1/0/+1 with a zero band |z| < TERNARY_D,
  written as the mean of two signs (two bit planes at runtime); padding (+1) and max-pool unchanged.

Float-twin mode keeps the topology with real weights/activations (zero padding,
ReLU or hardtanh), as the yardstick for what binarisation costs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

BN_EPS = 1e-5
# The runtime pads binary convolutions with +1 (bit 0). A module constant so the parity
# test can prove that a wrong padding is caught.
PAD_VALUE = 1.0
# The zero band half-width of a ternary activation, in units of the BatchNorm output: BN's own
# affine sets the band's position and width per channel, so one constant loses nothing.
TERNARY_D = 0.5


@dataclass(frozen=True)
class ModelConfig:
    input_width: int = 192
    input_height: int = 192
    channels: int = 1
    widths: tuple = (32, 64, 128, 256, 256)
    num_anchors: int = 3
    binary: bool = True
    float_act: str = "relu"  # float twin activation: "relu" or "hardtanh"
    res_blocks: int = 0  # Bi-Real blocks (rbconv) on the real stream after the real-output bconv
    # Indices of layers whose sign becomes a ternary activation (-1, 0, +1; see ternary_act).
    ternary: tuple = ()

    def __post_init__(self):
        # TOML and checkpoints carry lists; a frozen config keeps tuples (hashable, compared by value).
        for key in ("widths", "ternary"):
            object.__setattr__(self, key, tuple(getattr(self, key)))
        if not 0 <= self.res_blocks <= 8:
            raise ValueError(f"res_blocks must be 0..8, got {self.res_blocks}")
        if len(self.widths) < 3:
            raise ValueError("widths needs at least stem, one bits bconv and the real-output bconv")
        if self.float_act not in ("relu", "hardtanh"):
            raise ValueError(f"float_act must be 'relu' or 'hardtanh', got {self.float_act!r}")
        if self.ternary and not self.binary:
            raise ValueError("ternary activations belong to the binary net; the float twin is real everywhere")


def sign_pm1(x: torch.Tensor) -> torch.Tensor:
    """±1 with sign(0) = +1 (torch.sign(0) is 0, which has no bit)."""
    return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))


class _SignSTE(torch.autograd.Function):
    """Forward: sign with sign(0)=+1. Backward: straight-through, clipped to |x| <= 1."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return sign_pm1(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * (x.abs() <= 1).to(g.dtype)


class _TernarySTE(torch.autograd.Function):
    """Forward: +1 where z >= TERNARY_D, -1 where z < -TERNARY_D, 0 in between. Backward: clipped STE.

    Written as (sign(z + d) + sign(z - d)) / 2 with sign(0) = +1: the runtime stores the two signs
    as two bit planes (a thermometer code: -1 = both -1, 0 = lower +1 and upper -1, +1 = both +1)
    and compares the same value twice, against thresholds for z >= -d and z >= d.
    """

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return (sign_pm1(x + TERNARY_D) + sign_pm1(x - TERNARY_D)) / 2

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * (x.abs() <= 1).to(g.dtype)


class _ApproxSign(torch.autograd.Function):
    """Bi-Real's piecewise-quadratic gradient for activations: sharper than the clipped identity."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return sign_pm1(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * torch.clamp(2 - 2 * x.abs(), min=0)


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, g):
        return g


def binary_act(x):
    return _ApproxSign.apply(x)


def ternary_act(x):
    return _TernarySTE.apply(x)


def binary_weight(w):
    return _SignSTE.apply(w)


class _Thresholded(nn.Module):
    """A conv whose integer pre-activation y goes through BN(scale·y) and then sign (or stays real)."""

    def __init__(self, out_ch: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(out_ch, eps=BN_EPS)
        self.ternary = False  # ModelConfig.ternary: -1/0/+1 instead of sign

    def sign(self, z):
        return ternary_act(z) if self.ternary else binary_act(z)

    def bn_affine(self):
        """Per-channel a, b of eval-mode BN as ``z·a + b`` (float32)."""
        bn = self.bn
        a = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        b = bn.bias - bn.running_mean * a
        return a, b

    def bn_eval(self, y: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """The exact float32 expression used in eval mode; export evaluates it on candidate integers.

        y (..., C, *spatial) or (N, C); scale, a, b per channel broadcast on dim 1.
        """
        a, b = self.bn_affine()
        shape = (1, -1) + (1,) * (y.dim() - 2)
        return (y * scale.view(shape)) * a.view(shape) + b.view(shape)

    def normalise(self, y, scale):
        if self.training:
            return self.bn(y * scale.view(1, -1, 1, 1))
        return self.bn_eval(y, scale)


class Stem(_Thresholded):
    def __init__(self, in_ch, out_ch, binary, act, kernel=3, stride=2):
        super().__init__(out_ch)
        self.kernel, self.stride, self.in_ch, self.out_ch, self.binary, self.act = (
            kernel,
            stride,
            in_ch,
            out_ch,
            binary,
            act,
        )
        self.weight = nn.Parameter(torch.randn(out_ch, in_ch, kernel, kernel) * 0.1)

    def quantised(self):
        """(int-valued float weights q, per-channel scale s) with w ≈ s·q."""
        w = self.weight
        s = (w.detach().abs().amax(dim=(1, 2, 3)) / 127.0).clamp_min(1e-12)
        q = _RoundSTE.apply(w / s.view(-1, 1, 1, 1)).clamp(-127, 127)
        return q, s

    def preact(self, x):
        """x: float pixels 0..255 (B,C,H,W). Binary: integer accumulator y and scale; float: conv output."""
        u = x - 128.0
        if self.binary:
            q, s = self.quantised()
            return F.conv2d(u, q, stride=self.stride, padding=self.kernel // 2), s
        y = F.conv2d(u / 128.0, self.weight, stride=self.stride, padding=self.kernel // 2)
        return y, torch.ones(self.out_ch, device=x.device)

    def forward(self, x):
        y, s = self.preact(x)
        z = self.normalise(y, s) if self.binary else self.bn(y)
        return self.sign(z) if self.binary else self.act(z)


class BConv(_Thresholded):
    def __init__(self, in_ch, out_ch, binary, act, real_output=False, kernel=3, stride=1):
        super().__init__(out_ch)
        self.kernel, self.stride, self.in_ch, self.out_ch = kernel, stride, in_ch, out_ch
        self.binary, self.act, self.real_output = binary, act, real_output
        self.weight = nn.Parameter(torch.empty(out_ch, in_ch, kernel, kernel))
        nn.init.kaiming_normal_(self.weight, nonlinearity="relu")
        if binary:
            with torch.no_grad():
                self.weight.mul_(0.5 / self.weight.abs().mean())

    def alpha(self):
        return self.weight.abs().mean(dim=(1, 2, 3))

    def preact(self, a):
        """a: ±1 activations (binary) or real. Returns (y, scale)."""
        p = self.kernel // 2
        if self.binary:
            wb = binary_weight(self.weight)
            y = F.conv2d(F.pad(a, (p, p, p, p), value=PAD_VALUE), wb, stride=self.stride)
            return y, self.alpha()
        return F.conv2d(a, self.weight, stride=self.stride, padding=p), torch.ones(self.out_ch, device=a.device)

    def real_eval(self, y):
        """Eval-mode real output in the runtime's form r = scale·y + bias."""
        a, b = self.bn_affine()
        scale = self.alpha() * a
        return y * scale.view(1, -1, 1, 1) + b.view(1, -1, 1, 1)

    def forward(self, a):
        y, s = self.preact(a)
        if not self.binary:
            z = self.bn(y)
            return z if self.real_output else self.act(z)
        if self.real_output:
            return self.bn(y * s.view(1, -1, 1, 1)) if self.training else self.real_eval(y)
        return self.sign(self.normalise(y, s))


class ResBConv(BConv):
    """Bi-Real block: r + BN(bconv(sign(r))) (binary), r + BN(conv(act(r))) (float twin); 3x3, stride 1."""

    def __init__(self, ch, binary, act):
        super().__init__(ch, ch, binary, act, real_output=True)
        # Zero-init residual (Goyal et al.): a new block starts as the identity, so blocks added
        # to a trained net change nothing until they learn to.
        nn.init.zeros_(self.bn.weight)

    def forward(self, r):
        return r + super().forward(self.sign(r) if self.binary else self.act(r))


class Pool(nn.Module):
    def forward(self, x):
        return F.max_pool2d(x, 2, 2)


class Head(nn.Module):
    # Objectness starts near its base rate (a few people among 3 anchors x 144 cells), so the first
    # steps learn where people are instead of pushing hundreds of empty slots down.
    OBJ_PRIOR = 0.01

    def __init__(self, in_ch, out_ch, num_anchors: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, 1, bias=True)
        per = out_ch // num_anchors
        with torch.no_grad():
            self.conv.bias.view(num_anchors, per)[:, 4] = math.log(self.OBJ_PRIOR / (1 - self.OBJ_PRIOR))

    def forward(self, r):
        return self.conv(r)


class Detector(nn.Module):
    """stem → pool → (bconv → pool)* → bconv… → real bconv → head, mirroring the runtime layer list.

    With widths (32, 64, 128, 256, 256): stem 32, pool, bconv 64, pool, bconv 128, pool,
    bconv 256, bconv 256 real, head — the default network of ARCHITECTURE.md.
    """

    def __init__(self, cfg: ModelConfig, num_classes: int = 1):
        super().__init__()
        self.cfg, self.num_classes = cfg, num_classes
        act = nn.ReLU() if cfg.float_act == "relu" else nn.Hardtanh()
        w = list(cfg.widths)
        layers: list = [Stem(cfg.channels, w[0], cfg.binary, act), Pool()]
        n_pooled = 2  # the default net pools after the first two bconvs, then keeps 12x12
        prev = w[0]
        for i, ch in enumerate(w[1:-1]):
            layers.append(BConv(prev, ch, cfg.binary, act))
            if i < n_pooled:
                layers.append(Pool())
            prev = ch
        layers.append(BConv(prev, w[-1], cfg.binary, act, real_output=True))
        layers += [ResBConv(w[-1], cfg.binary, act) for _ in range(cfg.res_blocks)]
        layers.append(Head(w[-1], cfg.num_anchors * (5 + num_classes), cfg.num_anchors))
        self.layers = nn.ModuleList(layers)
        for i in cfg.ternary:
            m = self.layers[i] if 0 <= i < len(layers) else None
            signed = isinstance(m, (Stem, ResBConv)) or (isinstance(m, BConv) and not m.real_output)
            if not signed:
                raise ValueError(f"ternary: layer {i} takes no sign (signs: stem, bits bconvs, Bi-Real inputs)")
            m.ternary = True

    @property
    def stride(self) -> int:
        return 2 * 2 ** sum(isinstance(m, Pool) for m in self.layers)

    def forward(self, x, trace: bool = False):
        """x: (B,C,H,W) float pixel values 0..255. Returns the head (B, A*(5+C), gh, gw) [, per-layer outputs]."""
        outs = {}
        for i, m in enumerate(self.layers):
            x = m(x)
            if trace:
                outs[i] = x
        return (x, outs) if trace else x

    def clip_latent(self):
        """Keep latent binary weights in [-1, 1], where the straight-through gradient is alive."""
        if not self.cfg.binary:
            return
        with torch.no_grad():
            for m in self.layers:
                if isinstance(m, BConv):
                    m.weight.clamp_(-1, 1)
