"""W4A16 kernels on a block-interleaved repack of the ``int`` and ``lut`` codes (implementation "v1").

Not the default (that is w4a16.py, on the checkpoint's own layout): kept selectable with
QUANTKIT_LOWBIT=v1 and as the fallback where the default builder declines a layer (act-order groups
that are not contiguous runs after sorting); lowbit.py chooses.

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

import torch
import triton
import triton.language as tl

from quantkit.formats.packing import unpack_codes

from ._launch import INTERPRET, Launcher, cdiv, dequant_then_mm, tiled_workspace, workspace
from ._tl import _finish, _tile_mn
from .base import LayerKernel

PB = 128  # columns per packed block
_INTERP = tl.constexpr(INTERPRET)
_MAGIC = {torch.bfloat16: (0x4300, 128.0), torch.float16: (0x6400, 1024.0)}


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
def repacked_gemv(x_ptr, w_ptr, s_ptr, z_ptr, lut_ptr, gmap_ptr, out_ptr, ws_ptr, cnt_ptr,
             M, N, K, G, NB, BPS, SPLIT,
             MODE: tl.constexpr, LUT_ROW: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_ZERO: tl.constexpr,
             ZC: tl.constexpr,
             GS: tl.constexpr, GPT: tl.constexpr, HAS_GMAP: tl.constexpr,
             BM: tl.constexpr, BN: tl.constexpr, SPLITK: tl.constexpr):
    """GEMV: one [16, BN] nibble tile at a time, M <= 4."""
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


@triton.jit(do_not_specialize=["M", "G", "NB", "BPS", "SPLIT"])
def repacked_gemm(x_ptr, w_ptr, s_ptr, z_ptr, lut_ptr, gmap_ptr, out_ptr, ws_ptr, cnt_ptr,
             M, N, K, G, NB, BPS, SPLIT,
             MODE: tl.constexpr, LUT_ROW: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_ZERO: tl.constexpr,
             ZC: tl.constexpr,
             GS: tl.constexpr, GPT: tl.constexpr, HAS_GMAP: tl.constexpr,
             BM: tl.constexpr, BN: tl.constexpr, SPLITK: tl.constexpr,
             PRE: tl.constexpr, GROUP_M: tl.constexpr, MAGIC: tl.constexpr, MV: tl.constexpr):
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
def repacked_dequant(w_ptr, s_ptr, z_ptr, lut_ptr, gmap_ptr, out_ptr, N, K, G,
                MODE: tl.constexpr, LUT_ROW: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_ZERO: tl.constexpr,
                ZC: tl.constexpr,
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
class RepackedW4A16Kernel(LayerKernel):
    """``x -> x @ W^T`` for one int/lut layer on the block-interleaved repack; built once, called per
    forward."""

    impl = "v1"

    def __init__(self, mode: int, shape, device, w, s, z, lut, lut_row, gmap, perm, G, GS, GPT, zc,
                 fallback, tag: str):
        super().__init__(shape, device, tag, fallback, perm)
        self.mode = mode
        self.w, self.s, self.z, self.lut, self.gmap = w, s, z, lut, gmap
        self.G, self.GS, self.GPT, self.zc, self.lut_row = G, GS, GPT, zc, lut_row
        self.NB = cdiv(self.K, PB)
        self._ptrs = tuple(t if t is not None else w for t in (w, s, z, lut, gmap))

    # ---- configs ---------------------------------------------------------------------------
    def default_config(self, mb: int, dtype) -> dict:
        """Heuristic Hopper config when no tuned one is stored."""
        n, nb, sms = self.N, self.NB, 132
        if mb <= self.gemv_max_m:
            bn = 64 if mb > 1 else 128
            split = max(1, min(nb // 4, cdiv(4 * sms, cdiv(n, bn))))
            return {"path": "gemv", "BN": bn, "warps": 4, "stages": 3, "split": split}
        if mb <= 64:
            bm = max(16, mb)
            split = max(1, min(nb // 4, cdiv(2 * sms, cdiv(n, 128) * cdiv(mb, bm))))
            return {"path": "post", "BM": bm, "BN": 128, "warps": 4, "stages": 3, "split": split}
        return {"path": "dq"}

    def make_plan(self, cfg: dict, dtype, mb: int):
        """A closure ``(x2d, out, M) -> None`` running one config for rows M <= mb."""
        N, K, NB, G = self.N, self.K, self.NB, self.G
        path = cfg["path"]
        wp, sp, zp, lp, gp = self._ptrs
        common = dict(MODE=self.mode, LUT_ROW=self.lut_row, HAS_SCALE=self.s is not None,
                      HAS_ZERO=self.z is not None, ZC=float(self.zc), GS=self.GS)
        if path == "dq":
            bn = 64
            lau = Launcher(repacked_dequant, dict(common, HAS_GMAP=self.gmap is not None, BN=bn),
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
            lau = Launcher(repacked_gemv, dict(common, BM=bm, BN=bn, SPLITK=splitk),
                           num_warps=cfg["warps"], num_stages=cfg["stages"], device=self.device)
            grid = (tiles_n, split, 1)
            ws, cnt = workspace(self.device, tiles_n * split * bm * bn if splitk else 0, tiles_n)

            def run_gemv(x, out, M):
                lau(grid, x, wp, sp, zp, lp, gp, out, ws, cnt, M, N, K, G, NB, bps, split)
            return run_gemv
        bm = cfg["BM"]
        magic, mv = _MAGIC[dtype]
        lau = Launcher(repacked_gemm, dict(common, BM=bm, BN=bn, SPLITK=splitk, PRE=(path == "pre"),
                                           GROUP_M=int(cfg.get("group_m", 8 if path == "pre" else 1)),
                                           MAGIC=magic, MV=mv),
                       num_warps=cfg["warps"], num_stages=cfg["stages"], device=self.device)
        ws_for = tiled_workspace(self.device, bm, tiles_n, split, bm * bn)
        ws, cnt = ws_for(mb)

        def run_gemm(x, out, M):
            w, c = (ws, cnt) if M <= mb else ws_for(M)
            lau((cdiv(M, bm) * tiles_n, split, 1), x, wp, sp, zp, lp, gp, out, w, c, M, N, K, G, NB, bps,
                split)
        return run_gemm


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


def build(mode: int, fmt, packed, shape, device, bits: int, has_zero: bool, zc: float, lut, lut_row, tag):
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

    return RepackedW4A16Kernel(mode, shape, device, w, st, zt, lut, lut_row, gmap, perm, G, gs, gpt, zc, fallback,
                               tag)
