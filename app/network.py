"""Runs the layers of a loaded model: letterboxed uint8 image -> raw head grid.

All weights are rearranged once, at construction, into the layouts the kernels
want, and every activation buffer is allocated once (borders stay zero, the
+1 padding). A frame then costs three numba calls (stem, binary body, head),
which keeps interpreter overhead small on the Pi. A Network is not re-entrant:
use one per thread.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit

from app import kernels as K
from app.bits import n_words
from app.modelfile import Model, conv_out
from app.reference import check_input

OP_POOL, OP_BITS, OP_REAL = 0, 1, 2
# plan columns
(C_OP, C_K, C_S, C_IN_OFF, C_IN_H, C_IN_W, C_IN_WORDS, C_OUT_OFF, C_OUT_H, C_OUT_W, C_OUT_WORDS,
 C_W_OFF, C_N_OUT, C_NB, C_KK, C_T_OFF, C_NUP, C_NVEC, C_NPAD) = range(19)
N_COLS = 19


def _padded_size(h, w, words):
    hp, wp, _ = K.padded_shape(h, w, words)
    return hp * wp * words


@njit(cache=True)
def _view(act, off, h, w, words):
    hp, wp = h + 2 * K.BORDER, w + 2 * K.BORDER
    return act[off : off + hp * wp * words].reshape((hp, wp, words))


@njit(cache=True)
def run_body(plan, act, bw, thr, flip, scale, bias, real):
    """Every layer between the stem and the head, in one call."""
    for i in range(plan.shape[0]):
        p = plan[i]
        inp = _view(act, p[C_IN_OFF], p[C_IN_H], p[C_IN_W], p[C_IN_WORDS])
        if p[C_OP] == OP_POOL:
            out = _view(act, p[C_OUT_OFF], p[C_OUT_H], p[C_OUT_W], p[C_OUT_WORDS])
            K.pool_rows(inp, out, 0, p[C_OUT_H])
            continue
        n_out, n_pad, nb = p[C_N_OUT], p[C_NPAD], p[C_NB]
        w = bw[p[C_W_OFF] : p[C_W_OFF] + n_pad * nb].reshape((n_pad, nb))
        t0 = p[C_T_OFF]
        if p[C_OP] == OP_BITS:
            out = _view(act, p[C_OUT_OFF], p[C_OUT_H], p[C_OUT_W], p[C_OUT_WORDS])
            K.bconv_bits_rows(inp, w, p[C_NUP], p[C_NVEC], p[C_KK], p[C_K], p[C_S], thr[t0 : t0 + n_out],
                              flip[t0 : t0 + n_out], out, 0, p[C_OUT_H])
        else:
            K.bconv_real_rows(inp, w, p[C_NUP], p[C_NVEC], p[C_KK], p[C_K], p[C_S], scale[t0 : t0 + n_out],
                              bias[t0 : t0 + n_out], real, 0, p[C_OUT_H])


@njit(cache=True)
def run_stem(x, u, wt, thr, flip, k, stride, out):
    K.stem_pad(x, k, u)
    K.stem_rows(u, wt, thr, flip, k, stride, out, 0, out.shape[0] - 2 * K.BORDER)


@njit(cache=True)
def run_head(act, off, h, w, words, channels, from_bits, real, hw, hb, out):
    if from_bits:
        K.unpack_pm1(_view(act, off, h, w, words), channels, real)
    K.head_rows(real, hw, hb, out, 0, out.shape[0])


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
        self.stem_thr = np.ascontiguousarray(st["threshold"], np.int32)
        self.stem_flip = np.ascontiguousarray(st["flip"], np.uint8)
        p = self.stem_k // 2
        self.u = np.zeros((h + 2 * p, w + 2 * p, model.channels), np.int32)
        h, w, c = conv_out(h, self.stem_k, self.stem_s), conv_out(w, self.stem_k, self.stem_s), sp["out_ch"]

        # activation arena: (offset, h, w, words) per binary output, borders zero forever
        bufs = [(0, h, w, n_words(c))]
        arena = _padded_size(h, w, n_words(c))
        plan, bw, thr, flip, scale, bias = [], [], [], [], [], []
        w_off = t_off = 0
        self.real = None
        self.layer_out = {0: ("bits", 0)}  # layer index -> ("bits", buf index) or ("real", None)
        for i, layer in enumerate(layers[1:-1], start=1):
            lp, lt = layer.params, layer.tensors
            in_off, in_h, in_w, in_words = bufs[-1]
            if layer.op == "maxpool2":
                h, w = h // 2, w // 2
                row = [OP_POOL, 0, 0, in_off, in_h, in_w, in_words, arena, h, w, in_words] + [0] * 8
                bufs.append((arena, h, w, in_words))
                arena += _padded_size(h, w, in_words)
                self.layer_out[i] = ("bits", len(bufs) - 1)
            else:
                k, s, n_out = lp["kernel"], lp["stride"], lp["out_ch"]
                h, w = conv_out(h, k, s), conv_out(w, k, s)
                wb = K.compact_weights(lt["weight"], lp["in_ch"])
                nup, nb, nvec = K.patch_layout(k, lp["in_ch"])
                kk = k * k * lp["in_ch"]
                bw.append(wb.ravel())
                tail = [nup, nvec, wb.shape[0]]
                if lp["output"] == "bits":
                    words = n_words(n_out)
                    row = [OP_BITS, k, s, in_off, in_h, in_w, in_words, arena, h, w, words, w_off, n_out, nb, kk, t_off] + tail
                    thr.append(lt["threshold"].astype(np.int32))
                    flip.append(lt["flip"].astype(np.uint8))
                    scale.append(np.zeros(n_out, np.float32))
                    bias.append(np.zeros(n_out, np.float32))
                    bufs.append((arena, h, w, words))
                    arena += _padded_size(h, w, words)
                    self.layer_out[i] = ("bits", len(bufs) - 1)
                else:
                    row = [OP_REAL, k, s, in_off, in_h, in_w, in_words, 0, h, w, 0, w_off, n_out, nb, kk, t_off] + tail
                    thr.append(np.zeros(n_out, np.int32))
                    flip.append(np.zeros(n_out, np.uint8))
                    scale.append(lt["scale"].astype(np.float32))
                    bias.append(lt["bias"].astype(np.float32))
                    self.real = np.zeros((h, w, n_out), np.float32)
                    self.layer_out[i] = ("real", None)
                w_off += wb.size
                t_off += n_out
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
        self.head_from_bits = self.real is None or layers[-2].op != "bconv" or layers[-2].params["output"] != "real"
        if self.head_from_bits:
            self.real = np.zeros((h, w, c), np.float32)
        self.head_w = np.ascontiguousarray(head.tensors["weight"], np.float32)
        self.head_b = np.ascontiguousarray(head.tensors["bias"], np.float32)
        self.head_out = np.zeros((h, w, head.params["out_ch"]), np.float32)
        self.last_bits = bufs[-1] + (c,)

    # ---------------------------------------------------------------- views
    def _buf(self, index):
        off, h, w, words = self.bufs[index]
        return self.act[off : off + _padded_size(h, w, words)].reshape(K.padded_shape(h, w, words))

    # ---------------------------------------------------------------- stages
    def stem(self, x):
        out = self._buf(0)
        if self.threads == 1:
            run_stem(x, self.u, self.stem_wt, self.stem_thr, self.stem_flip, self.stem_k, self.stem_s, out)
        else:
            numba.set_num_threads(min(self.threads, numba.config.NUMBA_NUM_THREADS))
            K.stem_pad(x, self.stem_k, self.u)
            K.stem_par(self.u, self.stem_wt, self.stem_thr, self.stem_flip, self.stem_k, self.stem_s, out,
                       4 * self.threads)

    def body(self):
        if self.threads == 1:
            run_body(self.plan, self.act, self.bw, self.thr, self.flip, self.scale, self.bias, self.real)
            return
        chunks = 4 * self.threads
        for p in self.plan:
            inp = self._view_of(p[C_IN_OFF], p[C_IN_H], p[C_IN_W], p[C_IN_WORDS])
            if p[C_OP] == OP_POOL:
                K.pool_par(inp, self._view_of(p[C_OUT_OFF], p[C_OUT_H], p[C_OUT_W], p[C_OUT_WORDS]), chunks)
                continue
            n_out, n_pad, nb, t0 = p[C_N_OUT], p[C_NPAD], p[C_NB], p[C_T_OFF]
            w = self.bw[p[C_W_OFF] : p[C_W_OFF] + n_pad * nb].reshape(n_pad, nb)
            if p[C_OP] == OP_BITS:
                out = self._view_of(p[C_OUT_OFF], p[C_OUT_H], p[C_OUT_W], p[C_OUT_WORDS])
                K.bconv_bits_par(inp, w, p[C_NUP], p[C_NVEC], p[C_KK], p[C_K], p[C_S], self.thr[t0 : t0 + n_out],
                                 self.flip[t0 : t0 + n_out], out, chunks)
            else:
                K.bconv_real_par(inp, w, p[C_NUP], p[C_NVEC], p[C_KK], p[C_K], p[C_S], self.scale[t0 : t0 + n_out],
                                 self.bias[t0 : t0 + n_out], self.real, chunks)

    def head(self):
        off, h, w, words, c = self.last_bits
        run_head(self.act, off, h, w, words, c, self.head_from_bits, self.real, self.head_w, self.head_b,
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
        for i, (kind, index) in self.layer_out.items():
            traced[i] = K.interior(self._buf(index)).copy() if kind == "bits" else self.real.copy()
        return head, traced
