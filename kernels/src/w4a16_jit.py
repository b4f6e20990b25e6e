"""Triton kernels of the default W4A16 path (kernels/src/w4a16.py) on the checkpoint's own layout.

``w4a16_gemv`` (M <= 4: FMA dot products, split-K), ``w4a16_mma`` (small and mid M: tensor cores, the
weight tile dequantized in registers before ``tl.dot``, the scale after the dot per chunk),
``w4a16_gemm`` (large M: the scale inside the dequantized tile, one pipelined accumulator) and
``w4a16_dequant`` (the weight to a [N, K] buffer for cuBLAS). The layout, the dequantization
arithmetic and the paths are described in w4a16.py. Own code. Ideas from Marlin and gemlite (Apache-2.0):
magic-number dequant, split-K GEMV; nothing
copied.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._ptx import _kdeq_asm, _kdeq_asm_s, _lut16, _planes, _spair, _zpair
from ._tl import _cols8, _finish, _tile_mn


# ================================================================================================
# Triton kernels
# ================================================================================================
@triton.jit
def _dot(a, b, acc, INTERP: tl.constexpr):
    if INTERP:  # the interpreter mishandles 16-bit float dots: same products in fp32
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _nib(w, wh, zs, s, lrow, lut_ptr, lt, I: tl.constexpr, MODE: tl.constexpr, HAS_SCALE: tl.constexpr,
         LUTG: tl.constexpr):
    """Nibble I of every word, dequantized to fp32 (scale applied)."""
    if MODE == 0:
        if I < 5:
            P: tl.constexpr = I
            f = ((w & (15 << (4 * P))) | 0x3F800000).to(tl.float32, bitcast=True)
        else:
            P: tl.constexpr = I - 3
            f = ((wh & (15 << (4 * P))) | 0x3F800000).to(tl.float32, bitcast=True)
        PSC: tl.constexpr = 1 << (23 - 4 * P)
        v = f * PSC - (zs + PSC)  # q - z, exact
    else:
        q = (w >> (4 * I)) & 15
        if LUTG:  # the [BN, LS] table tile in registers, tl.gather
            v = tl.gather(lt, q, 1)
        else:  # a load from the row's 32-byte table (L1)
            v = tl.load(lut_ptr + (lrow + q)).to(tl.float32)
    if HAS_SCALE:
        v = v * s
    return v


@triton.jit
def _chunk_group(c, G, GS: tl.constexpr, BKW: tl.constexpr):
    """The group of chunk c (8*BKW columns), for chunks that lie inside one group."""
    return tl.minimum((c * (8 * BKW)) // GS, G - 1)


@triton.jit
def _chunk_acc(acc, d, xt, s_ptr, rn, c, G, GS: tl.constexpr, BKW: tl.constexpr, SA: tl.constexpr,
               SWAP: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr, INTERP: tl.constexpr):
    """acc + chunk c's product of the dequantized weight tile d [BN, 8*BKW] and x tile xt [BM, 8*BKW]:
    accumulated in place, or (SA: the chunk lies in one group, d unscaled) the chunk's own dot times the
    rows' group scale. SWAP: W·xᵀ ([BN, BM] accumulator), else x·Wᵀ ([BM, BN])."""
    if SA:
        sc = tl.load(s_ptr + rn * G + _chunk_group(c, G, GS, BKW)).to(tl.float32)
        if SWAP:
            acc += _dot(d, tl.trans(xt), tl.zeros([BN, BM], dtype=tl.float32), INTERP) * sc[:, None]
        else:
            acc += _dot(xt, tl.trans(d), tl.zeros([BM, BN], dtype=tl.float32), INTERP) * sc[None, :]
    else:
        if SWAP:
            acc = _dot(d, tl.trans(xt), acc, INTERP)
        else:
            acc = _dot(xt, tl.trans(d), acc, INTERP)
    return acc


@triton.jit
def _group_idx(rn, c, G, GS: tl.constexpr, BKW: tl.constexpr):
    """Index of the scale/zero of rows rn in chunk c: [BN, 1] when the chunk lies in one group (one
    value per row), else [BN, BKW] (one per word)."""
    if GS % (8 * BKW) == 0:
        idx = rn[:, None] * G + _chunk_group(c, G, GS, BKW)
    else:
        kw = c * BKW + tl.arange(0, BKW)
        idx = rn[:, None] * G + tl.minimum((kw * 8) // GS, G - 1)[None, :]
    return idx


@triton.jit
def _chunk_consts(rn, c, s_ptr, z_ptr, lut_ptr, G, HAS_SCALE: tl.constexpr, HAS_ZERO: tl.constexpr,
                  ZC: tl.constexpr, GS: tl.constexpr, LS: tl.constexpr, LUT_ROW: tl.constexpr,
                  BKW: tl.constexpr, LUTG: tl.constexpr, MODE: tl.constexpr):
    """What dequantizing chunk c of rows rn needs besides the codes: scale, zero, the rows' table
    offset in lut_ptr and (LUTG) the [BN, LS] table tile."""
    s = 1.0
    z = ZC
    lrow = 0
    lt = 0.0
    if HAS_SCALE or HAS_ZERO:
        sidx = _group_idx(rn, c, G, GS, BKW)
        if HAS_SCALE:
            s = tl.load(s_ptr + sidx).to(tl.float32)
        if HAS_ZERO:
            z = tl.load(z_ptr + sidx).to(tl.float32)
    if MODE == 1:
        if LUT_ROW:
            lrow = rn[:, None] * LS
        if LUTG:
            lt = tl.load(lut_ptr + (lrow + tl.arange(0, LS)[None, :] + rn[:, None] * 0)).to(tl.float32)
    return s, z, lrow, lt


@triton.jit
def _kdeq(w, rn, c, s_ptr, z_ptr, lut_ptr, G,
          MODE: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_ZERO: tl.constexpr, ZC: tl.constexpr,
          GS: tl.constexpr, LS: tl.constexpr, LUT_ROW: tl.constexpr, BKW: tl.constexpr, LUTG: tl.constexpr):
    """Words w [BN, BKW] of rows rn (clamped to valid rows), chunk c -> fp32 [BN, 8*BKW], column order."""
    s, zs, lrow, lt = _chunk_consts(rn, c, s_ptr, z_ptr, lut_ptr, G, HAS_SCALE, HAS_ZERO, ZC, GS, LS, LUT_ROW, BKW,
                                    LUTG, MODE)
    wh = w >> 12
    d0 = _nib(w, wh, zs, s, lrow, lut_ptr, lt, 0, MODE, HAS_SCALE, LUTG)
    d1 = _nib(w, wh, zs, s, lrow, lut_ptr, lt, 1, MODE, HAS_SCALE, LUTG)
    d2 = _nib(w, wh, zs, s, lrow, lut_ptr, lt, 2, MODE, HAS_SCALE, LUTG)
    d3 = _nib(w, wh, zs, s, lrow, lut_ptr, lt, 3, MODE, HAS_SCALE, LUTG)
    d4 = _nib(w, wh, zs, s, lrow, lut_ptr, lt, 4, MODE, HAS_SCALE, LUTG)
    d5 = _nib(w, wh, zs, s, lrow, lut_ptr, lt, 5, MODE, HAS_SCALE, LUTG)
    d6 = _nib(w, wh, zs, s, lrow, lut_ptr, lt, 6, MODE, HAS_SCALE, LUTG)
    d7 = _nib(w, wh, zs, s, lrow, lut_ptr, lt, 7, MODE, HAS_SCALE, LUTG)
    return _cols8(d0, d1, d2, d3, d4, d5, d6, d7)




@triton.jit
def _stack_rows(a0, a1, a2, a3, BM: tl.constexpr):
    """The GEMV's per-row accumulators (BM <= 4 rows of x) as one [BM, BN] tile."""
    r = tl.arange(0, BM)[:, None]
    res = tl.where(r == 0, a0[None, :], 0.0)
    if BM > 1:
        res = tl.where(r == 1, a1[None, :], res)
    if BM > 2:
        res = tl.where(r == 2, a2[None, :], res)
        res = tl.where(r == 3, a3[None, :], res)
    return res


@triton.jit
def _xnib(xb, k8, K, I: tl.constexpr, EVEN: tl.constexpr):
    """x[m, 8*kw + I] for the chunk's words ([BKW], fp32; 0 past K); xb = row pointer + 8*kw."""
    if EVEN:
        v = tl.load(xb + I)
    else:
        v = tl.load(xb + I, mask=(k8 + I) < K, other=0.0)
    return v.to(tl.float32)


@triton.jit
def _nib1(w, wh, cz, lbase, lt, I: tl.constexpr, MODE: tl.constexpr, LUTG: tl.constexpr):
    """Nibble I of every word as fp32, before the scale: (q - z) / 2^(23-4p) for int (times x * 2^(23-4p)
    later; exact), the table value for lut."""
    if MODE == 0:
        if I < 5:
            P: tl.constexpr = I
            f = ((w & (15 << (4 * P))) | 0x3F800000).to(tl.float32, bitcast=True)
        else:
            P: tl.constexpr = I - 3
            f = ((wh & (15 << (4 * P))) | 0x3F800000).to(tl.float32, bitcast=True)
        INV: tl.constexpr = 1.0 / (1 << (23 - 4 * P))
        v = f - (1.0 + cz * INV)  # exact: both sides lie in [1, 2)
    else:
        q = (w >> (4 * I)) & 15
        if LUTG:
            v = tl.gather(lt, q, 1)
        else:
            v = tl.load(lbase + q).to(tl.float32)
    return v


@triton.jit
def _xs(x, I: tl.constexpr, MODE: tl.constexpr):
    """x scaled by 2^(23-4p) for int nibble I (folds the magic-number exponent into x)."""
    if MODE == 0:
        if I < 5:
            P: tl.constexpr = I
        else:
            P: tl.constexpr = I - 3
        PSC: tl.constexpr = 1 << (23 - 4 * P)
        return x * PSC
    else:
        return x


@triton.jit
def _gemv_chunk(w, c, rn, x_ptr, s_ptr, z_ptr, lut_ptr, M, K, G, a0, a1, a2, a3,
                MODE: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_ZERO: tl.constexpr, ZC: tl.constexpr,
                GS: tl.constexpr, LS: tl.constexpr, LUT_ROW: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, BKW: tl.constexpr, EVEN: tl.constexpr, LUTG: tl.constexpr):
    kw = c * BKW + tl.arange(0, BKW)
    k8 = kw * 8
    s, cz, lrow, lt = _chunk_consts(rn, c, s_ptr, z_ptr, lut_ptr, G, HAS_SCALE, HAS_ZERO, ZC, GS, LS, LUT_ROW, BKW,
                                    LUTG, MODE)
    lbase = lut_ptr + lrow
    # rows of x past M read row M-1 (their results are never written): no masks
    xb0 = x_ptr + k8
    xb1 = x_ptr + tl.minimum(1, M - 1) * K + k8
    xb2 = x_ptr + tl.minimum(2, M - 1) * K + k8
    xb3 = x_ptr + tl.minimum(3, M - 1) * K + k8
    wh = w >> 12
    t0 = tl.zeros([BN, BKW], dtype=tl.float32)
    t1 = tl.zeros([BN, BKW], dtype=tl.float32)
    t2 = tl.zeros([BN, BKW], dtype=tl.float32)
    t3 = tl.zeros([BN, BKW], dtype=tl.float32)
    for i in tl.static_range(8):
        d = _nib1(w, wh, cz, lbase, lt, i, MODE, LUTG)
        t0 += d * _xs(_xnib(xb0, k8, K, i, EVEN), i, MODE)[None, :]
        if BM > 1:
            t1 += d * _xs(_xnib(xb1, k8, K, i, EVEN), i, MODE)[None, :]
        if BM > 2:
            t2 += d * _xs(_xnib(xb2, k8, K, i, EVEN), i, MODE)[None, :]
            t3 += d * _xs(_xnib(xb3, k8, K, i, EVEN), i, MODE)[None, :]
    a0 += tl.sum(t0 * s, axis=1)
    if BM > 1:
        a1 += tl.sum(t1 * s, axis=1)
    if BM > 2:
        a2 += tl.sum(t2 * s, axis=1)
        a3 += tl.sum(t3 * s, axis=1)
    return a0, a1, a2, a3


@triton.jit
def _dot8x(e0, e1, e2, e3, e4, e5, e6, e7, xb, k8, K, EVEN: tl.constexpr):
    """sum_i e_i * x[8*kw + i] per [BN, BKW] element."""
    t = e0 * _xnib(xb, k8, K, 0, EVEN)[None, :]
    t += e1 * _xnib(xb, k8, K, 1, EVEN)[None, :]
    t += e2 * _xnib(xb, k8, K, 2, EVEN)[None, :]
    t += e3 * _xnib(xb, k8, K, 3, EVEN)[None, :]
    t += e4 * _xnib(xb, k8, K, 4, EVEN)[None, :]
    t += e5 * _xnib(xb, k8, K, 5, EVEN)[None, :]
    t += e6 * _xnib(xb, k8, K, 6, EVEN)[None, :]
    t += e7 * _xnib(xb, k8, K, 7, EVEN)[None, :]
    return t


@triton.jit
def _gemv_chunk_lasm(w, c, rn, x_ptr, s_ptr, M, K, G, a0, a1, a2, a3, t0, t1, t2, t3, t4, t5, t6, t7,
                     HAS_SCALE: tl.constexpr, GS: tl.constexpr, BM: tl.constexpr, BKW: tl.constexpr,
                     EVEN: tl.constexpr):
    """_gemv_chunk for lut formats with the table lookups in registers (inline PTX)."""
    kw = c * BKW + tl.arange(0, BKW)
    k8 = kw * 8
    s = 1.0
    if HAS_SCALE:
        s = tl.load(s_ptr + _group_idx(rn, c, G, GS, BKW)).to(tl.float32)
    e0, e1, e2, e3, e4, e5, e6, e7 = _lut16(w, t0, t1, t2, t3, t4, t5, t6, t7)
    a0 += tl.sum(_dot8x(e0, e1, e2, e3, e4, e5, e6, e7, x_ptr + k8, k8, K, EVEN) * s, axis=1)
    if BM > 1:
        xb1 = x_ptr + tl.minimum(1, M - 1) * K + k8
        a1 += tl.sum(_dot8x(e0, e1, e2, e3, e4, e5, e6, e7, xb1, k8, K, EVEN) * s, axis=1)
    if BM > 2:
        xb2 = x_ptr + tl.minimum(2, M - 1) * K + k8
        xb3 = x_ptr + tl.minimum(3, M - 1) * K + k8
        a2 += tl.sum(_dot8x(e0, e1, e2, e3, e4, e5, e6, e7, xb2, k8, K, EVEN) * s, axis=1)
        a3 += tl.sum(_dot8x(e0, e1, e2, e3, e4, e5, e6, e7, xb3, k8, K, EVEN) * s, axis=1)
    return a0, a1, a2, a3


@triton.jit(do_not_specialize=["M", "G", "CPS", "SPLIT"])
def w4a16_gemv(x_ptr, w_ptr, s_ptr, z_ptr, lut_ptr, out_ptr, ws_ptr, cnt_ptr,
               M, N, K, KWS, G, CPS, SPLIT,
               MODE: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_ZERO: tl.constexpr, ZC: tl.constexpr,
               GS: tl.constexpr, LS: tl.constexpr, LUT_ROW: tl.constexpr,
               BM: tl.constexpr, BN: tl.constexpr, BKW: tl.constexpr, SPLITK: tl.constexpr, EVEN: tl.constexpr,
               PF: tl.constexpr, LUTG: tl.constexpr, ASM: tl.constexpr = False):
    """GEMV, nibble by nibble: each nibble's [BN, BKW] values meet x[8*kw + i] (strided loads, L1) and
    accumulate in [BN, BKW]; scale and row sums once per chunk. PF: the next chunk's words are
    loaded before this chunk is computed (two chunks in flight per thread)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BN + tl.arange(0, BN)
    rn = tl.minimum(offs_n, N - 1)
    kw0 = tl.arange(0, BKW)
    a0 = tl.zeros([BN], dtype=tl.float32)
    a1 = tl.zeros([BN], dtype=tl.float32)
    a2 = tl.zeros([BN], dtype=tl.float32)
    a3 = tl.zeros([BN], dtype=tl.float32)
    nch = tl.cdiv(KWS, BKW)
    c0 = pid_k * CPS
    c1 = tl.minimum(c0 + CPS, nch)
    wrow = w_ptr + rn[:, None].to(tl.int64) * KWS
    if ASM:  # lut formats: the rows' fp16 table planes in registers (lut_ptr: int32 [rows, 8])
        t0, t1, t2, t3, t4, t5, t6, t7 = _planes(lut_ptr, rn, LUT_ROW)
    if PF or ASM:
        lim = tl.minimum(KWS, c1 * BKW)  # words of this program's chunks
        wc = c0 * BKW + kw0
        wn = tl.load(wrow + wc[None, :], mask=(wc < lim)[None, :], other=0)
        for c in range(c0, c1):
            w = wn
            wc = (c + 1) * BKW + kw0
            wn = tl.load(wrow + wc[None, :], mask=(wc < lim)[None, :], other=0)
            if ASM:
                a0, a1, a2, a3 = _gemv_chunk_lasm(w, c, rn, x_ptr, s_ptr, M, K, G, a0, a1, a2, a3, t0, t1, t2, t3,
                                                  t4, t5, t6, t7, HAS_SCALE, GS, BM, BKW, EVEN)
            else:
                a0, a1, a2, a3 = _gemv_chunk(w, c, rn, x_ptr, s_ptr, z_ptr, lut_ptr, M, K, G, a0, a1, a2, a3, MODE,
                                             HAS_SCALE, HAS_ZERO, ZC, GS, LS, LUT_ROW, BM, BN, BKW, EVEN,
                                             LUTG)
    else:
        for c in range(c0, c1):
            wc = c * BKW + kw0
            if EVEN:
                w = tl.load(wrow + wc[None, :])
            else:
                w = tl.load(wrow + wc[None, :], mask=(wc < KWS)[None, :], other=0)
            a0, a1, a2, a3 = _gemv_chunk(w, c, rn, x_ptr, s_ptr, z_ptr, lut_ptr, M, K, G, a0, a1, a2, a3, MODE,
                                         HAS_SCALE, HAS_ZERO, ZC, GS, LS, LUT_ROW, BM, BN, BKW, EVEN,
                                         LUTG)
    offs_m = tl.arange(0, BM)
    res = _stack_rows(a0, a1, a2, a3, BM)
    _finish(res, out_ptr, ws_ptr, cnt_ptr, offs_m, offs_n, M, N, pid_n, pid_k, SPLIT, BM, BN, SPLITK)


@triton.jit
def _mma_chunk(acc, c, c1, wrow, xrow, s_ptr, z_ptr, lut_ptr, rn, kw, kk, K, KWS, G, zz, t0, t1, t2, t3, t4, t5, t6, t7,
               XDT: tl.constexpr, MODE: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_ZERO: tl.constexpr,
               ZC: tl.constexpr, GS: tl.constexpr, LS: tl.constexpr, LUT_ROW: tl.constexpr, BN: tl.constexpr,
               BM: tl.constexpr, BKW: tl.constexpr, EVEN: tl.constexpr, SWAP: tl.constexpr, INTERP: tl.constexpr,
               LUTG: tl.constexpr, ASM: tl.constexpr, SA: tl.constexpr):
    """acc + chunk c's product (nothing when c >= c1: its loads are masked to zero)."""
    wc = c * BKW + kw
    k = c * (8 * BKW) + kk
    if EVEN:
        w = tl.load(wrow + wc[None, :])
        xt = tl.load(xrow + k[None, :])
    else:
        w = tl.load(wrow + wc[None, :], mask=((wc < KWS) & (kw * 0 + c < c1))[None, :], other=0)
        xt = tl.load(xrow + k[None, :], mask=((k < K) & (kk * 0 + c < c1))[None, :], other=0.0)
    if ASM:
        if MODE == 0 and HAS_ZERO:
            zc = tl.load(z_ptr + rn * G + _chunk_group(c, G, GS, BKW)).to(tl.float32)
            zl = _zpair(zc[:, None], XDT)
        else:
            zl = zz
        d = _kdeq_asm(w, zl, t0, t1, t2, t3, t4, t5, t6, t7, MODE, XDT)
    else:
        d = _kdeq(w, rn, c, s_ptr, z_ptr, lut_ptr, G, MODE, HAS_SCALE and not SA, HAS_ZERO, ZC, GS, LS,
                  LUT_ROW, BKW, LUTG).to(XDT)
    return _chunk_acc(acc, d, xt, s_ptr, rn, c, G, GS, BKW, SA, SWAP, BN, BM, INTERP)


@triton.jit(do_not_specialize=["M", "G", "CPS", "SPLIT"])
def w4a16_mma(x_ptr, w_ptr, s_ptr, z_ptr, lut_ptr, out_ptr, ws_ptr, cnt_ptr,
            M, N, K, KWS, G, CPS, SPLIT,
            MODE: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_ZERO: tl.constexpr, ZC: tl.constexpr,
            GS: tl.constexpr, LS: tl.constexpr, LUT_ROW: tl.constexpr,
            BM: tl.constexpr, BN: tl.constexpr, BKW: tl.constexpr, SPLITK: tl.constexpr, EVEN: tl.constexpr,
            SWAP: tl.constexpr, GROUP_M: tl.constexpr, INTERP: tl.constexpr, LUTG: tl.constexpr,
            ASM: tl.constexpr = False, U: tl.constexpr = 1):
    """Tensor cores: the dequantized [BN, 8*BKW] tile (x dtype) meets x [BM, 8*BKW] in tl.dot.
    ASM: packed dequant in inline PTX (_kdeq_asm; needs whole groups per chunk; for lut, lut_ptr
    holds the table planes, int32 [rows, 8])."""
    XDT = x_ptr.dtype.element_ty
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m, pid_n = _tile_mn(pid, M, N, BM, BN, GROUP_M)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    rn = tl.minimum(offs_n, N - 1)
    rm = tl.minimum(offs_m, M - 1)
    kw = tl.arange(0, BKW)
    kk = tl.arange(0, 8 * BKW)
    # chunks inside one group: scale the chunk's dot product (per column) instead of every weight
    SA: tl.constexpr = HAS_SCALE and (GS % (8 * BKW) == 0)
    if SWAP:
        acc = tl.zeros([BN, BM], dtype=tl.float32)
    else:
        acc = tl.zeros([BM, BN], dtype=tl.float32)
    nch = tl.cdiv(KWS, BKW)
    c0 = pid_k * CPS
    c1 = tl.minimum(c0 + CPS, nch)
    wrow = w_ptr + rn[:, None].to(tl.int64) * KWS
    xrow = x_ptr + rm[:, None].to(tl.int64) * K
    zz = 0  # what the inline-PTX dequant needs: -(M0 + z) pairs (int), the rows' table planes (lut)
    t0 = 0
    t1 = 0
    t2 = 0
    t3 = 0
    t4 = 0
    t5 = 0
    t6 = 0
    t7 = 0
    if ASM:
        zz = _zpair(tl.full([1, 1], ZC, tl.float32), XDT)
        if MODE == 1:  # in registers for the whole loop
            t0, t1, t2, t3, t4, t5, t6, t7 = _planes(lut_ptr, rn, LUT_ROW)
    for cb in range(c0, c1, U):  # U chunks per iteration: more weight bytes in flight per pipeline stage
        acc = _mma_chunk(acc, cb, c1, wrow, xrow, s_ptr, z_ptr, lut_ptr, rn, kw, kk, K, KWS, G, zz,
                         t0, t1, t2, t3, t4, t5, t6, t7, XDT, MODE, HAS_SCALE, HAS_ZERO, ZC, GS, LS, LUT_ROW, BN, BM,
                         BKW, EVEN and U == 1, SWAP, INTERP, LUTG, ASM, SA)
        for j in tl.static_range(1, U):
            acc = _mma_chunk(acc, cb + j, c1, wrow, xrow, s_ptr, z_ptr, lut_ptr, rn, kw, kk, K, KWS, G, zz,
                             t0, t1, t2, t3, t4, t5, t6, t7, XDT, MODE, HAS_SCALE, HAS_ZERO, ZC, GS, LS, LUT_ROW, BN,
                             BM, BKW, False, SWAP, INTERP, LUTG, ASM, SA)
    if SWAP:
        acc = tl.trans(acc)
    _finish(acc, out_ptr, ws_ptr, cnt_ptr, offs_m, offs_n, M, N, pid, pid_k, SPLIT, BM, BN, SPLITK)


@triton.jit
def _sz_pairs(rn, c, nch, s_ptr, z_ptr, G, zz, XDT: tl.constexpr, HAS_SCALE: tl.constexpr, ZERO: tl.constexpr,
              GS: tl.constexpr, BKW: tl.constexpr):
    """Chunk c's scale pairs and -(M0 + zero) pairs for the inline-PTX dequant (c clamped to the last
    chunk): [BN, 1], or [BN, BKW] when groups split a chunk; 0 / zz where the layer has none."""
    sidx = _group_idx(rn, tl.minimum(c, nch - 1), G, GS, BKW)
    sp = 0
    zl = zz
    if HAS_SCALE:
        sp = _spair(tl.load(s_ptr + sidx), XDT)
    if ZERO:
        zl = _zpair(tl.load(z_ptr + sidx).to(tl.float32), XDT)
    return sp, zl


@triton.jit(do_not_specialize=["M", "G", "CPS", "SPLIT"])
def w4a16_gemm(x_ptr, w_ptr, s_ptr, z_ptr, lut_ptr, out_ptr, ws_ptr, cnt_ptr,
               M, N, K, KWS, G, CPS, SPLIT,
               MODE: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_ZERO: tl.constexpr, ZC: tl.constexpr,
               GS: tl.constexpr, LS: tl.constexpr, LUT_ROW: tl.constexpr,
               BM: tl.constexpr, BN: tl.constexpr, BKW: tl.constexpr, SPLITK: tl.constexpr, EVEN: tl.constexpr,
               SWAP: tl.constexpr, GROUP_M: tl.constexpr, INTERP: tl.constexpr, ASM: tl.constexpr):
    """Large M. Per chunk of 8*BKW columns the [BN, 8*BKW] weight tile is dequantized in registers *with
    its group scale* (``(q - z) * s`` or ``table[q] * s`` in the x dtype, rounded once: the weight
    cuBLAS would get from the dequantize path) and tl.dot accumulates it into one fp32 accumulator.
    Unlike ``w4a16_mma`` there is no rescale per chunk between dots, so consecutive tensor-core
    instructions (wgmma on Hopper) chain on the accumulator and the loads of x and of the packed words
    are pipelined ``num_stages`` deep. ASM: inline-PTX dequant (compiled CUDA); otherwise fp32
    dequant (any group size, the interpreter). SWAP computes W xᵀ (the weight tile is the A operand)."""
    XDT = x_ptr.dtype.element_ty
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m, pid_n = _tile_mn(pid, M, N, BM, BN, GROUP_M)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    rn = tl.minimum(offs_n, N - 1)
    rm = tl.minimum(offs_m, M - 1)
    kw = tl.arange(0, BKW)
    kk = tl.arange(0, 8 * BKW)
    if SWAP:
        acc = tl.zeros([BN, BM], dtype=tl.float32)
    else:
        acc = tl.zeros([BM, BN], dtype=tl.float32)
    nch = tl.cdiv(KWS, BKW)
    c0 = pid_k * CPS
    c1 = tl.minimum(c0 + CPS, nch)
    wrow = w_ptr + rn[:, None].to(tl.int64) * KWS
    xrow = x_ptr + rm[:, None].to(tl.int64) * K
    zz = 0
    t0 = 0
    t1 = 0
    t2 = 0
    t3 = 0
    t4 = 0
    t5 = 0
    t6 = 0
    t7 = 0
    sn = 0
    zn = 0
    if ASM:
        zz = _zpair(tl.full([1, 1], ZC, tl.float32), XDT)
        if MODE == 1:  # the rows' table planes (x dtype), in registers for the whole loop
            t0, t1, t2, t3, t4, t5, t6, t7 = _planes(lut_ptr, rn, LUT_ROW)
        # the first chunk's scale/zero pairs; in the loop the next chunk's are loaded a chunk ahead
        # (2-byte gathers are not pipelined by Triton: loaded when used they stall every chunk)
        sn, zn = _sz_pairs(rn, c0, nch, s_ptr, z_ptr, G, zz, XDT, HAS_SCALE, HAS_ZERO and MODE == 0, GS, BKW)
    for c in range(c0, c1):
        wc = c * BKW + kw
        k = c * (8 * BKW) + kk
        if EVEN:
            w = tl.load(wrow + wc[None, :])
            xt = tl.load(xrow + k[None, :])
        else:
            w = tl.load(wrow + wc[None, :], mask=(wc < KWS)[None, :], other=0)
            xt = tl.load(xrow + k[None, :], mask=(k < K)[None, :], other=0.0)
        if ASM:
            sp = sn
            zl = zn
            sn, zn = _sz_pairs(rn, c + 1, nch, s_ptr, z_ptr, G, zz, XDT, HAS_SCALE, HAS_ZERO and MODE == 0, GS, BKW)
            if HAS_SCALE:
                d = _kdeq_asm_s(w, zl, sp, t0, t1, t2, t3, t4, t5, t6, t7, MODE, XDT)
            else:
                d = _kdeq_asm(w, zl, t0, t1, t2, t3, t4, t5, t6, t7, MODE, XDT)
        else:
            d = _kdeq(w, rn, c, s_ptr, z_ptr, lut_ptr, G, MODE, HAS_SCALE, HAS_ZERO, ZC, GS, LS, LUT_ROW, BKW,
                      False).to(XDT)
        if SWAP:
            acc = _dot(d, tl.trans(xt), acc, INTERP)
        else:
            acc = _dot(xt, tl.trans(d), acc, INTERP)
    if SWAP:
        acc = tl.trans(acc)
    _finish(acc, out_ptr, ws_ptr, cnt_ptr, offs_m, offs_n, M, N, pid, pid_k, SPLIT, BM, BN, SPLITK)


@triton.jit(do_not_specialize=["G"])
def w4a16_dequant(w_ptr, s_ptr, z_ptr, lut_ptr, out_ptr, N, K, KWS, G,
                MODE: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_ZERO: tl.constexpr, ZC: tl.constexpr,
                GS: tl.constexpr, LS: tl.constexpr, LUT_ROW: tl.constexpr,
                BN: tl.constexpr, BKW: tl.constexpr, EVEN: tl.constexpr, LUTG: tl.constexpr,
                ASM: tl.constexpr = False):
    """Write the dequantized weight [N, K] (row-major, out dtype): one [BN, 8*BKW] tile. ASM (lut,
    whole groups per tile): register-table lookups, lut_ptr = fp16 table planes [rows, 8]."""
    c = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_n = pid_n * BN + tl.arange(0, BN)
    rn = tl.minimum(offs_n, N - 1)
    wc = c * BKW + tl.arange(0, BKW)
    k = c * (8 * BKW) + tl.arange(0, 8 * BKW)
    wrow = w_ptr + rn[:, None].to(tl.int64) * KWS
    if EVEN:
        w = tl.load(wrow + wc[None, :])
    else:
        w = tl.load(wrow + wc[None, :], mask=(wc < KWS)[None, :], other=0)
    if ASM:
        t0, t1, t2, t3, t4, t5, t6, t7 = _planes(lut_ptr, rn, LUT_ROW)
        e0, e1, e2, e3, e4, e5, e6, e7 = _lut16(w, t0, t1, t2, t3, t4, t5, t6, t7)
        d = _cols8(e0, e1, e2, e3, e4, e5, e6, e7)
        if HAS_SCALE:
            d = d * tl.load(s_ptr + rn[:, None] * G + _chunk_group(c, G, GS, BKW)).to(tl.float32)
    else:
        d = _kdeq(w, rn, c, s_ptr, z_ptr, lut_ptr, G, MODE, HAS_SCALE, HAS_ZERO, ZC, GS, LS, LUT_ROW, BKW, LUTG)
    optr = out_ptr + offs_n[:, None].to(tl.int64) * K + k[None, :]
    tl.store(optr, d.to(out_ptr.dtype.element_ty), mask=(offs_n < N)[:, None] & (k < K)[None, :])
