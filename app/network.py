"""Runs the layers of a loaded model: letterboxed uint8 image -> raw head grid.

All weights are rearranged once, at construction, into the layouts the kernels
want, every activation buffer is allocated once (borders stay zero, the +1
padding) and the argument tuple of every kernel call is built once. A frame
then costs one numba call for the stem, one per body layer and one for the
head, which keeps interpreter overhead small on the Pi. A Network is not
re-entrant: use one per thread.
"""

from __future__ import annotations

import numba
import numpy as np

from app import bits
from app import kernels as K
from app.bits import n_words
from app.kernels import (
    C_IN_H,
    C_IN_OFF,
    C_IN_W,
    C_IN_WORDS,
    C_K,
    C_KK,
    C_N_OUT,
    C_NB,
    C_NPAD,
    C_NUP,
    C_OP,
    C_OUT_H,
    C_OUT_OFF,
    C_OUT_W,
    C_OUT_WORDS,
    C_PLANES,
    C_S,
    C_T_OFF,
    C_W_OFF,
    N_COLS,
    OP_BITS,
    OP_POOL,
    OP_REAL,
    OP_RES,
)
from app.modelfile import Model, conv_out
from app.reference import check_input


def _padded_size(h, w, words):
    hp, wp, _ = K.padded_shape(h, w, words)
    return hp * wp * words


def _rules(tensors, planes):
    """(threshold, flip) of a bits or ternary output as flat int32 / uint8 arrays of planes * out_ch rules."""
    return (np.ascontiguousarray(tensors["threshold"], np.int32).reshape(-1),
            np.ascontiguousarray(tensors["flip"], np.uint8).reshape(-1))


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


class Network:
    """The numba network of one model. ``forward(x)`` returns the head grid (gh, gw, A*(5+C))."""

    def __init__(self, model: Model, threads: int = 1):
        if not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be an integer >= 1, got {threads!r}")
        self.model = model
        self.threads = threads
        layers = model.layers
        stem = layers[0]
        sp, st = stem.params, stem.tensors
        h, w = model.input_height, model.input_width
        self.stem_k, self.stem_s = sp["kernel"], sp["stride"]
        self.stem_wt = np.ascontiguousarray(st["weight"].astype(np.int32).reshape(sp["out_ch"], -1).T)
        # packed activations are binary (1 plane) or ternary (2 planes: 2·C binary channels)
        planes = 2 if sp.get("output", "bits") == "ternary" else 1
        self.stem_planes = planes
        self.stem_thr, self.stem_flip = _rules(st, planes)
        self.u = np.zeros(K.stem_planes_shape(h, w, model.channels, self.stem_k, self.stem_s), np.int32)
        h, w, c = conv_out(h, self.stem_k, self.stem_s), conv_out(w, self.stem_k, self.stem_s), sp["out_ch"]

        # activation arena: (offset, h, w, words) per binary output, borders zero forever
        bufs = [(0, h, w, n_words(planes * c))]
        arena = _padded_size(h, w, n_words(planes * c))
        plan, bw, thr, flip, scale, bias = [], [], [], [], [], []
        w_off = t_off = 0
        self.real = None  # the newest real stream (float32 H, W, C)
        self.real_out = {}  # plan row of a real-output bconv -> its stream
        self.masked = set()  # plan rows that read a ternary input through the masked kernels
        self.res = {}  # plan row of an rbconv -> (stream in, scratch, stream out)
        self.layer_out = {0: ("bits", 0)}  # layer index -> ("bits", buf index) or ("real", its stream)
        for i, layer in enumerate(layers[1:-1], start=1):
            lp, lt = layer.params, layer.tensors
            in_off, in_h, in_w, in_words = bufs[-1]
            if layer.op == "maxpool2":
                h, w = h // 2, w // 2
                row = [OP_POOL, 0, 0, in_off, in_h, in_w, in_words, arena, h, w, in_words] + [0] * 9
                bufs.append((arena, h, w, in_words))
                arena += _padded_size(h, w, in_words)
                self.layer_out[i] = ("bits", len(bufs) - 1)
            else:
                k, s, n_out = lp["kernel"], lp["stride"], lp["out_ch"]
                h, w = conv_out(h, k, s), conv_out(w, k, s)
                if layer.op == "rbconv":  # the block's own activation of the stream is its input
                    planes = 2 if lp.get("input", "bits") == "ternary" else 1
                in_planes = planes
                weight, in_bits = lt["weight"], lp["in_ch"]
                # Over a ternary input: one masked pass when the planes are whole 32-bit units,
                # else the binary conv of both planes with the weights twice (y2 = 2·y).
                masked = in_planes == 2 and in_bits % 32 == 0
                if masked:
                    self.masked.add(len(plan))
                elif in_planes == 2:
                    weight, in_bits = _over_ternary(weight, in_bits), 2 * in_bits
                doubled = in_planes == 2 and not masked
                wb = K.compact_weights(weight, in_bits)
                nup, nb = K.patch_layout(k, in_bits)
                nvec = 0
                kk = k * k * in_bits
                bw.append(wb.ravel())
                out_planes = 2 if lp.get("output") == "ternary" else 1
                tail = [nup, nvec, wb.shape[1], out_planes]
                if lp.get("output") in ("bits", "ternary"):
                    words = n_words(out_planes * n_out)
                    row = [OP_BITS, k, s, in_off, in_h, in_w, in_words, arena, h, w, words, w_off, n_out, nb, kk, t_off] + tail
                    t, f = _rules(lt, out_planes)
                    thr.append(_doubled(t) if doubled else t)
                    flip.append(f)
                    scale.append(np.zeros(t.size, np.float32))
                    bias.append(np.zeros(t.size, np.float32))
                    bufs.append((arena, h, w, words))
                    arena += _padded_size(h, w, words)
                    self.layer_out[i] = ("bits", len(bufs) - 1)
                    planes = out_planes
                else:  # a real stream: a real-output bconv starts it, each rbconv adds to it
                    thr.append(np.zeros(n_out, np.int32))
                    flip.append(np.zeros(n_out, np.uint8))
                    sc = lt["scale"].astype(np.float32)
                    scale.append(sc / np.float32(2) if doubled else sc)
                    bias.append(lt["bias"].astype(np.float32))
                    stream = np.zeros((h, w, n_out), np.float32)
                    if layer.op == "bconv":
                        row = [OP_REAL, k, s, in_off, in_h, in_w, in_words, 0, h, w, 0, w_off, n_out, nb, kk, t_off] + tail
                        self.real_out[len(plan)] = stream
                    else:  # rbconv: the stream's activation goes to a bits buffer of its own, the conv reads that
                        words = n_words(in_planes * n_out)
                        row = [OP_RES, k, s, arena, h, w, words, 0, h, w, 0, w_off, n_out, nb, kk, t_off] + tail
                        bufs.append((arena, h, w, words))
                        arena += _padded_size(h, w, words)
                        band = float(lp.get("band", 0.0))
                        self.res[len(plan)] = (self.real, np.zeros_like(stream), stream, in_planes, band)
                    self.real = stream
                    self.layer_out[i] = ("real", stream)
                w_off += wb.size
                t_off += thr[-1].size
                c = n_out
            plan.append(row)
        self.plan = np.array(plan, dtype=np.int64).reshape(-1, N_COLS)
        self.act = np.zeros(max(arena, 1), np.uint64)
        self.bufs = bufs
        self.bw = np.concatenate(bw) if bw else np.zeros(1, np.uint8)
        self.thr = np.concatenate(thr) if thr else np.zeros(1, np.int32)
        self.flip = np.concatenate(flip) if flip else np.zeros(1, np.uint8)
        self.scale = np.concatenate(scale) if scale else np.zeros(1, np.float32)
        self.bias = np.concatenate(bias) if bias else np.zeros(1, np.float32)
        head = layers[-1]
        self.head_from_bits = self.layer_out[len(layers) - 2][0] == "bits"
        if self.head_from_bits:
            self.real = np.zeros((h, w, c), np.float32)
        self.head_w = np.ascontiguousarray(head.tensors["weight"], np.float32)
        self.head_b = np.ascontiguousarray(head.tensors["bias"], np.float32)
        self.head_out = np.zeros((h, w, head.params["out_ch"]), np.float32)
        self.last_bits = bufs[-1] + (c,)
        self._calls = self._layer_calls()

    # ---------------------------------------------------------------- views
    def _buf(self, index):
        off, h, w, words = self.bufs[index]
        return self.act[off : off + _padded_size(h, w, words)].reshape(K.padded_shape(h, w, words))

    # ---------------------------------------------------------------- stages
    def stem(self, x):
        if self.threads > 1:
            numba.set_num_threads(min(self.threads, numba.config.NUMBA_NUM_THREADS))
        out = self._buf(0)
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

    def _layer_calls(self):
        """(kernel, args) per body layer, built once: a frame then costs one numba call per layer."""
        calls = []
        par = self.threads > 1
        chunks = 4 * self.threads
        for row, p in enumerate(self.plan):
            inp = self._view_of(p[C_IN_OFF], p[C_IN_H], p[C_IN_W], p[C_IN_WORDS])
            if p[C_OP] == OP_POOL:
                out = self._view_of(p[C_OUT_OFF], p[C_OUT_H], p[C_OUT_W], p[C_OUT_WORDS])
                calls.append((K.pool_par, (inp, out, chunks)) if par else (K.pool_rows, (inp, out, 0, int(p[C_OUT_H]))))
                continue
            n_out, o_stride, nb, t0 = int(p[C_N_OUT]), int(p[C_NPAD]), int(p[C_NB]), int(p[C_T_OFF])
            w = self.bw[p[C_W_OFF] : p[C_W_OFF] + o_stride * nb].reshape(nb, o_stride)
            geo = (w, int(p[C_NUP]), int(p[C_KK]), int(p[C_K]), int(p[C_S]))
            masked = row in self.masked
            if masked:  # no K: the kernel counts each patch's nonzero values itself
                geo = (w, int(p[C_NUP]), int(p[C_K]), int(p[C_S]))
            if p[C_OP] == OP_BITS:
                out = self._view_of(p[C_OUT_OFF], p[C_OUT_H], p[C_OUT_W], p[C_OUT_WORDS])
                n_rules = int(p[C_PLANES]) * n_out
                tail = (self.thr[t0 : t0 + n_rules], self.flip[t0 : t0 + n_rules], int(p[C_PLANES]), out)
                if masked:
                    fn = K.tconv_bits_par if par else K.tconv_bits_rows
                else:
                    fn = K.bconv_bits_par if par else K.bconv_bits_rows
            elif p[C_OP] == OP_REAL:
                tail = (self.scale[t0 : t0 + n_out], self.bias[t0 : t0 + n_out], self.real_out[row])
                if masked:
                    fn = K.tconv_real_par if par else K.tconv_real_rows
                else:
                    fn = K.bconv_real_par if par else K.bconv_real_rows
            else:  # OP_RES: the stream's signs (or ternary) in, the conv into scratch, then stream + scratch
                stream, scratch, new, in_planes, band = self.res[row]
                if in_planes == 2:
                    calls.append((K.ternary_pack_rows, (stream, band, inp, 0, int(p[C_OUT_H]))))
                else:
                    calls.append((K.sign_pack_rows, (stream, inp, 0, int(p[C_OUT_H]))))
                tail = (self.scale[t0 : t0 + n_out], self.bias[t0 : t0 + n_out], scratch)
                if masked:
                    fn = K.tconv_real_par if par else K.tconv_real_rows
                else:
                    fn = K.bconv_real_par if par else K.bconv_real_rows
            rows = (chunks,) if par else (0, int(p[C_OUT_H]))
            calls.append((fn, (inp, *geo, *tail, *rows)))
            if p[C_OP] == OP_RES:
                calls.append((K.add_rows, (stream, scratch, new, 0, int(p[C_OUT_H]))))
        return calls

    def head(self):
        off, h, w, words, c = self.last_bits
        K.run_head(self.act, off, h, w, words, c, self.head_from_bits, self.real, self.head_w, self.head_b,
                 self.head_out)
        return self.head_out.copy()

    def _view_of(self, off, h, w, words):
        return self.act[off : off + _padded_size(h, w, words)].reshape(K.padded_shape(h, w, words))

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
            traced[i] = K.interior(self._buf(where)).copy() if kind == "bits" else where.copy()
        return head, traced
