"""W4A16 kernels for the ``int`` (INT2-INT4 affine) and ``lut`` (any4/any3/any2, NF4, FP4) formats.

The builders at the end choose the implementation: ``_kmajor.py`` ("k": the checkpoint's own layout,
no repack; the default for int and lut) or the "v1"/"v2" kernels of this file (kept, selectable with
QUANTKIT_LOWBIT=v1|v2, and the fallback where the k builder declines a layer); see ``IMPL``.
What follows describes v1/v2.

Packed layout (repacked once at build from the checkpoint's row bitstream, docs/FORMAT.md):
  ``w``  int32 [Kp/8, N], N contiguous; Kp = in_features rounded up to 128. K runs in blocks of 128;
         word row ``b*16 + r`` nibble ``i`` holds the code of input column ``b*128 + i*16 + r``.
         So nibble ``i`` of a [16, BN] tile covers 16 *consecutive* columns: one group, one
         contiguous slice of x, one K=16 tensor-core step — no re-reads of a word.
  ``s``  scales [n_groups, N] (the checkpoint's dtype), ``z`` zeros uint8 [n_groups, N] (asym only),
  ``lut`` fp32 [16, N] (per-row tables, transposed) or [16, 1] (fixed tables).
Codes of fewer than 4 bits (int2/int3, any2/any3) are widened to nibbles (no bandwidth gain then).
Act-order (``g_idx``): columns are sorted by group at build and x is permuted each call (as Marlin
and exllama do); every 16-column tile must then lie in one group.

Three paths, chosen by the row count M:
  * ``gemv`` (M <= 4): FMA dot products, split-K. Integer dequant without int->float converts:
    ``(w & (15 << 4p)) | 0x3F800000`` read as fp32 is ``1 + q * 2^(4p-23)``; subtract 1 and fold
    ``2^(23-4p)`` into x. The group scale and zero point are applied once per group.
  * ``post`` (8 <= M <= 64): tensor cores, ``tl.dot`` per 16-column nibble tile, B built with the
    16-bit magic ``q | 0x4300`` (bf16 128 + q; fp16 0x6400 = 1024 + q); scale and zero point are
    applied to the [BM, BN] partial sum once per group: ``s * (dot - (magic + z) * sum(x))``.
  * ``pre`` (large M): dequantize the [128, BN] tile in fp32 (scale before the dot) and run one
    K=128 dot; or ``dq``: dequantize the whole weight into a scratch buffer and call cuBLAS.
  LUT formats use the same kernels with ``tl.gather`` from the column's table in registers.
Split-K partial sums go to a shared fp32 workspace; the last program of each tile (counted with an
atomic) adds them in a fixed order and writes the output, so results are deterministic and one
launch suffices (no memset, no extra reduction kernel).

Own code. Ideas from Marlin (Apache-2.0: load-time repack, magic-number dequant, act-order sort)
and gemlite (Apache-2.0: split-K GEMV in Triton); nothing copied.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from quantkit.formats.packing import unpack_codes

from . import register_kernel
from ._launch import INTERPRET, Launcher, cdiv, dequant_then_mm, m_bucket, tuned, workspace
from ._tl import _finish, _tile_mn

PB = 128  # columns per packed block
_INTERP = tl.constexpr(INTERPRET)
_MAGIC = {torch.bfloat16: (0x4300, 128.0), torch.float16: (0x6400, 1024.0)}
_TL = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


# ================================================================================================
# Triton kernels
# ================================================================================================


@triton.jit
def _add_scaled(acc, d, xs, s_ptr, z_ptr, g, N, offs_n, nmask, MODE: tl.constexpr, HAS_ZERO: tl.constexpr,
                ZC: tl.constexpr, MV: tl.constexpr):
    """acc + one group's dot ``d`` times its scale; for affine codes (MODE 0, dequantized as
    (q + MV) - (zero + MV)) minus the row sums ``xs`` of x times (zero + MV)·scale."""
    s = tl.load(s_ptr + g * N + offs_n, mask=nmask, other=0.0).to(tl.float32)
    if MODE == 0:
        if HAS_ZERO:
            z = tl.load(z_ptr + g * N + offs_n, mask=nmask, other=0).to(tl.float32)
            c = (z + MV) * s
        else:
            c = s * (ZC + MV)
        return acc + d * s[None, :] - xs[:, None] * c[None, :]
    return acc + d * s[None, :]


@triton.jit
def _dot(a, b, acc):
    if _INTERP:  # the interpreter mishandles 16-bit float dots: same products in fp32
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _load_lut(lut_ptr, r, offs_n, nmask, N, LUT_ROW: tl.constexpr):
    """The [16, BN] fp32 table tile: per-row tables are stored [16, N], fixed ones [16, 1]."""
    if LUT_ROW:
        v = tl.load(lut_ptr + r[:, None] * N + offs_n[None, :], mask=nmask[None, :], other=0.0)
    else:
        v = tl.load(lut_ptr + r[:, None] + offs_n[None, :] * 0)
    return v.to(tl.float32)


@triton.jit
def _group_of(b, j, gmap_ptr, G, GS: tl.constexpr, GPT: tl.constexpr, HAS_GMAP: tl.constexpr):
    """Group index of flush-group j (GPT nibble tiles) of block b."""
    if HAS_GMAP:
        g = tl.load(gmap_ptr + b * 8 + j * GPT)
    else:
        g = tl.minimum((b * 128 + j * GPT * 16) // GS, G - 1)
    return g


@triton.jit(do_not_specialize=["M", "G", "NB", "BPS", "SPLIT"])
def _q4_gemv_v1(x_ptr, w_ptr, s_ptr, z_ptr, lut_ptr, gmap_ptr, out_ptr, ws_ptr, cnt_ptr,
             M, N, K, G, NB, BPS, SPLIT,
             MODE: tl.constexpr, LUT_ROW: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_ZERO: tl.constexpr, ZC: tl.constexpr,
             GS: tl.constexpr, GPT: tl.constexpr, HAS_GMAP: tl.constexpr,
             BM: tl.constexpr, BN: tl.constexpr, SPLITK: tl.constexpr):
    """v1 (measured on GPU): one [16, BN] nibble tile at a time, M <= 4."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BN + tl.arange(0, BN)
    nmask = offs_n < N
    offs_m = tl.arange(0, BM)
    mmask = offs_m < M
    r = tl.arange(0, 16)
    acc = tl.zeros([BM, 16, BN], dtype=tl.float32)
    zacc = tl.zeros([BM, BN], dtype=tl.float32)
    if MODE == 1:
        lut = _load_lut(lut_ptr, r, offs_n, nmask, N, LUT_ROW)
    b0 = pid_k * BPS
    b1 = tl.minimum(b0 + BPS, NB)
    for b in range(b0, b1):
        w = tl.load(w_ptr + (b * 16 + r)[:, None] * N + offs_n[None, :], mask=nmask[None, :], other=0)
        w12 = w >> 12
        for j in tl.static_range(8 // GPT):
            xs = tl.zeros([BM], dtype=tl.float32)
            for ii in tl.static_range(GPT):
                i = j * GPT + ii
                kk = b * 128 + i * 16 + r
                xi = tl.load(x_ptr + offs_m[:, None] * K + kk[None, :],
                             mask=mmask[:, None] & (kk < K)[None, :], other=0.0).to(tl.float32)
                if MODE == 0:
                    if i < 5:
                        f = ((w & (15 << (4 * i))) | 0x3F800000).to(tl.float32, bitcast=True) - 1.0
                        xp = xi * (1 << (23 - 4 * i))
                    else:
                        f = ((w12 & (15 << (4 * (i - 3)))) | 0x3F800000).to(tl.float32, bitcast=True) - 1.0
                        xp = xi * (1 << (23 - 4 * (i - 3)))
                    xs += tl.sum(xi, axis=1)
                else:
                    f = tl.gather(lut, (w >> (4 * i)) & 15, 0)
                    xp = xi
                if ii == 0:
                    t = xp[:, :, None] * f[None, :, :]
                else:
                    t += xp[:, :, None] * f[None, :, :]
            if HAS_SCALE:
                g = _group_of(b, j, gmap_ptr, G, GS, GPT, HAS_GMAP)
                s = tl.load(s_ptr + g * N + offs_n, mask=nmask, other=0.0).to(tl.float32)
                acc += t * s[None, None, :]
                if MODE == 0:
                    if HAS_ZERO:
                        z = tl.load(z_ptr + g * N + offs_n, mask=nmask, other=0).to(tl.float32)
                        zacc += xs[:, None] * (s * z)[None, :]
                    else:
                        zacc += xs[:, None] * (s * ZC)[None, :]
            else:
                acc += t
    res = tl.sum(acc, axis=1) - zacc
    _finish(res, out_ptr, ws_ptr, cnt_ptr, offs_m, offs_n, M, N, pid_n, pid_k, SPLIT, BM, BN, SPLITK)


@triton.jit
def _group_rows(b, i3, gmap_ptr, G, GS: tl.constexpr, HAS_GMAP: tl.constexpr):
    """Group index of each 16-column nibble tile i3 ([8, 1, 1]) of block b."""
    if HAS_GMAP:
        g3 = tl.load(gmap_ptr + b * 8 + i3)
    else:
        g3 = tl.minimum((b * 128 + i3 * 16) // GS, G - 1)
    return g3


@triton.jit(do_not_specialize=["M", "G", "NB", "BPS", "SPLIT"])
def _q4_gemv2(x_ptr, w_ptr, s_ptr, z_ptr, lut_ptr, gmap_ptr, out_ptr, ws_ptr, cnt_ptr,
             M, N, K, G, NB, BPS, SPLIT,
             MODE: tl.constexpr, LUT_ROW: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_ZERO: tl.constexpr,
             ZC: tl.constexpr, GS: tl.constexpr, GPT: tl.constexpr, HAS_GMAP: tl.constexpr,
             BM: tl.constexpr, BN: tl.constexpr, SPLITK: tl.constexpr):
    """M = 1. The [16, BN] word tile is viewed as [8, 16, BN] (nibble, row, column); the nibble axis
    lives in each thread's registers, so the per-nibble masks and constants fold to immediates."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BN + tl.arange(0, BN)
    nmask = offs_n < N
    r = tl.arange(0, 16)
    i3 = tl.arange(0, 8)[:, None, None]
    lo = i3 < 5
    p3 = tl.where(lo, i3, i3 - 3)              # nibble position inside w (i < 5) or w >> 12
    mask3 = 15 << (4 * p3)
    psc3 = (1 << (23 - 4 * p3)).to(tl.float32)  # (w & mask) | 1.0f  ==  1 + q / psc
    BLOCK_SCALE: tl.constexpr = (not HAS_GMAP) and (GS % 128 == 0)
    if MODE == 1:
        lut = _load_lut(lut_ptr, r, offs_n, nmask, N, LUT_ROW)
    if BLOCK_SCALE:
        acc = tl.zeros([16, BN], dtype=tl.float32)
    else:
        acc = tl.zeros([8, 16, BN], dtype=tl.float32)
    b0 = pid_k * BPS
    b1 = tl.minimum(b0 + BPS, NB)
    for b in range(b0, b1):
        w = tl.load(w_ptr + (b * 16 + r)[:, None] * N + offs_n[None, :], mask=nmask[None, :], other=0)
        kk3 = b * 128 + i3 * 16 + r[None, :, None]
        xv = tl.load(x_ptr + kk3, mask=kk3 < K, other=0.0).to(tl.float32)      # [8, 16, 1]
        if MODE == 0:
            w3 = tl.where(lo, w[None, :, :], (w >> 12)[None, :, :])
            f = ((w3 & mask3) | 0x3F800000).to(tl.float32, bitcast=True)       # 1 + q / psc, exact
            xp = xv * psc3
            if BLOCK_SCALE:
                g = tl.minimum((b * 128) // GS, G - 1)
                s = tl.load(s_ptr + g * N + offs_n, mask=nmask, other=0.0).to(tl.float32)
                if HAS_ZERO:
                    z = tl.load(z_ptr + g * N + offs_n, mask=nmask, other=0).to(tl.float32)
                    c3 = 1.0 + z[None, None, :] / psc3
                else:
                    c3 = 1.0 + ZC / psc3
                acc += tl.sum(xp * (f - c3), axis=0) * s[None, :]
            else:
                g3 = _group_rows(b, i3, gmap_ptr, G, GS, HAS_GMAP)
                s3 = tl.load(s_ptr + g3 * N + offs_n[None, None, :], mask=nmask[None, None, :],
                             other=0.0).to(tl.float32)
                if HAS_ZERO:
                    z3 = tl.load(z_ptr + g3 * N + offs_n[None, None, :], mask=nmask[None, None, :],
                                 other=0).to(tl.float32)
                    c3 = 1.0 + z3 / psc3
                else:
                    c3 = 1.0 + ZC / psc3
                acc += xp * ((f - c3) * s3)
        else:
            q3 = (w[None, :, :] >> (4 * i3)) & 15
            v = tl.reshape(tl.gather(lut, tl.reshape(q3, [128, BN]), 0), [8, 16, BN])
            if BLOCK_SCALE:
                t = tl.sum(xv * v, axis=0)
                if HAS_SCALE:
                    g = tl.minimum((b * 128) // GS, G - 1)
                    s = tl.load(s_ptr + g * N + offs_n, mask=nmask, other=0.0).to(tl.float32)
                    acc += t * s[None, :]
                else:
                    acc += t
            else:
                g3 = _group_rows(b, i3, gmap_ptr, G, GS, HAS_GMAP)
                s3 = tl.load(s_ptr + g3 * N + offs_n[None, None, :], mask=nmask[None, None, :],
                             other=0.0).to(tl.float32)
                acc += xv * (v * s3)
    if BLOCK_SCALE:
        res = tl.sum(acc, axis=0)
    else:
        res = tl.sum(tl.sum(acc, axis=0), axis=0)
    offs_m = tl.arange(0, 1)
    _finish(res[None, :], out_ptr, ws_ptr, cnt_ptr, offs_m, offs_n, M, N, pid_n, pid_k, SPLIT, 1, BN, SPLITK)


@triton.jit(do_not_specialize=["M", "G", "NB", "BPS", "SPLIT"])
def _q4_gemm(x_ptr, w_ptr, s_ptr, z_ptr, lut_ptr, gmap_ptr, out_ptr, ws_ptr, cnt_ptr,
             M, N, K, G, NB, BPS, SPLIT,
             MODE: tl.constexpr, LUT_ROW: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_ZERO: tl.constexpr, ZC: tl.constexpr,
             GS: tl.constexpr, GPT: tl.constexpr, HAS_GMAP: tl.constexpr,
             BM: tl.constexpr, BN: tl.constexpr, SPLITK: tl.constexpr,
             PRE: tl.constexpr, GROUP_M: tl.constexpr, MAGIC: tl.constexpr, MV: tl.constexpr,
             V2: tl.constexpr):
    XDT = x_ptr.dtype.element_ty
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m, pid_n = _tile_mn(pid, M, N, BM, BN, GROUP_M)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    mmask = offs_m < M
    nmask = offs_n < N
    r = tl.arange(0, 16)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    if MODE == 1:
        lutf = _load_lut(lut_ptr, r, offs_n, nmask, N, LUT_ROW)
        lutx = lutf.to(XDT)
    b0 = pid_k * BPS
    b1 = tl.minimum(b0 + BPS, NB)
    for b in range(b0, b1):
        w = tl.load(w_ptr + (b * 16 + r)[:, None] * N + offs_n[None, :], mask=nmask[None, :], other=0)
        if PRE:
            kk = b * 128 + tl.arange(0, 128)
            xt = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * K + kk[None, :],
                         mask=mmask[:, None] & (kk < K)[None, :], other=0.0)
            i8 = tl.arange(0, 8)
            q3 = (w[None, :, :] >> (i8 * 4)[:, None, None]) & 15
            if HAS_SCALE:
                if HAS_GMAP:
                    g8 = tl.load(gmap_ptr + b * 8 + i8)
                else:
                    g8 = tl.minimum((b * 128 + i8 * 16) // GS, G - 1)
                s8 = tl.load(s_ptr + g8[:, None] * N + offs_n[None, :], mask=nmask[None, :], other=0.0)
                s8 = s8.to(tl.float32)
            if MODE == 0:
                if HAS_ZERO:
                    z8 = tl.load(z_ptr + g8[:, None] * N + offs_n[None, :], mask=nmask[None, :], other=0)
                    c8 = z8.to(tl.float32) + 8388608.0
                else:
                    c8 = tl.zeros([8, BN], dtype=tl.float32) + (8388608.0 + ZC)
                f = (q3 | 0x4B000000).to(tl.float32, bitcast=True)  # 2^23 + q, exact
                deq = (f - c8[:, None, :]) * s8[:, None, :]
                bt = tl.reshape(deq, [128, BN]).to(XDT)
            else:
                v = tl.gather(lutf, tl.reshape(q3, [128, BN]), 0)
                if HAS_SCALE:
                    v = v * tl.reshape(tl.broadcast_to(s8[:, None, :], [8, 16, BN]), [128, BN])
                bt = v.to(XDT)
            acc = _dot(xt, bt, acc)
        elif V2:  # whole block in one group (GS % 128 == 0): one K=128 dot, scale after it
            kk = b * 128 + tl.arange(0, 128)
            xt = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * K + kk[None, :],
                         mask=mmask[:, None] & (kk < K)[None, :], other=0.0)
            i3 = tl.arange(0, 8)[:, None, None]
            q3 = (w[None, :, :] >> (4 * i3)) & 15
            if MODE == 0:
                if _INTERP:
                    bt = tl.reshape(q3.to(tl.float32) + MV, [128, BN]).to(XDT)
                else:
                    bt = tl.reshape((q3 | MAGIC).to(tl.int16).to(XDT, bitcast=True), [128, BN])
            else:
                bt = tl.gather(lutx, tl.reshape(q3, [128, BN]), 0)
            if HAS_SCALE:
                d = _dot(xt, bt, tl.zeros([BM, BN], dtype=tl.float32))
                g = tl.minimum((b * 128) // GS, G - 1)
                if MODE == 0:
                    xs = tl.sum(xt.to(tl.float32), axis=1)
                else:
                    xs = tl.zeros([BM], dtype=tl.float32)
                acc = _add_scaled(acc, d, xs, s_ptr, z_ptr, g, N, offs_n, nmask, MODE, HAS_ZERO, ZC, MV)
            else:
                acc = _dot(xt, bt, acc)
        else:
            for j in tl.static_range(8 // GPT):
                xs = tl.zeros([BM], dtype=tl.float32)
                for ii in tl.static_range(GPT):
                    i = j * GPT + ii
                    kk = b * 128 + i * 16 + r
                    xi = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * K + kk[None, :],
                                 mask=mmask[:, None] & (kk < K)[None, :], other=0.0)
                    q = (w >> (4 * i)) & 15
                    if MODE == 0:
                        if _INTERP:  # the interpreter cannot bitcast to bf16: same value by arithmetic
                            bt = (q.to(tl.float32) + MV).to(XDT)
                        else:
                            bt = (q | MAGIC).to(tl.int16).to(XDT, bitcast=True)
                        xs += tl.sum(xi.to(tl.float32), axis=1)
                    else:
                        bt = tl.gather(lutx, q, 0)
                    if ii == 0:
                        d = _dot(xi, bt, tl.zeros([BM, BN], dtype=tl.float32))
                    else:
                        d = _dot(xi, bt, d)
                if HAS_SCALE:
                    g = _group_of(b, j, gmap_ptr, G, GS, GPT, HAS_GMAP)
                    acc = _add_scaled(acc, d, xs, s_ptr, z_ptr, g, N, offs_n, nmask, MODE, HAS_ZERO, ZC, MV)
                else:
                    acc += d
    _finish(acc, out_ptr, ws_ptr, cnt_ptr, offs_m, offs_n, M, N, pid, pid_k, SPLIT, BM, BN, SPLITK)


@triton.jit(do_not_specialize=["G"])
def _q4_dequant(w_ptr, s_ptr, z_ptr, lut_ptr, gmap_ptr, out_ptr, N, K, G,
                MODE: tl.constexpr, LUT_ROW: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_ZERO: tl.constexpr, ZC: tl.constexpr,
                GS: tl.constexpr, HAS_GMAP: tl.constexpr, BN: tl.constexpr):
    """Write the dequantized weight [N, K] (row-major, x dtype) for one 128-column block."""
    b = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_n = pid_n * BN + tl.arange(0, BN)
    nmask = offs_n < N
    r = tl.arange(0, 16)
    w = tl.load(w_ptr + (b * 16 + r)[:, None] * N + offs_n[None, :], mask=nmask[None, :], other=0)
    i8 = tl.arange(0, 8)
    q3 = (w[None, :, :] >> (i8 * 4)[:, None, None]) & 15
    if HAS_SCALE:
        if HAS_GMAP:
            g8 = tl.load(gmap_ptr + b * 8 + i8)
        else:
            g8 = tl.minimum((b * 128 + i8 * 16) // GS, G - 1)
        s8 = tl.load(s_ptr + g8[:, None] * N + offs_n[None, :], mask=nmask[None, :], other=0.0).to(tl.float32)
    if MODE == 0:
        if HAS_ZERO:
            z8 = tl.load(z_ptr + g8[:, None] * N + offs_n[None, :], mask=nmask[None, :], other=0)
            c8 = z8.to(tl.float32) + 8388608.0
        else:
            c8 = tl.zeros([8, BN], dtype=tl.float32) + (8388608.0 + ZC)
        f = (q3 | 0x4B000000).to(tl.float32, bitcast=True)
        v = tl.reshape((f - c8[:, None, :]) * s8[:, None, :], [128, BN])
    else:
        lutf = _load_lut(lut_ptr, r, offs_n, nmask, N, LUT_ROW)
        v = tl.gather(lutf, tl.reshape(q3, [128, BN]), 0)
        if HAS_SCALE:
            v = v * tl.reshape(tl.broadcast_to(s8[:, None, :], [8, 16, BN]), [128, BN])
    kk = b * 128 + tl.arange(0, 128)
    tl.store(out_ptr + offs_n[None, :].to(tl.int64) * K + kk[:, None], v.to(out_ptr.dtype.element_ty),
             mask=nmask[None, :] & (kk < K)[:, None])


# ================================================================================================
# Repack
# ================================================================================================
def _interleave(codes: torch.Tensor) -> torch.Tensor:
    """codes [n, Kp] (values < 16) -> int32 words [Kp/8, n] in the block-interleaved order."""
    n, kp = codes.shape
    c = codes.to(torch.int64).view(n, kp // PB, 8, 16)
    word = torch.zeros(n, kp // PB, 16, dtype=torch.int64, device=codes.device)
    for i in range(8):
        word |= c[:, :, i, :] << (4 * i)
    word = torch.where(word >= 2 ** 31, word - 2 ** 32, word).to(torch.int32)
    return word.view(n, kp // 8).t().contiguous()


def repack_codes(qweight: torch.Tensor, bits: int, cols: int, perm: torch.Tensor | None,
                 chunk: int = 4096) -> torch.Tensor:
    rows = qweight.shape[0]
    kp = cdiv(cols, PB) * PB
    parts = []
    for r0 in range(0, rows, chunk):
        c = unpack_codes(qweight[r0:r0 + chunk], bits, cols)
        if perm is not None:
            c = c[:, perm]
        if kp != cols:
            c = torch.nn.functional.pad(c, (0, kp - cols))
        parts.append(_interleave(c))
    return torch.cat(parts, dim=1).contiguous()


# ================================================================================================
# The layer kernel
# ================================================================================================
# v1 kernels ran and were measured on a Hopper GPU (docs/PERFORMANCE.md). v2 (one [8, 16, BN] view per
# block in the GEMV; one K=128 dot per block with the scale after it) passes the interpreter tests
# but has not run on a GPU yet: opt in with QUANTKIT_KERNEL_V2=1 until it has been measured.
V2 = os.environ.get("QUANTKIT_KERNEL_V2", "0") == "1"


class LowbitKernel:
    """``x -> x @ W^T`` for one int/lut layer; built once (repack), called per forward."""

    def __init__(self, mode: int, shape, device, w, s, z, lut, lut_row, gmap, perm, G, GS, GPT, zc,
                 fallback, tag: str):
        self.mode, self.device, self.tag = mode, device, tag
        self.N, self.K = shape
        self.w, self.s, self.z, self.lut, self.gmap, self.perm = w, s, z, lut, gmap, perm
        self.G, self.GS, self.GPT, self.zc, self.lut_row = G, GS, GPT, zc, lut_row
        self.NB = cdiv(self.K, PB)
        self.fallback = fallback
        self.plans: dict = {}
        self._ptrs = tuple(t if t is not None else w for t in (w, s, z, lut, gmap))
        self.v2 = V2

    @property
    def gemv_max_m(self) -> int:
        return 1 if self.v2 else 4

    # ---- configs ---------------------------------------------------------------------------
    def key(self, mb: int, dtype) -> str:
        return (f"{self.tag}{'.v2' if self.v2 else ''}:{self.N}x{self.K}:"
                f"{'bf16' if dtype == torch.bfloat16 else 'fp16'}:m{mb}")

    @property
    def block_scale(self) -> bool:
        """Every 128-column block lies in one group: the tensor-core path scales after the dot."""
        return self.gmap is None and self.GS % PB == 0

    def default_config(self, mb: int) -> dict:
        """Heuristic Hopper config when no tuned one is stored."""
        n, nb, sms = self.N, self.NB, 132
        if mb <= self.gemv_max_m:
            bn = 64 if (self.v2 or mb > 1) else 128
            split = max(1, min(nb // 4, cdiv(4 * sms, cdiv(n, bn))))
            return {"path": "gemv", "BN": bn, "warps": 4, "stages": 3, "split": split}
        if mb <= 64:
            bm = max(16, mb)
            bn = 128 if mb <= 32 or not self.v2 else 64
            split = max(1, min(nb // 4, cdiv(2 * sms, cdiv(n, bn) * cdiv(mb, bm))))
            path = "post" if (self.block_scale or not self.v2) else "pre"
            return {"path": path, "BM": bm, "BN": bn, "warps": 4, "stages": 3, "split": split}
        if mb >= 128 and not self.v2:
            return {"path": "dq"}
        if mb >= 512:
            return {"path": "dq"}
        return {"path": "pre", "BM": 64 if mb <= 128 else 128, "BN": 128, "warps": 4 if mb <= 128 else 8,
                "stages": 3}

    def config(self, mb: int, dtype) -> dict:
        return tuned().get(self.key(mb, dtype)) or self.default_config(mb)

    def make_plan(self, cfg: dict, dtype, mb: int):
        """A closure ``(x2d, out, M) -> None`` running one config for rows M <= mb."""
        N, K, NB, G = self.N, self.K, self.NB, self.G
        path = cfg["path"]
        wp, sp, zp, lp, gp = self._ptrs
        common = dict(MODE=self.mode, LUT_ROW=self.lut_row, HAS_SCALE=self.s is not None,
                      HAS_ZERO=self.z is not None, ZC=float(self.zc), GS=self.GS)
        if path == "dq":
            bn = 64
            lau = Launcher(_q4_dequant, dict(common, HAS_GMAP=self.gmap is not None, BN=bn),
                           num_warps=4, num_stages=1, device=self.device)
            grid = (NB, cdiv(N, bn), 1)
            return dequant_then_mm(lau, grid, (wp, sp, zp, lp, gp), (N, K, G), N, K, dtype, self.device)
        common.update(GPT=self.GPT, HAS_GMAP=self.gmap is not None)
        split = max(1, min(int(cfg.get("split", 1)), NB))
        bps = cdiv(NB, split)
        split = cdiv(NB, bps)
        splitk = split > 1
        bn = cfg["BN"]
        tiles_n = cdiv(N, bn)
        if path == "gemv":
            bm = mb
            lau = Launcher(_q4_gemv2 if self.v2 else _q4_gemv_v1, dict(common, BM=bm, BN=bn, SPLITK=splitk),
                           num_warps=cfg["warps"], num_stages=cfg["stages"], device=self.device)
            grid = (tiles_n, split, 1)
            ws, cnt = workspace(self.device, tiles_n * split * bm * bn if splitk else 0, tiles_n)

            def run_gemv(x, out, M):
                lau(grid, x, wp, sp, zp, lp, gp, out, ws, cnt, M, N, K, G, NB, bps, split)
            return run_gemv
        bm = cfg["BM"]
        magic, mv = _MAGIC[dtype]
        lau = Launcher(_q4_gemm, dict(common, BM=bm, BN=bn, SPLITK=splitk, PRE=(path == "pre"),
                                      GROUP_M=int(cfg.get("group_m", 8 if path == "pre" else 1)),
                                      MAGIC=magic, MV=mv, V2=self.v2),
                       num_warps=cfg["warps"], num_stages=cfg["stages"], device=self.device)
        tiles_m = cdiv(mb, bm)
        ws, cnt = workspace(self.device, tiles_m * tiles_n * split * bm * bn if splitk else 0, tiles_m * tiles_n)

        def run_gemm(x, out, M):
            lau((cdiv(M, bm) * tiles_n, split, 1), x, wp, sp, zp, lp, gp, out, ws, cnt, M, N, K, G, NB, bps,
                split)
        return run_gemm

    def plan(self, M: int, dtype, cfg: dict | None = None):
        mb = m_bucket(M)
        if cfg is None:
            cfg = self.config(mb, dtype)
        if cfg["path"] == "gemv" and mb > self.gemv_max_m:
            cfg = self.default_config(mb)
        if cfg["path"] == "post" and self.v2 and not self.block_scale:
            cfg = dict(cfg, path="pre")
        p = self.make_plan(cfg, dtype, mb)
        self.plans[(mb, dtype)] = p
        return p

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        dt = x.dtype
        if dt not in _MAGIC:
            return self.fallback(x)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.K)
        if self.perm is not None:
            x2 = x2.index_select(1, self.perm)
        elif not x2.is_contiguous():
            x2 = x2.contiguous()
        if x2.data_ptr() & 15:
            x2 = x2.clone()
        M = x2.shape[0]
        out = torch.empty((M, self.N), dtype=dt, device=x.device)
        if M:
            mb = 1 if M <= 1 else min(1 << (M - 1).bit_length(), 4096)
            p = self.plans.get((mb, dt)) or self.plan(M, dt)
            p(x2, out, M)
        return out.view(*lead, self.N)


# ================================================================================================
# Builders
# ================================================================================================
def _gmap_for(g_sorted: torch.Tensor, kp: int, G: int) -> tuple[torch.Tensor, int] | None:
    """Per-16-column-tile group map and the flush width (tiles per group run) for sorted groups."""
    k = g_sorted.numel()
    g = torch.nn.functional.pad(g_sorted.to(torch.int32), (0, kp - k), value=int(g_sorted[-1]) if k else 0)
    tiles = g.view(-1, 16)
    if not bool((tiles == tiles[:, :1]).all()):
        return None
    gm = tiles[:, 0].contiguous()
    for gpt in (8, 4, 2, 1):
        t = gm.view(-1, gpt)
        if bool((t == t[:, :1]).all()):
            return gm.clamp_(0, max(G - 1, 0)), gpt
    return None


def _build(mode: int, fmt, packed, shape, device, bits: int, has_zero: bool, zc: float, lut, lut_row, tag):
    N, K = shape
    if bits > 4 or N == 0 or K == 0:
        return None
    gsz = fmt.group_size
    s = packed.get("scales")
    z = packed.get("zeros") if has_zero else None
    g_idx = packed.get("g_idx")
    perm = gmap = None
    G = s.shape[1] if s is not None else 1
    kp = cdiv(K, PB) * PB
    if g_idx is not None:
        gi = g_idx.to(device=device, dtype=torch.long)
        perm = torch.argsort(gi, stable=True)
        res = _gmap_for(gi[perm], kp, G)
        if res is None:
            return None  # groups not aligned to 16 columns: plain PyTorch fallback
        gmap, gpt = res
        gs = 128
        perm = perm.to(torch.int64).contiguous()
    else:
        gs = gsz if gsz else (1 << 30)
        if gs % 16 or (gs % PB and PB % gs):
            return None
        gpt = min(gs, PB) // 16
    qw = packed["qweight"].to(device)
    w = repack_codes(qw, bits, K, perm)
    st = s.to(device).t().contiguous() if s is not None else None
    zt = z.to(device).t().contiguous() if z is not None else None
    if gmap is not None:
        gmap = gmap.to(device)
    if lut is not None:
        lut = lut.to(device)

    def fallback(x, _fmt=fmt, _p=packed, _shape=shape):
        return _fmt.linear(x, _p, _shape)

    return LowbitKernel(mode, shape, device, w, st, zt, lut, lut_row, gmap, perm, G, gs, gpt, zc, fallback, tag)


# Which implementation serves int/lut layers: "k" (kernels/src/_kmajor.py: the checkpoint's own layout,
# no repack, no second copy), "v1" (block-interleaved repack) or "v2" (v1's layout, reworked inner
# loops, never measured). Defaults, from the H100 runs of 2026-11-26 (docs/PERFORMANCE.md): "k" for
# int (faster than v1 at M <= 64 on every Llama shape but one cell) and, since its table lookups
# moved into registers (inline-PTX byte permutes), for lut too (2-4x faster than v1's shared-memory
# lookups). QUANTKIT_LOWBIT=k|v1|v2 forces one for both; QUANTKIT_KERNEL_V2=1 still selects v2.
IMPL = os.environ.get("QUANTKIT_LOWBIT") or ("v2" if V2 else None)
DEFAULT_IMPL = {"int": "k", "lut": "k"}


def _impl(impl, ftype: str = "int"):
    return (impl or IMPL or DEFAULT_IMPL[ftype]).lower()


@register_kernel("int")
def build_int(fmt, packed, shape, device, impl: str | None = None):
    bits = fmt.cfg.bits
    sym = fmt.cfg.sym
    tag = f"int{bits}{'' if sym else 'a'}g{fmt.group_size or 0}"
    if packed.get("scales") is None:
        return None
    zc = float(1 << (bits - 1)) if sym else 0.0
    if _impl(impl, "int") == "k":
        from . import _kmajor

        k = _kmajor.build(0, fmt, packed, shape, device, bits, not sym, zc, None, False, tag)
        if k is not None:
            return k
    kern = _build(0, fmt, packed, shape, device, bits, not sym, zc, None, False, tag)
    if kern is not None and _impl(impl, "int") == "v2":
        kern.v2 = True
    return kern


@register_kernel("lut")
def build_lut(fmt, packed, shape, device, impl: str | None = None):
    bits = fmt.cfg.bits
    rows = packed["lut"].shape[0]
    tag = f"lut{bits}{'r' if rows > 1 else 'f'}g{fmt.group_size or 0}{'s' if 'scales' in packed else ''}"
    if _impl(impl, "lut") == "k":
        from . import _kmajor

        k = _kmajor.build(1, fmt, packed, shape, device, bits, False, 0.0, packed["lut"], rows > 1, tag)
        if k is not None:
            return k
    lut = packed["lut"].float()
    lt = torch.zeros(16, rows, dtype=torch.float32, device=lut.device)
    lt[: lut.shape[1]] = lut.t()
    lt = lt.contiguous()
    kern = _build(1, fmt, packed, shape, device, bits, False, 0.0, lt, rows > 1, tag)
    if kern is not None and _impl(impl, "lut") == "v2":
        kern.v2 = True
    return kern
