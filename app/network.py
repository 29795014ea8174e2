"""Runs the layers of a loaded model: letterboxed uint8 image -> raw head grid.

All weights are rearranged once, at construction, into the layouts the kernels
want, every activation buffer is allocated once (borders stay zero, the +1
padding) and the argument tuple of every kernel call is built once, straight
from the model's layers. A frame then costs one numba call for the stem, one
per pool or conv (three per Bi-Real block) and one for the head, which keeps
interpreter overhead small on the Pi. A Network is not re-entrant: use one per
thread.
"""

from __future__ import annotations

import numba
import numpy as np

from app import bits
from app import kernels as K
from app.bits import n_words
from app.modelfile import Layer, Model, check_input, conv_out, output_kind, param


def _packed(h, w, words):
    """A packed activation buffer (h, w) of ``words`` uint64 per pixel, with its zero border."""
    return np.zeros(K.padded_shape(h, w, words), np.uint64)


def _rules(tensors, planes):
    """(threshold, flip) of a bits or ternary output as flat int32 / uint8 copies of planes * out_ch rules."""
    return (np.array(tensors["threshold"], np.int32).reshape(-1), np.array(tensors["flip"], np.uint8).reshape(-1))


def _over_ternary(weight, in_ch):
    """Weights of a conv over a ternary input, for the 2·in_ch binary channels that hold it.

    y = Σ w·v = (Σ w·lo + Σ w·hi) / 2 (app/bits.py): the same weights on both planes make
    the binary conv of the 2·in_ch channels compute y2 = 2·y, so thresholds double and
    scales halve (both exact) where the layer's rules are loaded.
    """
    pm = bits.unpack(weight, in_ch)
    return bits.pack(np.concatenate([pm, pm], axis=-1))


def _doubled(thr):
    """Thresholds on y restated on y2 = 2·y (sentinels and out-of-range ones stay out of range)."""
    return np.clip(2 * thr.astype(np.int64), bits.INT32_MIN, bits.INT32_MAX).astype(np.int32)


def _geometry(layer: Layer, masked: bool, doubled: bool) -> tuple:
    """The weights and patch geometry a conv kernel takes for a conv layer.

    doubled: the input is ternary, read as the 2·in_ch binary channels of both planes.
    masked: it is ternary, read by one masked pass (then the kernel takes no K: it counts each
    patch's nonzero values itself).
    """
    k, s = int(param(layer, "kernel")), int(param(layer, "stride"))
    weight, in_bits = layer.tensors["weight"], int(param(layer, "in_ch"))
    if doubled:
        weight, in_bits = _over_ternary(weight, in_bits), 2 * in_bits
    wt = K.compact_weights(weight, in_bits)
    nup, _nb = K.patch_layout(k, in_bits)
    return (wt, nup, k, s) if masked else (wt, nup, k * k * in_bits, k, s)


# the conv kernel of a layer: (masked input, output) -> (one thread, several)
_CONV = {
    (False, "bits"): (K.bconv_bits_rows, K.bconv_bits_par),
    (False, "real"): (K.bconv_real_rows, K.bconv_real_par),
    (True, "bits"): (K.tconv_bits_rows, K.tconv_bits_par),
    (True, "real"): (K.tconv_real_rows, K.tconv_real_par),
}


class Network:
    """The numba network of one model. ``forward(x)`` returns the head grid (gh, gw, A*(5+C))."""

    def __init__(self, model: Model, threads: int = 1):
        if not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be an integer >= 1, got {threads!r}")
        self.model = model
        self.threads = threads
        layers = model.layers
        stem = layers[0]
        h, w, c = model.input_height, model.input_width, param(stem, "out_ch")
        self.stem_k, self.stem_s = param(stem, "kernel"), param(stem, "stride")
        self.stem_wt = np.ascontiguousarray(stem.tensors["weight"].astype(np.int32).reshape(c, -1).T)
        # packed activations are binary (1 plane) or ternary (2 planes: 2·C binary channels)
        planes = 2 if output_kind(stem) == "ternary" else 1
        self.stem_planes = planes
        self.stem_thr, self.stem_flip = _rules(stem.tensors, planes)
        self.u = np.zeros(K.stem_planes_shape(h, w, model.channels, self.stem_k, self.stem_s), np.int32)
        h, w = conv_out(h, self.stem_k, self.stem_s), conv_out(w, self.stem_k, self.stem_s)
        self.stem_out = _packed(h, w, n_words(planes * c))

        # (kernel over rows r0..r1, its arguments before r0 and r1, output rows, the kernel's prange twin or None)
        # of every call of the body, in order; _calls is what body() runs
        self.plan = []
        self.masked = set()  # indices of the layers that read a ternary input through the masked kernels
        self.layer_out = {0: ("bits", self.stem_out)}  # layer index -> ("bits", packed buffer) or ("real", stream)
        packed, real = self.stem_out, None  # the newest packed activation and the newest real stream
        for i, layer in enumerate(layers[1:-1], start=1):
            if layer.op == "maxpool2":
                h, w = h // 2, w // 2
                out = _packed(h, w, packed.shape[2])
                self.plan.append((K.pool_rows, (packed, out), h, K.pool_par))
                packed = out
                self.layer_out[i] = ("bits", out)
                continue
            k, s, c = (int(param(layer, name)) for name in ("kernel", "stride", "out_ch"))
            h, w = conv_out(h, k, s), conv_out(w, k, s)
            if layer.op == "rbconv":  # the block's own activation of the stream is its input
                in_planes = 2 if param(layer, "input") == "ternary" else 1
            else:
                in_planes = planes
            # Over a ternary input: one masked pass when the planes are whole 32-bit units, else the
            # binary conv of both planes with the weights twice (y2 = 2·y).
            masked = in_planes == 2 and param(layer, "in_ch") % 32 == 0
            doubled = in_planes == 2 and not masked
            if masked:
                self.masked.add(i)
            geo = _geometry(layer, masked, doubled)
            kind = output_kind(layer)
            if kind in ("bits", "ternary"):
                planes = 2 if kind == "ternary" else 1
                out = _packed(h, w, n_words(planes * c))
                thr, flip = _rules(layer.tensors, planes)
                fn, par = _CONV[masked, "bits"]
                self.plan.append((fn, (packed, *geo, _doubled(thr) if doubled else thr, flip, planes, out), h, par))
                packed = out
                self.layer_out[i] = ("bits", out)
                continue
            # a real stream: a real-output bconv starts it, each rbconv adds to it
            scale = layer.tensors["scale"].astype(np.float32)
            affine = (scale / np.float32(2) if doubled else scale, layer.tensors["bias"].astype(np.float32))
            stream = np.zeros((h, w, c), np.float32)
            fn, par = _CONV[masked, "real"]
            if layer.op == "bconv":
                self.plan.append((fn, (packed, *geo, *affine, stream), h, par))
            else:  # rbconv: the stream's activation into a packed buffer of its own, the conv into scratch, the sum
                signs, scratch = _packed(h, w, n_words(in_planes * c)), np.zeros_like(stream)
                if in_planes == 2:
                    self.plan.append((K.ternary_pack_rows, (real, float(param(layer, "band")), signs), h, None))
                else:
                    self.plan.append((K.sign_pack_rows, (real, signs), h, None))
                self.plan.append((fn, (signs, *geo, *affine, scratch), h, par))
                self.plan.append((K.add_rows, (real, scratch, stream), h, None))
            real = stream
            self.layer_out[i] = ("real", stream)

        head = layers[-1]
        self.head_in = packed
        self.head_from_bits = self.layer_out[len(layers) - 2][0] == "bits"
        self.real = np.zeros((h, w, c), np.float32) if self.head_from_bits else real
        self.head_channels = c
        self.head_w = np.ascontiguousarray(head.tensors["weight"], np.float32)
        self.head_b = np.ascontiguousarray(head.tensors["bias"], np.float32)
        self.head_out = np.zeros((h, w, param(head, "out_ch")), np.float32)

        self.stem_height = self.stem_out.shape[0] - 2 * K.BORDER  # the stem's output rows
        # one thread: each kernel over all its rows; several: the prange twin over 4 chunks per thread
        self._calls = [(par, (*args, 4 * self.threads)) if self.threads > 1 and par is not None else (fn, (*args, 0, n))
                       for fn, args, n, par in self.plan]

    @staticmethod
    def thread_rows(n: int, threads: int) -> list[tuple[int, int]]:
        """The output rows each thread computes of a kernel over n rows split by its prange twin.

        The twins split 4 * threads chunks of rows (chunk i: rows i*n//c .. (i+1)*n//c) and numba's
        static schedule gives each thread 4 consecutive chunks, so thread t has rows t*n//T .. (t+1)*n//T:
        the benchmarks meter exactly that work per thread.
        """
        return [(t * n // threads, (t + 1) * n // threads) for t in range(threads)]

    # ---------------------------------------------------------------- stages
    def stem(self, x):
        if self.threads > 1:
            numba.set_num_threads(min(self.threads, numba.config.NUMBA_NUM_THREADS))
        out = self.stem_out
        if self.threads == 1:
            K.run_stem(x, self.u, self.stem_wt, self.stem_thr, self.stem_flip, self.stem_k, self.stem_s,
                       self.stem_planes, out)
        else:
            K.stem_pad(x, self.stem_k, self.stem_s, self.u)
            K.stem_par(self.u, self.stem_wt, self.stem_thr, self.stem_flip, self.stem_k, self.stem_s,
                       self.stem_planes, out, 4 * self.threads)

    def body(self):
        for fn, args in self._calls:
            fn(*args)

    def head(self):
        K.run_head(self.head_in, self.head_channels, self.head_from_bits, self.real, self.head_w, self.head_b,
                   self.head_out)
        return self.head_out.copy()

    # ---------------------------------------------------------------- whole
    def forward(self, x, trace: bool = False):
        x = np.ascontiguousarray(check_input(self.model, x))
        self.stem(x)
        self.body()
        head = self.head()
        if not trace:
            return head
        traced = {}
        for i, (kind, where) in self.layer_out.items():
            traced[i] = K.interior(where).copy() if kind == "bits" else where.copy()
        return head, traced
