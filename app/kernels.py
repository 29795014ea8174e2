"""numba kernels of the binary network. Their numpy twins live in app/reference.py.

Activation buffers of binary layers are packed uint64 (H+2, W+2, words) with a
one-pixel border of zero words: a zero word is +1 on every channel, which is
exactly the +1 padding of app/bits.py, so 3x3 convolutions read their padding
for free and never branch on borders. ``interior(buf)`` is the real tensor.

Binary convolutions work on bytes. Each output pixel's k*k patch is read in place
as k runs (its kernel rows) of k * nup 32-bit units, keeping only the units that
hold channels (ceil(in_ch / 32) per tap; the rest are zero in activations and
weights alike, so dropping them changes no popcount): the input's rows are read
as they are, or first copied without the other units, once per input pixel.
The weights are stored as pairs of patch bytes per output channel
(``compact_weights``), and ``xorcols*`` (explicit LLVM vector code) broadcasts
one pair of patch bytes against vectors of output channels: XOR, per-byte
popcount (NEON CNT, AVX-512 VPOPCNTB), and both bytes' counts added into the
channel's 16-bit lane (NEON UADALP). Output channels sit in vector lanes, so
there are no horizontal sums and no padding of K to whole vectors; each weight
vector load serves PATS = 2 neighbouring output pixels. Bits outputs are
thresholded while the counts are in registers (``xorbits*``). LLVM's own
vectoriser would widen every count to 64 bits, three extra NEON instructions
per vector on the Pi.

Every ``*_rows`` kernel computes output rows [r0, r1) so that the same code
runs single-threaded or split over threads (``*_par`` wrappers, prange).
Every kernel called from Python releases the GIL (``nogil``): while a frame is
detected, the capture thread, the web preview's encoder and MQTT run on the
Pi's other cores.
"""

from __future__ import annotations

import os
import platform

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

BORDER = 1  # border of every binary activation buffer; enough for kernels up to 3x3
# Bytes per vector of the XOR+popcount loop: one NEON register on the Pi, one AVX2/AVX-512VL ymm on x86.
# XNORCAM_VEC_BYTES overrides it (to test the Pi's layout on x86; use a separate NUMBA_CACHE_DIR then).
VEC_BYTES = int(os.environ.get("XNORCAM_VEC_BYTES", "16" if platform.machine().lower() in ("aarch64", "arm64") else "32"))
_AARCH64 = platform.machine().lower() in ("aarch64", "arm64")  # NEON's pairwise add-accumulate (UADALP) by name
# patch byte pairs counted in 16-bit lanes before they go to the int32 sums: each pair adds at most 16,
# 4094 * 16 <= 65535 (and even, as the pairs of one 32-bit patch unit stay together)
_FLUSH_PAIRS = 4094


@intrinsic
def popc(typingctx, x):
    """llvm.ctpop on an unsigned 64-bit word."""
    if not isinstance(x, types.Integer):
        return None
    sig = x(x)

    def codegen(context, builder, signature, args):
        return builder.ctpop(args[0])

    return sig, codegen


def _make_xorcols(pats: int, blocks: int, vec: int, masked: bool = False, bits: bool = False):
    """``masked``: the counts are popcount((patch ^ w) & mask), for a ternary input (sign and nonzero bytes).
    ``bits``: the counts are thresholded into packed bit words in registers, not stored as int32 sums."""
    lanes = vec // 2  # output channels per vector: each holds two patch bytes of each of its channels

    def xorcols(typingctx, src, msrc, p_offs, seg_stride, nseg, seg_pairs, wt, wt_off, ys, ys_off, y_stride):
        """ys[ys_off + p*y_stride + o] = sum_j popcount(patch_p[j] ^ byte j of channel o's weights)
        for p < pats, o < blocks*lanes, j < 2 * nseg * seg_pairs (seg_pairs even).

        The patch of pixel p is read in place: ``nseg`` runs (the kernel rows) of 2*seg_pairs
        bytes, run s at src[p_offs[p] + s*seg_stride] (and msrc for the mask); byte 2i + t of
        channel o's weights is wt[wt_off + i*blocks*vec + 2*o + t] (compact_weights: the pairs
        of one pass's channels are one stream, so every weight load is a constant offset from
        one pointer).

        Each pair of patch bytes is broadcast to every 16-bit lane and meets ``blocks``
        vectors of ``lanes`` output channels (weight loads shared by ``pats`` pixels): XOR,
        per-byte popcount, and the two bytes of a lane added into its 16-bit count in one
        pairwise add-accumulate (NEON UADALP). No horizontal sums, no byte-lane overflow
        to manage; the 16-bit counts go to the int32 sums every _FLUSH_PAIRS pairs and at the end.

        With ``bits`` (blocks * lanes a multiple of 64, every count below 2^15, so one chunk):
        ys is the int16 rules, ys_off the first channel ob of the pass, y_stride the uint64 words
        that take the bits, and p_offs holds after the pats offsets the pats nonzero counts (masked),
        n_out and planes: see ``_emit_bits``. (Arrays in a tuple would cost reference counts a call.)
        """
        for arr in (src, msrc, wt):
            if not (isinstance(arr, types.Array) and arr.dtype == types.uint8 and arr.ndim == 1):
                return None
        if not (isinstance(p_offs, types.Array) and p_offs.dtype == types.int64 and p_offs.ndim == 1):
            return None
        if bits:
            if not (isinstance(ys, types.Array) and ys.dtype == types.int16 and isinstance(y_stride, types.Array)
                    and y_stride.dtype == types.uint64):
                return None
        elif not (isinstance(ys, types.Array) and ys.dtype == types.int32 and ys.ndim == 1):
            return None
        sig = types.none(src, msrc, p_offs, seg_stride, nseg, seg_pairs, wt, wt_off, ys, ys_off, y_stride)

        def codegen(context, builder, signature, args):
            i64, i32, i16, i8, i1 = ir.IntType(64), ir.IntType(32), ir.IntType(16), ir.IntType(8), ir.IntType(1)
            vty, hty, dty = ir.VectorType(i8, vec), ir.VectorType(i16, lanes), ir.VectorType(i32, lanes)
            sa = signature.args
            s_arr = context.make_array(sa[0])(context, builder, args[0])
            m_arr = context.make_array(sa[1])(context, builder, args[1])
            o_arr = context.make_array(sa[2])(context, builder, args[2])
            w_arr = context.make_array(sa[6])(context, builder, args[6])
            sst, nsg, spr, woff, yoff = (context.cast(builder, args[i], sa[i], types.int64) for i in (3, 4, 5, 7, 9))
            wst = i64(blocks * vec)
            w_base = builder.gep(w_arr.data, [woff])
            offs = [builder.load(builder.gep(o_arr.data, [i64(q)])) for q in range(pats)]
            p_bases = [builder.gep(s_arr.data, [offs[q]]) for q in range(pats)]
            m_bases = [builder.gep(m_arr.data, [offs[q]]) for q in range(pats)]
            keys = [(q, b) for q in range(pats) for b in range(blocks)]
            if not bits:
                y_arr = context.make_array(sa[8])(context, builder, args[8])
                yst = context.cast(builder, args[10], sa[10], types.int64)
                y_ptrs = {(q, b): builder.bitcast(
                    builder.gep(y_arr.data, [builder.add(yoff, builder.add(builder.mul(yst, i64(q)), i64(b * lanes)))]),
                    dty.as_pointer()) for q, b in keys}
            mod = builder.module
            ctpop = cgutils.get_or_insert_function(mod, ir.FunctionType(vty, [vty]), f"llvm.ctpop.v{vec}i8")
            if _AARCH64:
                uaddlp = cgutils.get_or_insert_function(
                    mod, ir.FunctionType(hty, [vty]), f"llvm.aarch64.neon.uaddlp.v{lanes}i16.v{vec}i8")

                def pairsum(c):
                    return builder.call(uaddlp, [c])
            else:
                even = ir.Constant(ir.VectorType(i32, lanes), list(range(0, vec, 2)))
                odd = ir.Constant(ir.VectorType(i32, lanes), list(range(1, vec, 2)))

                def pairsum(c):
                    u = ir.Constant(vty, ir.Undefined)
                    return builder.add(builder.zext(builder.shuffle_vector(c, u, even), hty),
                                       builder.zext(builder.shuffle_vector(c, u, odd), hty))
            seg_p = cgutils.alloca_once_value(builder, i64(0))
            j_p = cgutils.alloca_once_value(builder, i64(0))
            end_p = cgutils.alloca_once_value(builder, i64(0))
            since_p = cgutils.alloca_once_value(builder, i64(0))  # pairs in the 16-bit counts
            first_p = cgutils.alloca_once_value(builder, ir.Constant(i1, 1))  # no flush yet: store, not add
            acc = {key: cgutils.alloca_once_value(builder, ir.Constant(hty, None)) for key in keys}
            fn = builder.function
            sc, sb, cc, cb, ic, ib, ie, fl, sn, dn = (
                fn.append_basic_block(f"xorcols.{n}") for n in ("sc", "sb", "cc", "cb", "ic", "ib", "ie", "fl", "sn", "dn"))

            def flush():
                if bits:  # one chunk by the caller's promise: the counts stay in registers for _emit_bits
                    return
                first = builder.load(first_p)
                for key, ptr in y_ptrs.items():
                    wide = builder.zext(builder.load(acc[key]), dty)
                    old = builder.select(first, ir.Constant(dty, None), builder.load(ptr, align=4))
                    builder.store(builder.add(old, wide), ptr, align=4)
                    builder.store(ir.Constant(hty, None), acc[key])
                builder.store(ir.Constant(i1, 0), first_p)
                builder.store(i64(0), since_p)

            builder.branch(sc)
            builder.position_at_end(sc)  # the kernel rows (runs of the patch)
            builder.cbranch(builder.icmp_signed("<", builder.load(seg_p), nsg), sb, dn)
            builder.position_at_end(sb)
            seg = builder.load(seg_p)
            rowoff = builder.mul(seg, sst)
            srcs = [builder.gep(p_bases[q], [rowoff]) for q in range(pats)]
            msrcs = [builder.gep(m_bases[q], [rowoff]) for q in range(pats)]
            wrow = builder.gep(w_base, [builder.mul(builder.mul(seg, spr), wst)])
            builder.store(i64(0), j_p)
            builder.branch(cc)
            builder.position_at_end(cc)  # chunks of the run that fit the 16-bit counts
            builder.cbranch(builder.icmp_signed("<", builder.load(j_p), spr), cb, sn)
            builder.position_at_end(cb)
            j = builder.load(j_p)
            e = builder.add(j, builder.sub(i64(_FLUSH_PAIRS), builder.load(since_p)))
            end = builder.select(builder.icmp_signed("<", e, spr), e, spr)
            builder.store(end, end_p)
            builder.store(builder.add(builder.load(since_p), builder.sub(end, j)), since_p)
            builder.branch(ic)
            builder.position_at_end(ic)
            builder.cbranch(builder.icmp_signed("<", builder.load(j_p), builder.load(end_p)), ib, ie)
            builder.position_at_end(ib)
            j0 = builder.load(j_p)
            # Two pairs (one 32-bit unit of the patch) per iteration: seg_pairs is even. (One LD2R for both
            # pairs' broadcasts let LLVM's scheduler hoist both halves' loads and spill: slower.)
            for step in range(2):
                jj = builder.add(j0, i64(step))

                def splat(base, jj=jj):
                    ptr = builder.bitcast(builder.gep(base, [builder.mul(jj, i64(2))]), i16.as_pointer())
                    half = builder.load(ptr, align=1)
                    s = builder.shuffle_vector(
                        builder.insert_element(ir.Constant(hty, ir.Undefined), half, i32(0)),
                        ir.Constant(hty, ir.Undefined), ir.Constant(ir.VectorType(i32, lanes), [0] * lanes))
                    return builder.bitcast(s, vty)

                splats = [splat(srcs[q]) for q in range(pats)]
                msplats = [splat(msrcs[q]) for q in range(pats)] if masked else []
                row = builder.gep(wrow, [builder.mul(jj, wst)])
                for b in range(blocks):
                    wv = builder.load(builder.bitcast(builder.gep(row, [i64(b * vec)]), vty.as_pointer()), align=1)
                    for q in range(pats):
                        x = builder.xor(splats[q], wv)
                        c = builder.call(ctpop, [builder.and_(x, msplats[q]) if masked else x])
                        builder.store(builder.add(builder.load(acc[q, b]), pairsum(c)), acc[q, b])
            builder.store(builder.add(j0, i64(2)), j_p)
            builder.branch(ic)
            builder.position_at_end(ie)
            builder.cbranch(builder.icmp_signed(">=", builder.load(since_p), i64(_FLUSH_PAIRS)), fl, cc)
            builder.position_at_end(fl)
            flush()
            builder.branch(cc)
            builder.position_at_end(sn)
            builder.store(builder.add(builder.load(seg_p), i64(1)), seg_p)
            builder.branch(sc)
            builder.position_at_end(dn)
            if bits:
                qq_arr = context.make_array(sa[8])(context, builder, args[8])
                wd_arr = context.make_array(sa[10])(context, builder, args[10])
                ctl = [builder.load(builder.gep(o_arr.data, [i64(pats + i)])) for i in range(pats + 2)]
                _emit_bits(builder, qq_arr.data, wd_arr.data, ctl[:pats], yoff, ctl[pats], ctl[pats + 1],
                           {key: builder.load(p) for key, p in acc.items()}, pats, blocks, lanes, masked)
            else:
                flush()
            return context.get_dummy_value()

        return sig, codegen

    return intrinsic(xorcols)


def _emit_bits(builder, qq_ptr, wd_ptr, nzs, ob, n_out, planes, counts, pats, blocks, lanes, masked):
    """Threshold the 16-bit counts of one pass into packed words, in registers.

    The pass covers output channels ob .. ob + blocks*lanes (whole 64-bit words); plane pl's
    bit of channel o is (t > qq16[pl*n_out + o]), t = s (the count) or, masked, nzs[p] - 2s
    (y over a ternary input; exact in 16-bit arithmetic as |y| < 2^15). Pixel p's word of
    plane pl and channel word w goes to words[p * planes * n_out/64 + pl * n_out/64 + ob/64 + w],
    flip not applied.

    On aarch64 the 64 compare lanes become a word by narrowing to bytes, one AND with
    each byte's bit and three pairwise adds (ADDP): about 20 instructions a word, where
    LLVM's own lowering of a <64 x i1> bitcast takes about 50.
    """
    i64, i32, i16, i8 = ir.IntType(64), ir.IntType(32), ir.IntType(16), ir.IntType(8)
    hty = ir.VectorType(i16, lanes)
    wpp = builder.sdiv(n_out, i64(64))
    per_word = 64 // lanes
    n_words = blocks * lanes // 64

    def splat16(v):
        return builder.shuffle_vector(builder.insert_element(ir.Constant(hty, ir.Undefined), v, i32(0)),
                                      ir.Constant(hty, ir.Undefined), ir.Constant(ir.VectorType(i32, lanes), [0] * lanes))

    ts = {}
    for q in range(pats):
        if masked:
            nz = splat16(builder.trunc(nzs[q], i16))
            for b in range(blocks):
                ts[q, b] = builder.sub(nz, builder.shl(counts[q, b], ir.Constant(hty, [1] * lanes)))
        else:
            for b in range(blocks):
                ts[q, b] = counts[q, b]
    mod = builder.module
    if _AARCH64:
        bty = ir.VectorType(i8, 16)
        addp = cgutils.get_or_insert_function(mod, ir.FunctionType(bty, [bty, bty]), "llvm.aarch64.neon.addp.v16i8")
        bitc = ir.Constant(bty, [1 << (i % 8) for i in range(16)])

    def word(cmps):
        """cmps: 64 // lanes <lanes x i1> of channels 0.. 63 -> i64, bit i = channel i."""
        if _AARCH64 and lanes == 8:
            regs = []
            for r in range(4):
                lo, hi = (builder.sext(cmps[2 * r + t], ir.VectorType(i8, 8)) for t in range(2))
                both = builder.shuffle_vector(lo, hi, ir.Constant(ir.VectorType(i32, 16), list(range(16))))
                regs.append(builder.and_(both, bitc))
            a = builder.call(addp, [regs[0], regs[1]])
            b = builder.call(addp, [regs[2], regs[3]])
            c = builder.call(addp, [a, b])
            d = builder.call(addp, [c, c])
            return builder.extract_element(builder.bitcast(d, ir.VectorType(i64, 2)), i32(0))
        level = list(cmps)
        while len(level) > 1:  # concatenate neighbours: lanes, 2 * lanes, ... 64 channels
            n = 2 * level[0].type.count
            cat = ir.Constant(ir.VectorType(i32, n), list(range(n)))
            level = [builder.shuffle_vector(level[i], level[i + 1], cat) for i in range(0, len(level), 2)]
        return builder.bitcast(level[0], i64)

    fn = builder.function
    for pl in range(2):
        body = fn.append_basic_block(f"bits.plane{pl}")
        after = fn.append_basic_block(f"bits.after{pl}")
        builder.cbranch(builder.icmp_signed(">", planes, i64(pl)), body, after)
        builder.position_at_end(body)
        qbase = builder.add(builder.mul(n_out, i64(pl)), ob)
        stores = []
        for w in range(n_words):
            qqs = [builder.load(builder.bitcast(builder.gep(qq_ptr, [builder.add(qbase, i64(64 * w + lanes * k))]),
                                                hty.as_pointer()), align=2) for k in range(per_word)]
            for q in range(pats):
                cmps = [builder.icmp_signed(">", ts[q, w * per_word + k], qqs[k]) for k in range(per_word)]
                idx = builder.add(builder.add(builder.mul(i64(q), builder.mul(planes, wpp)), builder.mul(wpp, i64(pl))),
                                  builder.add(builder.sdiv(ob, i64(64)), i64(w)))
                stores.append((idx, word(cmps)))
        for idx, val in stores:
            builder.store(val, builder.gep(wd_ptr, [idx]))
        builder.branch(after)
        builder.position_at_end(after)


def _make_bitmask64(masked: bool):
    """``masked`` False: the 64 bits (vals[v_off + i] > qq[q_off + i]) for i < 64, bit i = channel i.
    ``masked`` True: the same of nz - 2 * vals[v_off + i] (y of a conv over a ternary input).

    One vector compare per four channels and LLVM's bitmask of the <64 x i1>: about one aarch64
    instruction per output bit, where a compare, a byte store and the multiply pack per channel
    cost about six.
    """

    def bitmask64(typingctx, vals, v_off, qq, q_off, nz):
        for arr in (vals, qq):
            if not (isinstance(arr, types.Array) and arr.dtype == types.int32 and arr.ndim == 1):
                return None
        sig = types.uint64(vals, v_off, qq, q_off, nz)

        def codegen(context, builder, signature, args):
            i64, i32 = ir.IntType(64), ir.IntType(32)
            vty = ir.VectorType(i32, 64)
            sa = signature.args
            v_arr = context.make_array(sa[0])(context, builder, args[0])
            q_arr = context.make_array(sa[2])(context, builder, args[2])
            voff, qoff = (context.cast(builder, args[i], sa[i], types.int64) for i in (1, 3))
            v = builder.load(builder.bitcast(builder.gep(v_arr.data, [voff]), vty.as_pointer()), align=4)
            qv = builder.load(builder.bitcast(builder.gep(q_arr.data, [qoff]), vty.as_pointer()), align=4)
            if masked:
                n32 = builder.trunc(context.cast(builder, args[4], sa[4], types.int64), i32)
                nzv = builder.shuffle_vector(builder.insert_element(ir.Constant(vty, ir.Undefined), n32, i32(0)),
                                             ir.Constant(vty, ir.Undefined), ir.Constant(ir.VectorType(i32, 64), [0] * 64))
                v = builder.sub(nzv, builder.shl(v, ir.Constant(vty, [1] * 64)))
            c = builder.icmp_signed(">", v, qv)
            return builder.bitcast(c, i64)

        return sig, codegen

    return intrinsic(bitmask64)


bitmask64 = _make_bitmask64(False)
bitmask64_masked = _make_bitmask64(True)


@njit(cache=True, nogil=True)
def _word_rules(fm, q, n_out, planes):
    """The rules (v ^ fm) > q of planes * n_out output bits (n_out % 64 == 0) as one compare and a flip:
    bit = (v > qq) ^ flip, qq laid out per output word (64 rules), flip packed per output word.

    fm 0: qq = q. fm -1: (v ^ -1) > q  <=>  -v - 1 > q  <=>  v <= -q - 2  <=>  not (v > -q - 2)
    (computed in int64; only q = INT32_MAX leaves int32, where v > INT32_MIN - 1 is always true,
    as v > INT32_MIN is for every value a conv count or sum takes).
    """
    n = planes * n_out
    qq = np.empty(n, np.int32)
    flipw = np.zeros(n // 64, np.uint64)
    for o in range(n):
        if fm[o] == 0:
            qq[o] = q[o]
        else:
            qq[o] = max(-np.int64(q[o]) - 2, np.int64(-(1 << 31)))
            flipw[o // 64] |= np.uint64(1) << np.uint64(o % 64)
    return qq, flipw


@njit(cache=True, nogil=True)
def _rules16(qq, lo, hi):
    """The per-bit rules qq (bit = t > qq) clamped to [lo, hi] as int16: the same bits for every t in
    (lo, hi], the range of the count or y of a conv whose patch has at most hi < 2^15 bits."""
    out = np.empty(qq.shape[0], np.int16)
    for i in range(qq.shape[0]):
        out[i] = min(max(np.int64(qq[i]), lo), hi)
    return out


@njit(cache=True, inline="always")
def _bits_passes(src, msrc, ctl, seg_stride, k, seg_pairs, npairs, wflat, masked, qq16, n_out, wbuf):
    """Every pass of a conv whose output words are thresholded in registers (xorbits*/andbits*)."""
    ob = 0
    while ob < n_out:
        if n_out - ob >= 8 * _LANES:
            if masked:
                andbits8(src, msrc, ctl, seg_stride, k, seg_pairs, wflat, 2 * npairs * ob, qq16, ob, wbuf)
            else:
                xorbits8(src, msrc, ctl, seg_stride, k, seg_pairs, wflat, 2 * npairs * ob, qq16, ob, wbuf)
            ob += 8 * _LANES
        elif 4 * _LANES % 64 == 0:  # a last pass of 4 vectors (x86's 16 channels a vector)
            if masked:
                andbits4(src, msrc, ctl, seg_stride, k, seg_pairs, wflat, 2 * npairs * ob, qq16, ob, wbuf)
            else:
                xorbits4(src, msrc, ctl, seg_stride, k, seg_pairs, wflat, 2 * npairs * ob, qq16, ob, wbuf)
            ob += 4 * _LANES


PATS = 2  # output pixels per pass over the weights (each weight vector load serves PATS patches)
xorcols8 = _make_xorcols(PATS, 8, VEC_BYTES)
xorcols4 = _make_xorcols(PATS, 4, VEC_BYTES)
xorcols2 = _make_xorcols(PATS, 2, VEC_BYTES)
xorcols1 = _make_xorcols(PATS, 1, VEC_BYTES)
# over a ternary input: popcount((sign ^ w) & nonzero)
andcols8 = _make_xorcols(PATS, 8, VEC_BYTES, masked=True)
andcols4 = _make_xorcols(PATS, 4, VEC_BYTES, masked=True)
andcols2 = _make_xorcols(PATS, 2, VEC_BYTES, masked=True)
andcols1 = _make_xorcols(PATS, 1, VEC_BYTES, masked=True)
# counts thresholded in registers into packed words (passes of whole words only: 8 or 4 vectors)
xorbits8 = _make_xorcols(PATS, 8, VEC_BYTES, bits=True)
xorbits4 = _make_xorcols(PATS, 4, VEC_BYTES, bits=True)
andbits8 = _make_xorcols(PATS, 8, VEC_BYTES, masked=True, bits=True)
andbits4 = _make_xorcols(PATS, 4, VEC_BYTES, masked=True, bits=True)


def padded_shape(h: int, w: int, words: int) -> tuple[int, int, int]:
    return (h + 2 * BORDER, w + 2 * BORDER, words)


def interior(buf: np.ndarray) -> np.ndarray:
    return buf[BORDER:-BORDER, BORDER:-BORDER]


def patch_layout(kernel: int, in_ch: int) -> tuple[int, int]:
    """(32-bit units kept per tap, patch bytes) of a binary conv."""
    nup = (in_ch + 31) // 32
    return nup, kernel * kernel * nup * 4


def pass_blocks(o_pad: int) -> list[int]:
    """Vectors of output channels per pass of the binary convs (``_sums``): 8 while 8 are left, then 4, 2, 1."""
    left, out = o_pad // (VEC_BYTES // 2), []
    while left >= 8:
        out.append(8)
        left -= 8
    for b in (4, 2, 1):
        if left >= b:
            out.append(b)
            left -= b
    return out


def compact_weights(weight: np.ndarray, in_ch: int) -> np.ndarray:
    """(out, k, k, words) uint64 weights -> (patch bytes / 2, 2 * out padded to whole vectors) uint8.

    Patch bytes 2i and 2i + 1 of an output channel sit side by side: one vector is
    VEC_BYTES / 2 consecutive output channels, two bytes each, which meets a broadcast pair
    of patch bytes and adds into that channel's 16-bit lane (``xorcols*``). The shape says
    the sizes; the bytes are ordered by pass (``pass_blocks``): a pass's channels, pair
    after pair, so that its kernel streams them with one pointer.
    """
    out, k = weight.shape[0], weight.shape[1]
    nup, nb = patch_layout(k, in_ch)
    lanes = VEC_BYTES // 2
    raw = np.ascontiguousarray(weight, dtype="<u8").view(np.uint8).reshape(out, k * k, -1)[:, :, : 4 * nup]
    o_pad = -(-out // lanes) * lanes
    pairs = np.zeros((nb // 2, o_pad, 2), np.uint8)
    pairs[:, :out] = raw.reshape(out, nb // 2, 2).transpose(1, 0, 2)
    runs, ob = [], 0
    for b in pass_blocks(o_pad):
        runs.append(pairs[:, ob : ob + b * lanes].reshape(-1))
        ob += b * lanes
    return np.concatenate(runs).reshape(nb // 2, 2 * o_pad)


# ------------------------------------------------------------------ stem
def stem_planes_shape(h: int, w: int, c: int, k: int, stride: int) -> tuple[int, int, int]:
    """Shape of the stem's input planes: (c * stride, H + 2p, ceil((W + 2p) / stride))."""
    p = k // 2
    return (c * stride, h + 2 * p, -(-(w + 2 * p) // stride))


@njit(cache=True, nogil=True)
def stem_pad(x, k, stride, pl):
    """pl <- u = x - 128, zero padded by k // 2, columns split by phase (x % stride).

    Plane ``ch * stride + ph`` holds the padded columns ph, ph + stride, ... of channel ch,
    so every tap of a strided conv reads a contiguous run. Only the interior is written:
    the zero border of a freshly allocated pl stays zero.
    """
    p = k // 2
    h, w, c = x.shape
    for yy in range(h):
        for ch in range(c):
            for ph in range(stride):
                plane = pl[ch * stride + ph, yy + p]
                # padded column i*stride + ph is image column i*stride + ph - p, kept when in 0..w-1
                i0 = max(0, -(-(p - ph) // stride))
                i1 = -(-(w + p - ph) // stride)
                for i in range(i0, i1):
                    plane[i] = np.int32(x[yy, i * stride + ph - p, ch]) - 128


@njit(cache=True, inline="always")
def _pack_bytes(g8, out, y, x):
    """0/1 bytes (one per channel, zero past the last; g8 = their uint64 view) -> out[y, x, :].

    Eight bytes at a time: multiplying by 0x0102040810204080 moves byte i's low bit to
    bit 56 + i without carries, so ``>> 56`` leaves the eight bits in order. (Indices, not
    views: a view per pixel costs numba reference counting.)
    """
    for wi in range(out.shape[2]):
        word = np.uint64(0)
        for g in range(8):
            v = g8[wi * 8 + g]
            word |= ((v * np.uint64(0x0102040810204080)) >> np.uint64(56)) << np.uint64(8 * g)
        out[y, x, wi] = word


@njit(cache=True, nogil=True)
def _int_thresholds(thr, flip):
    """The threshold rule on an integer y as one compare: bit 1 iff (y ^ fm) > q.

    flip 0: y < t  <=>  ~y > -t - 1   (fm = -1, ~y = y ^ -1)
    flip 1: y > t                     (fm = 0, q = t)
    """
    n = thr.shape[0]
    fm = np.empty(n, np.int32)
    q = np.empty(n, np.int32)
    for o in range(n):
        t = np.int64(thr[o])
        if flip[o]:
            fm[o] = 0
            q[o] = t
        else:
            fm[o] = -1
            q[o] = -t - 1
    return fm, q


@njit(cache=True, inline="always")
def _taps9(wt, o):
    return (wt[0, o], wt[1, o], wt[2, o], wt[3, o], wt[4, o], wt[5, o], wt[6, o], wt[7, o], wt[8, o])


@njit(cache=True, inline="always")
def _dot9(w, r0_, r1_, r2_, r3_, r4_, r5_, r6_, r7_, r8_, ox):
    return np.int32(w[0] * r0_[ox] + w[1] * r1_[ox] + w[2] * r2_[ox] + w[3] * r3_[ox] + w[4] * r4_[ox]
                    + w[5] * r5_[ox] + w[6] * r6_[ox] + w[7] * r7_[ox] + w[8] * r8_[ox])


@njit(cache=True, inline="always")
def _bits4(a, b, c, d, fa, fb, fc, fd, qa, qb, qc, qd):
    """The threshold bits of four accumulators in the low four bits (app/bits.py's rule, as (y ^ fm) > q)."""
    return (np.uint32((a ^ fa) > qa) | (np.uint32((b ^ fb) > qb) << np.uint32(1))
            | (np.uint32((c ^ fc) > qc) << np.uint32(2)) | (np.uint32((d ^ fd) > qd) << np.uint32(3)))


@njit(cache=True, nogil=True)
def stem_rows(pl, wt, thr, flip, k, stride, planes, out, r0, r1):
    """Integer stem conv + threshold -> packed bits into the interior of out.

    pl: stem_pad planes; wt: int32 (k*k*C, out_ch) in (ky, kx, c) tap order. Vectorised
    along the output row: for each output channel, all taps of a whole row are summed
    in registers and the bits are or-ed into 32-bit halves of the output words.
    planes 2 (a ternary output, app/bits.py): thr and flip hold 2 * out_ch rules, and
    each accumulator is compared twice, into bit o and bit out_ch + o.
    """
    ntaps, n_out = wt.shape
    c = ntaps // (k * k)
    wo = out.shape[1] - 2 * BORDER
    words = out.shape[2]
    fm, q = _int_thresholds(thr, flip)
    halves = np.zeros((2 * words, wo), np.uint32)
    acc = np.zeros(wo, np.int32)
    tpl = np.empty(ntaps, np.int64)
    tky = np.empty(ntaps, np.int64)
    tcol = np.empty(ntaps, np.int64)
    for ky in range(k):
        for kx in range(k):
            for ch in range(c):
                t = (ky * k + kx) * c + ch
                tpl[t] = ch * stride + kx % stride
                tky[t] = ky
                tcol[t] = kx // stride
    for oy in range(r0, r1):
        halves[:] = 0
        y0 = oy * stride
        if ntaps == 9:
            r0_ = pl[tpl[0], y0 + tky[0], tcol[0] : tcol[0] + wo]
            r1_ = pl[tpl[1], y0 + tky[1], tcol[1] : tcol[1] + wo]
            r2_ = pl[tpl[2], y0 + tky[2], tcol[2] : tcol[2] + wo]
            r3_ = pl[tpl[3], y0 + tky[3], tcol[3] : tcol[3] + wo]
            r4_ = pl[tpl[4], y0 + tky[4], tcol[4] : tcol[4] + wo]
            r5_ = pl[tpl[5], y0 + tky[5], tcol[5] : tcol[5] + wo]
            r6_ = pl[tpl[6], y0 + tky[6], tcol[6] : tcol[6] + wo]
            r7_ = pl[tpl[7], y0 + tky[7], tcol[7] : tcol[7] + wo]
            r8_ = pl[tpl[8], y0 + tky[8], tcol[8] : tcol[8] + wo]
            # Four channels per pass over the row: each tap's vector load serves four accumulators
            # and one read-modify-write of the output half takes their four bits (30 -> about 18
            # aarch64 instructions per channel and 4 pixels). Four consecutive channels share a
            # 32-bit half when they start at a multiple of 4, in the hi plane too if n_out % 4 == 0.
            groups = n_out // 4 if planes == 1 or n_out % 4 == 0 else 0
            for g in range(groups):
                o = 4 * g
                hi, sh = o >> 5, np.uint32(o & 31)
                wa, wb, wc, wd = _taps9(wt, o), _taps9(wt, o + 1), _taps9(wt, o + 2), _taps9(wt, o + 3)
                fa, fb, fc, fd = fm[o], fm[o + 1], fm[o + 2], fm[o + 3]
                qa, qb, qc, qd = q[o], q[o + 1], q[o + 2], q[o + 3]
                for ox in range(wo):
                    a = _dot9(wa, r0_, r1_, r2_, r3_, r4_, r5_, r6_, r7_, r8_, ox)
                    b = _dot9(wb, r0_, r1_, r2_, r3_, r4_, r5_, r6_, r7_, r8_, ox)
                    c_ = _dot9(wc, r0_, r1_, r2_, r3_, r4_, r5_, r6_, r7_, r8_, ox)
                    d = _dot9(wd, r0_, r1_, r2_, r3_, r4_, r5_, r6_, r7_, r8_, ox)
                    halves[hi, ox] |= _bits4(a, b, c_, d, fa, fb, fc, fd, qa, qb, qc, qd) << sh
                if planes == 2:
                    o2 = n_out + o
                    hi2, sh2 = o2 >> 5, np.uint32(o2 & 31)
                    fa, fb, fc, fd = fm[o2], fm[o2 + 1], fm[o2 + 2], fm[o2 + 3]
                    qa, qb, qc, qd = q[o2], q[o2 + 1], q[o2 + 2], q[o2 + 3]
                    for ox in range(wo):
                        a = _dot9(wa, r0_, r1_, r2_, r3_, r4_, r5_, r6_, r7_, r8_, ox)
                        b = _dot9(wb, r0_, r1_, r2_, r3_, r4_, r5_, r6_, r7_, r8_, ox)
                        c_ = _dot9(wc, r0_, r1_, r2_, r3_, r4_, r5_, r6_, r7_, r8_, ox)
                        d = _dot9(wd, r0_, r1_, r2_, r3_, r4_, r5_, r6_, r7_, r8_, ox)
                        halves[hi2, ox] |= _bits4(a, b, c_, d, fa, fb, fc, fd, qa, qb, qc, qd) << sh2
        else:
            groups = 0
        for o in range(4 * groups, n_out):
            hi = o >> 5
            f, qq, sh = fm[o], q[o], np.uint32(o & 31)
            o2 = (planes - 1) * n_out + o  # the hi plane's bit (o itself when planes == 1)
            hi2, f2, q2, sh2 = o2 >> 5, fm[o2], q[o2], np.uint32(o2 & 31)
            if ntaps == 9:
                w0, w1, w2, w3, w4 = wt[0, o], wt[1, o], wt[2, o], wt[3, o], wt[4, o]
                w5, w6, w7, w8 = wt[5, o], wt[6, o], wt[7, o], wt[8, o]
                if planes == 1:
                    for ox in range(wo):
                        a = np.int32(
                            w0 * r0_[ox] + w1 * r1_[ox] + w2 * r2_[ox] + w3 * r3_[ox] + w4 * r4_[ox]
                            + w5 * r5_[ox] + w6 * r6_[ox] + w7 * r7_[ox] + w8 * r8_[ox]
                        )
                        halves[hi, ox] |= np.uint32((a ^ f) > qq) << sh
                else:
                    for ox in range(wo):
                        a = np.int32(
                            w0 * r0_[ox] + w1 * r1_[ox] + w2 * r2_[ox] + w3 * r3_[ox] + w4 * r4_[ox]
                            + w5 * r5_[ox] + w6 * r6_[ox] + w7 * r7_[ox] + w8 * r8_[ox]
                        )
                        halves[hi, ox] |= np.uint32((a ^ f) > qq) << sh
                        halves[hi2, ox] |= np.uint32((a ^ f2) > q2) << sh2
            else:
                acc[:] = 0
                for t in range(ntaps):
                    wv = wt[t, o]
                    row = pl[tpl[t], y0 + tky[t], tcol[t] : tcol[t] + wo]
                    for ox in range(wo):
                        acc[ox] = np.int32(acc[ox] + wv * row[ox])
                for ox in range(wo):
                    halves[hi, ox] |= np.uint32((acc[ox] ^ f) > qq) << sh
                if planes == 2:
                    for ox in range(wo):
                        halves[hi2, ox] |= np.uint32((acc[ox] ^ f2) > q2) << sh2
        for ox in range(wo):
            for wi in range(words):
                out[oy + BORDER, ox + BORDER, wi] = np.uint64(halves[2 * wi, ox]) | (
                    np.uint64(halves[2 * wi + 1, ox]) << np.uint64(32))


# ------------------------------------------------------------------ pool
@njit(cache=True, nogil=True)
def pool_rows(inp, out, r0, r1):
    """2x2 stride-2 AND of the interior of inp into the interior of out (odd last row/col dropped)."""
    wo = out.shape[1] - 2 * BORDER
    words = out.shape[2]
    for oy in range(r0, r1):
        iy = 2 * oy + BORDER
        for ox in range(wo):
            ix = 2 * ox + BORDER
            for wi in range(words):
                out[oy + BORDER, ox + BORDER, wi] = (
                    inp[iy, ix, wi] & inp[iy, ix + 1, wi] & inp[iy + 1, ix, wi] & inp[iy + 1, ix + 1, wi]
                )


# ------------------------------------------------------------------ binary conv
# The convs read each patch in place, as k runs (its kernel rows) of k * nup 32-bit units:
# the input's rows are first copied with only the nup units per pixel that hold channels
# (all of them when the channels fill whole 64-bit words: then the input itself is read),
# once per input pixel, not once per tap of every output pixel as a gather would.
@njit(cache=True, inline="always")
def _row_span(r0, r1, k, stride, hp):
    """The padded input rows [y0, y1) that output rows [r0, r1) read."""
    off = BORDER - k // 2
    if r1 <= r0:
        return 0, 0
    return r0 * stride + off, min((r1 - 1) * stride + off + k, hp)


@njit(cache=True, nogil=True)
def _binary_source(inp, nup, k, stride, r0, r1):
    """The padded input as bytes, nup units per pixel: inp itself when those are all its units."""
    hp, wp, upp = inp.shape[0], inp.shape[1], inp.shape[2] * 2
    flat = inp.reshape(inp.size)
    if nup == upp:
        return flat.view(np.uint8)
    src32 = flat.view(np.uint32)
    comp = np.empty(hp * wp * nup, np.uint32)
    y0, y1 = _row_span(r0, r1, k, stride, hp)
    for y in range(y0, y1):
        for x in range(wp):
            s, d = (y * wp + x) * upp, (y * wp + x) * nup
            for u in range(nup):
                comp[d + u] = src32[s + u]
    return comp.view(np.uint8)


@njit(cache=True, inline="always")
def _pixel_offsets(wp, nup, k, stride, oy, ox, wo, p_offs):
    """Byte offsets of the patches of output pixels ox .. ox+PATS-1 (past the row end: the last pixel)."""
    off = BORDER - k // 2
    for q in range(PATS):
        x = min(ox + q, wo - 1)
        p_offs[q] = ((oy * stride + off) * wp + x * stride + off) * nup * 4


_LANES = VEC_BYTES // 2  # output channels per vector of xorcols*


@njit(cache=True, inline="always")
def _sums(src, p_offs, seg_stride, k, seg_pairs, npairs, wflat, o_stride, ys):
    """ys[q * o_stride + o] = popcount(patch q ^ weights of o), every output (padded to whole vectors)."""
    ob = 0
    while o_stride - ob >= 8 * _LANES:
        xorcols8(src, src, p_offs, seg_stride, k, seg_pairs, wflat, 2 * npairs * ob, ys, ob, o_stride)
        ob += 8 * _LANES
    if o_stride - ob >= 4 * _LANES:
        xorcols4(src, src, p_offs, seg_stride, k, seg_pairs, wflat, 2 * npairs * ob, ys, ob, o_stride)
        ob += 4 * _LANES
    if o_stride - ob >= 2 * _LANES:
        xorcols2(src, src, p_offs, seg_stride, k, seg_pairs, wflat, 2 * npairs * ob, ys, ob, o_stride)
        ob += 2 * _LANES
    if o_stride - ob >= _LANES:
        xorcols1(src, src, p_offs, seg_stride, k, seg_pairs, wflat, 2 * npairs * ob, ys, ob, o_stride)


@njit(cache=True, inline="always")
def _masked_sums(sgn, msk, p_offs, seg_stride, k, seg_pairs, npairs, wflat, o_stride, ys):
    """ys[q * o_stride + o] = popcount((sign bytes q ^ weights of o) & nonzero bytes q)."""
    ob = 0
    while o_stride - ob >= 8 * _LANES:
        andcols8(sgn, msk, p_offs, seg_stride, k, seg_pairs, wflat, 2 * npairs * ob, ys, ob, o_stride)
        ob += 8 * _LANES
    if o_stride - ob >= 4 * _LANES:
        andcols4(sgn, msk, p_offs, seg_stride, k, seg_pairs, wflat, 2 * npairs * ob, ys, ob, o_stride)
        ob += 4 * _LANES
    if o_stride - ob >= 2 * _LANES:
        andcols2(sgn, msk, p_offs, seg_stride, k, seg_pairs, wflat, 2 * npairs * ob, ys, ob, o_stride)
        ob += 2 * _LANES
    if o_stride - ob >= _LANES:
        andcols1(sgn, msk, p_offs, seg_stride, k, seg_pairs, wflat, 2 * npairs * ob, ys, ob, o_stride)


@njit(cache=True, nogil=True)
def _popcount_thresholds(thr, flip, kk):
    """The threshold rule restated on s = popcount(xor), y = kk - 2s: bit 1 iff (s ^ fm) > q.

    flip 0: y < t  <=>  s > floor((kk - t) / 2)                     (fm = 0)
    flip 1: y > t  <=>  s < ceil((kk - t) / 2) =: B  <=>  ~s > -B - 1  (fm = -1, ~s = s ^ -1)
    Branch-free and multiply-free, so the packing loop vectorises.
    """
    n = thr.shape[0]
    fm = np.empty(n, np.int32)
    q = np.empty(n, np.int32)
    for o in range(n):
        m = kk - np.int64(thr[o])
        # s lies in [0, kk] (and ~s in [-kk-1, -1]): clamping q to int32 keeps every comparison
        qq = (-m) // 2 - 1 if flip[o] else m // 2
        q[o] = min(max(qq, -(1 << 31)), (1 << 31) - 1)
        fm[o] = -1 if flip[o] else 0
    return fm, q


@njit(cache=True, nogil=True)
def bconv_bits_rows(inp, wt, nup, kk, k, stride, thr, flip, planes, out, r0, r1):
    """Binary conv (+1 padding from the border) with fused thresholds -> packed bits in out's interior.

    inp: padded (Hi+2, Wi+2, wi) uint64; wt: compact_weights(); kk = K = k*k*in_ch.
    planes 2 (a ternary output): thr and flip hold 2 * out_ch rules; output channel o's count
    sets bit o (lo plane) and bit out_ch + o (hi plane).
    """
    n_out = thr.shape[0] // planes
    npairs, wrow = wt.shape
    o_stride = wrow // 2  # output channels padded to whole vectors
    wflat = wt.reshape(npairs * wrow)
    src = _binary_source(inp, nup, k, stride, r0, r1)
    wp = inp.shape[1]
    wo = out.shape[1] - 2 * BORDER
    words = out.shape[2]
    ys = np.zeros(PATS * o_stride, np.int32)
    fm, q = _popcount_thresholds(thr, flip, kk)
    b8 = np.zeros(words * 64, np.uint8)
    g8 = b8.view(np.uint64)
    vec = n_out % 64 == 0
    qq, flipw = _word_rules(fm, q, n_out, planes) if vec else (q, g8)
    wpp = n_out // 64  # words per plane when vec
    # counts below 2^15 (every real layer): thresholds in 16-bit lanes, words built in registers
    fast = vec and 16 * npairs < 1 << 15
    wbuf = np.zeros(PATS * words, np.uint64)
    qq16 = _rules16(qq, -1, 16 * npairs) if fast else np.zeros(1, np.int16)
    p_offs = np.zeros(2 * PATS + 2, np.int64)  # the patches' offsets, then (xorbits) nonzero counts, n_out, planes
    p_offs[2 * PATS], p_offs[2 * PATS + 1] = n_out, planes
    for oy in range(r0, r1):
        for ox in range(0, wo, PATS):
            _pixel_offsets(wp, nup, k, stride, oy, ox, wo, p_offs)
            if fast:
                _bits_passes(src, src, p_offs, wp * nup * 4, k, 2 * k * nup, npairs, wflat, False, qq16, n_out, wbuf)
                for p in range(min(PATS, wo - ox)):
                    for wi in range(words):
                        out[oy + BORDER, ox + p + BORDER, wi] = wbuf[p * words + wi] ^ flipw[wi]
                continue
            _sums(src, p_offs, wp * nup * 4, k, 2 * k * nup, npairs, wflat, o_stride, ys)
            for p in range(min(PATS, wo - ox)):
                base = p * o_stride
                if vec:  # whole words: each plane's 64 channels at a time
                    for pl in range(planes):
                        for w in range(wpp):
                            wi = pl * wpp + w
                            out[oy + BORDER, ox + p + BORDER, wi] = bitmask64(
                                ys, base + 64 * w, qq, wi * 64, 0) ^ flipw[wi]
                    continue
                for o in range(n_out):
                    b8[o] = np.uint8((ys[base + o] ^ fm[o]) > q[o])
                if planes == 2:
                    for o in range(n_out):
                        b8[n_out + o] = np.uint8((ys[base + o] ^ fm[n_out + o]) > q[n_out + o])
                _pack_bytes(g8, out, oy + BORDER, ox + p + BORDER)


@njit(cache=True, nogil=True)
def bconv_real_rows(inp, wt, nup, kk, k, stride, scale, bias, out, r0, r1):
    """Binary conv with a real output r = scale * y + bias (float32, (Ho, Wo, out_ch), no border)."""
    n_out = scale.shape[0]
    npairs, wrow = wt.shape
    o_stride = wrow // 2  # output channels padded to whole vectors
    wflat = wt.reshape(npairs * wrow)
    src = _binary_source(inp, nup, k, stride, r0, r1)
    wp = inp.shape[1]
    wo = out.shape[1]
    p_offs = np.zeros(PATS, np.int64)
    ys = np.zeros(PATS * o_stride, np.int32)
    for oy in range(r0, r1):
        for ox in range(0, wo, PATS):
            _pixel_offsets(wp, nup, k, stride, oy, ox, wo, p_offs)
            _sums(src, p_offs, wp * nup * 4, k, 2 * k * nup, npairs, wflat, o_stride, ys)
            for p in range(min(PATS, wo - ox)):
                # y in int32 (|y| <= K < 2^31, exact in float32 below 2^24 as before): the loop then runs
                # 4 channels a vector, where int64 arithmetic and its conversion kept it scalar
                for o in range(n_out):
                    out[oy, ox + p, o] = scale[o] * np.float32(np.int32(kk - 2 * ys[p * o_stride + o])) + bias[o]


# ------------------------------------------------------------------ convs over a ternary input
# A ternary input of C channels (C % 32 == 0) is 2C packed bits: per pixel the lo plane's C/32
# units, then the hi plane's (app/bits.py). Its rows are first turned into sign units (lo: bit 1
# iff v = -1) and nonzero units (lo | ~hi), with each pixel's nonzero count, so y = sum w·v =
# M - 2·popcount((sign ^ w) & nonzero), M the patch's nonzero count: one masked pass over the
# patch bytes, not one pass per plane.
@njit(cache=True, nogil=True)
def _ternary_source(inp, nup, k, stride, r0, r1):
    """(sign bytes, nonzero bytes, nonzero count per padded pixel) of the input rows that rows r0..r1 read."""
    hp, wp, upp = inp.shape[0], inp.shape[1], inp.shape[2] * 2
    src32 = inp.reshape(inp.size).view(np.uint32)
    sgn = np.empty(hp * wp * nup, np.uint32)
    msk = np.empty(hp * wp * nup, np.uint32)
    nzp = np.empty(hp * wp, np.int32)
    y0, y1 = _row_span(r0, r1, k, stride, hp)
    for y in range(y0, y1):
        for x in range(wp):
            s, d = (y * wp + x) * upp, (y * wp + x) * nup
            nz = 0
            for u in range(nup):
                lo = src32[s + u]
                m = lo | ~src32[s + nup + u]
                sgn[d + u] = lo
                msk[d + u] = m
                nz += popc(m)
            nzp[y * wp + x] = nz
    return sgn.view(np.uint8), msk.view(np.uint8), nzp


@njit(cache=True, inline="always")
def _patch_nonzeros(nzp, wp, k, stride, oy, ox, wo, nzs):
    """M of the patches of output pixels ox .. ox+PATS-1 (past the row end: the last pixel)."""
    off = BORDER - k // 2
    for q in range(PATS):
        x = min(ox + q, wo - 1)
        base = (oy * stride + off) * wp + x * stride + off
        nz = 0
        for ky in range(k):
            for kx in range(k):
                nz += nzp[base + ky * wp + kx]
        nzs[q] = nz


@njit(cache=True, nogil=True)
def tconv_bits_rows(inp, wt, nup, k, stride, thr, flip, planes, out, r0, r1):
    """Binary weights over a ternary input (+1 padding) with fused thresholds on y -> packed bits (planes 1 or 2).

    wt: compact_weights(weight, C) of the logical C channels; thr, flip: rules on y = sum w·v.
    """
    n_out = thr.shape[0] // planes
    npairs, wrow = wt.shape
    o_stride = wrow // 2  # output channels padded to whole vectors
    wflat = wt.reshape(npairs * wrow)
    sgn, msk, nzp = _ternary_source(inp, nup, k, stride, r0, r1)
    wp = inp.shape[1]
    wo = out.shape[1] - 2 * BORDER
    words = out.shape[2]
    ys = np.zeros(PATS * o_stride, np.int32)
    nzs = np.zeros(PATS, np.int32)
    fm, q = _int_thresholds(thr, flip)
    b8 = np.zeros(words * 64, np.uint8)
    g8 = b8.view(np.uint64)
    vec = n_out % 64 == 0
    qq, flipw = _word_rules(fm, q, n_out, planes) if vec else (q, g8)
    wpp = n_out // 64  # words per plane when vec
    fast = vec and 16 * npairs < 1 << 15  # as in bconv_bits_rows, on y = M - 2s in [-K, K]
    wbuf = np.zeros(PATS * words, np.uint64)
    qq16 = _rules16(qq, -16 * npairs - 1, 16 * npairs) if fast else np.zeros(1, np.int16)
    p_offs = np.zeros(2 * PATS + 2, np.int64)  # the patches' offsets, then (andbits) nonzero counts, n_out, planes
    p_offs[2 * PATS], p_offs[2 * PATS + 1] = n_out, planes
    for oy in range(r0, r1):
        for ox in range(0, wo, PATS):
            _pixel_offsets(wp, nup, k, stride, oy, ox, wo, p_offs)
            _patch_nonzeros(nzp, wp, k, stride, oy, ox, wo, nzs)
            if fast:
                for p in range(PATS):
                    p_offs[PATS + p] = nzs[p]
                _bits_passes(sgn, msk, p_offs, wp * nup * 4, k, 2 * k * nup, npairs, wflat, True, qq16, n_out, wbuf)
                for p in range(min(PATS, wo - ox)):
                    for wi in range(words):
                        out[oy + BORDER, ox + p + BORDER, wi] = wbuf[p * words + wi] ^ flipw[wi]
                continue
            _masked_sums(sgn, msk, p_offs, wp * nup * 4, k, 2 * k * nup, npairs, wflat, o_stride, ys)
            for p in range(min(PATS, wo - ox)):
                base = p * o_stride
                nz = nzs[p]
                if vec:
                    for pl in range(planes):
                        for w in range(wpp):
                            wi = pl * wpp + w
                            out[oy + BORDER, ox + p + BORDER, wi] = bitmask64_masked(
                                ys, base + 64 * w, qq, wi * 64, nz) ^ flipw[wi]
                    continue
                for o in range(n_out):
                    b8[o] = np.uint8(((nz - 2 * ys[base + o]) ^ fm[o]) > q[o])
                if planes == 2:
                    for o in range(n_out):
                        b8[n_out + o] = np.uint8(((nz - 2 * ys[base + o]) ^ fm[n_out + o]) > q[n_out + o])
                _pack_bytes(g8, out, oy + BORDER, ox + p + BORDER)


@njit(cache=True, nogil=True)
def tconv_real_rows(inp, wt, nup, k, stride, scale, bias, out, r0, r1):
    """Binary weights over a ternary input with a real output r = scale * y + bias, y = sum w·v."""
    n_out = scale.shape[0]
    npairs, wrow = wt.shape
    o_stride = wrow // 2  # output channels padded to whole vectors
    wflat = wt.reshape(npairs * wrow)
    sgn, msk, nzp = _ternary_source(inp, nup, k, stride, r0, r1)
    wp = inp.shape[1]
    wo = out.shape[1]
    p_offs = np.zeros(PATS, np.int64)
    ys = np.zeros(PATS * o_stride, np.int32)
    nzs = np.zeros(PATS, np.int32)
    for oy in range(r0, r1):
        for ox in range(0, wo, PATS):
            _pixel_offsets(wp, nup, k, stride, oy, ox, wo, p_offs)
            _patch_nonzeros(nzp, wp, k, stride, oy, ox, wo, nzs)
            _masked_sums(sgn, msk, p_offs, wp * nup * 4, k, 2 * k * nup, npairs, wflat, o_stride, ys)
            for p in range(min(PATS, wo - ox)):
                nz = nzs[p]
                for o in range(n_out):  # in int32, as bconv_real_rows
                    out[oy, ox + p, o] = scale[o] * np.float32(np.int32(nz - 2 * ys[p * o_stride + o])) + bias[o]


# ------------------------------------------------------------------ Bi-Real blocks (rbconv)
# An rbconv layer is three calls: sign_pack_rows (the stream's signs into a bits buffer),
# bconv_real_rows (into a scratch stream), add_rows (stream + scratch, a new stream).
@njit(cache=True, nogil=True)
def sign_pack_rows(r, out, r0, r1):
    """Real (H, W, C) float32 -> packed bits in out's interior: bit 1 (-1) iff r < 0, as app/bits.py says."""
    words = out.shape[2]
    c = r.shape[2]
    b8 = np.zeros(words * 64, np.uint8)
    g8 = b8.view(np.uint64)
    for oy in range(r0, r1):
        for ox in range(r.shape[1]):
            for ch in range(c):
                b8[ch] = np.uint8(r[oy, ox, ch] < np.float32(0.0))
            _pack_bytes(g8, out, oy + BORDER, ox + BORDER)


@njit(cache=True, nogil=True)
def ternary_pack_rows(r, band, out, r0, r1):
    """Real (H, W, C) float32 -> the ternary of r with band d as 2C packed bits (app/bits.py):
    lo bit 1 iff r + d < 0, hi bit 1 iff r - d < 0, in float32 as torch computes sign(r ± d)."""
    words = out.shape[2]
    c = r.shape[2]
    d = np.float32(band)
    b8 = np.zeros(words * 64, np.uint8)
    g8 = b8.view(np.uint64)
    for oy in range(r0, r1):
        for ox in range(r.shape[1]):
            for ch in range(c):
                v = r[oy, ox, ch]
                b8[ch] = np.uint8(np.float32(v + d) < np.float32(0.0))
                b8[c + ch] = np.uint8(np.float32(v - d) < np.float32(0.0))
            _pack_bytes(g8, out, oy + BORDER, ox + BORDER)


@njit(cache=True, nogil=True)
def add_rows(a, b, out, r0, r1):
    """out = a + b (float32, elementwise; no fastmath: the sum must round exactly as torch's does)."""
    for oy in range(r0, r1):
        for ox in range(a.shape[1]):
            for ch in range(a.shape[2]):
                out[oy, ox, ch] = a[oy, ox, ch] + b[oy, ox, ch]


# ------------------------------------------------------------------ head
@njit(cache=True, nogil=True, fastmath=True)
def head_rows(r, w, b, out, r0, r1):
    """1x1 float conv (H, W, in) -> (H, W, out), float32.

    fastmath lets LLVM reorder the sum into vector lanes: the result differs from the
    float64 reference by float32 rounding only (tests allow for that).
    """
    n_out, n_in = w.shape
    for oy in range(r0, r1):
        for ox in range(r.shape[1]):
            rv = r[oy, ox]
            for o in range(n_out):
                s = np.float32(0.0)
                for i in range(n_in):
                    s += rv[i] * w[o, i]
                out[oy, ox, o] = s + b[o]


@njit(cache=True, nogil=True)
def unpack_pm1(inp, channels, out):
    """Packed interior of inp -> ±1 float32 (H, W, channels) for a head fed by bits."""
    for yy in range(out.shape[0]):
        for xx in range(out.shape[1]):
            for c in range(channels):
                bit = (inp[yy + BORDER, xx + BORDER, c // 64] >> np.uint64(c % 64)) & np.uint64(1)
                out[yy, xx, c] = np.float32(1.0) - np.float32(2.0) * np.float32(bit)


# ------------------------------------------------------------------ whole network
# Runners that call several kernels live here, beside them: numba's cache only notices
# edits to a function's own file, so a runner in another module would keep running
# stale kernel code from its cache. (The binary body is not fused into one runner:
# LLVM compiled the kernels inlined into it 1.5x slower on x86; one call per layer
# costs little.)
@njit(cache=True, nogil=True)
def run_stem(x, u, wt, thr, flip, k, stride, planes, out):
    stem_pad(x, k, stride, u)
    stem_rows(u, wt, thr, flip, k, stride, planes, out, 0, out.shape[0] - 2 * BORDER)


@njit(cache=True, nogil=True)
def run_head(packed, channels, from_bits, real, hw, hb, out):
    """The head over the real stream, or (from_bits) over the ±1 of the packed activation, unpacked into real."""
    if from_bits:
        unpack_pm1(packed, channels, real)
    head_rows(real, hw, hb, out, 0, out.shape[0])


# ------------------------------------------------------------------ threads
@njit(cache=True, nogil=True, parallel=True)
def stem_par(pl, wt, thr, flip, k, stride, planes, out, chunks):
    n = out.shape[0] - 2 * BORDER
    for i in prange(chunks):
        stem_rows(pl, wt, thr, flip, k, stride, planes, out, i * n // chunks, (i + 1) * n // chunks)


@njit(cache=True, nogil=True, parallel=True)
def pool_par(inp, out, chunks):
    n = out.shape[0] - 2 * BORDER
    for i in prange(chunks):
        pool_rows(inp, out, i * n // chunks, (i + 1) * n // chunks)


@njit(cache=True, nogil=True, parallel=True)
def bconv_bits_par(inp, wt, nup, kk, k, stride, thr, flip, planes, out, chunks):
    n = out.shape[0] - 2 * BORDER
    for i in prange(chunks):
        bconv_bits_rows(inp, wt, nup, kk, k, stride, thr, flip, planes, out, i * n // chunks,
                        (i + 1) * n // chunks)


@njit(cache=True, nogil=True, parallel=True)
def tconv_bits_par(inp, wt, nup, k, stride, thr, flip, planes, out, chunks):
    n = out.shape[0] - 2 * BORDER
    for i in prange(chunks):
        tconv_bits_rows(inp, wt, nup, k, stride, thr, flip, planes, out, i * n // chunks, (i + 1) * n // chunks)


@njit(cache=True, nogil=True, parallel=True)
def tconv_real_par(inp, wt, nup, k, stride, scale, bias, out, chunks):
    n = out.shape[0]
    for i in prange(chunks):
        tconv_real_rows(inp, wt, nup, k, stride, scale, bias, out, i * n // chunks, (i + 1) * n // chunks)


@njit(cache=True, nogil=True, parallel=True)
def bconv_real_par(inp, wt, nup, kk, k, stride, scale, bias, out, chunks):
    n = out.shape[0]
    for i in prange(chunks):
        bconv_real_rows(inp, wt, nup, kk, k, stride, scale, bias, out, i * n // chunks, (i + 1) * n // chunks)
