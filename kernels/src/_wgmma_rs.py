"""Hopper (sm_90) large-M W4A16 GEMM with the dequantized weight as the *register* A operand of wgmma
(path ``wg``, config key ``rs``): the dequantized weights never touch shared memory.

The ``wg`` kernels of ``_wgmma`` compute ``out = x · Wᵀ`` with both wgmma operands in shared memory
(SS): each chunk's dequantized [BN, BK] tile is stored to shared memory, fenced and barriered before
the wgmma reads it. Here (the Machete / CUTLASS mixed-input arrangement) the product is transposed,
``outᵀ = W · xᵀ``: the weight rows are wgmma's M side (64 rows per warpgroup), x's rows its N side
(BM = 64-256; 8-32 for small M), and the dequantized weights are the A operand **in registers** (RS wgmma):

  per chunk c of BK columns (program = one [BN weight rows, BM x rows] tile of outᵀ):
    1. wait for chunk c's x tile [BM, BK] and the re-laid words [BN, BK/8] (TMA, STAGES-slot ring,
       one mbarrier per slot, issued STAGES-2 chunks ahead);
    2. every thread reads its own words from shared memory (8-byte loads) and dequantizes them with
       the group scale (magic-number PTX, no PRMT) straight into its A-fragment registers;
    3. one CTA barrier, the TMA of chunk c + STAGES - 2 into the slot chunk c - 2 used;
    4. asynchronous wgmma(A = registers, B = x tileᵀ in shared memory), then wait until one wgmma is
       left in flight: the tensor cores run chunk c while the threads dequantize chunk c + 1.
  The tensor cores read an asynchronous wgmma's A registers until the wait that retires it (the PTX
  ISA makes any earlier write undefined), so chunk c + 1 must not be dequantized into the registers
  wgmma c reads: the loop is unrolled by two, even and odd chunks in two register sets (tests check the
  SASS). The first version rewrote one set each chunk; that race is the likely cause of its wrong
  results on the H100 (2026-12-07), worst where two warpgroups shared an SM's tensor cores.
  The accumulator [BN, BM] is written transposed into out [M, N] (EPI 1: through a register-layout
  conversion so that each thread stores 8 consecutive output columns).

The re-layout ("rs words", made once per layer by ``rs_shuffle``; the checkpoint is not changed):
wgmma's A fragment (m64k16, 16-bit types) gives lane l = 4 rl + t of a warp the rows rl and rl + 8 of
its 16 and, per k16 step s, the columns 16 s + 8 h + 2 t + e (h, e in {0, 1}) as register pairs (e
inside a pair). The rs words keep the checkpoint's shape [N, K/8] and rows; inside each 64-column
block of a row the 8 words are (t, sp) = word 2 t + sp and word (t, sp) holds the 8 columns
``32 sp + 16 s_lo + 8 h + 2 t + e`` (s = 2 sp + s_lo): exactly what lane t needs of two k16 steps. The
nibble of (q = h + 2 s_lo, e) is q + 4 e for int codes (the magic-number PTX's first step already
makes the pair {nibble q, nibble q + 4}: no PRMT at all) and 2 q + e for lut codes (the table lookup
of ``_ptx`` yields pairs of consecutive nibbles). The words' register layout is then the A
fragment's layout exactly, and the join / reshape / permute that names the values' columns is a
register renaming (checked on the PTX by tests/test_kernels_wg_rs.py: no shared store of the
dequantized values, no local memory).

Requirements (else the caller runs the plain ``wg`` kernel): those of ``_wgmma`` (compiled CUDA on
compute capability 9.x, Gluon, a 16-bit x dtype, K % BK == 0, whole groups per chunk, nibble codes),
BK a multiple of 64, BN = 64 x (warps / 4) or twice that.

Own code. The arrangement (transposed product, register-A operand, weights shuffled offline so that a
thread's word is its fragment) is Machete's (vLLM, Apache-2.0); nothing copied.
"""

from __future__ import annotations

import torch

from . import _wgmma as _W
from ._launch import nibble_words
from ._ptx import _ASM_INT_BF16_S, _ASM_INT_FP16_S

HAVE_GLUON = _W.HAVE_GLUON

def _fragment_pairs(text: str) -> str:
    """_ptx's scaled int dequantization without its PRMT interleave: the outputs are the magic-number
    registers a_q themselves, {nibble q, nibble q + 4} (lop3 with 0x000F000F), i.e. the A fragment's pairs
    (nib 0, nib 4, nib 1, nib 5, ...)."""
    lines = [ln for ln in text.split("\n") if not ln.startswith("prmt.b32 p")]
    out = "\n".join(lines)
    for q in range(4):
        out = out.replace(f"}}, p{q};", f"}}, a{q};")
    return out


_ASM_RS_BF16_S = _fragment_pairs(_ASM_INT_BF16_S)
_ASM_RS_FP16_S = _fragment_pairs(_ASM_INT_FP16_S)


# ------------------------------------------------------------------------------------------------
# The re-layout (host side, once per layer)
# ------------------------------------------------------------------------------------------------
# _rs_deq names the dequantized values' columns: t[n, j, e, h, s_lo] (the joins) -> reshape RS_SPLIT
# [n, kb, t, sp, e, h, s_lo] -> permute RS_PERM [n, kb, sp, s_lo, h, t, e] -> reshape [BN, BK]
RS_SPLIT = (4, 2, 2, 2, 2)
RS_PERM = (0, 1, 3, 6, 5, 2, 4)


def rs_nibble(q: int, e: int, mode: int) -> int:
    """The nibble of a word that holds fragment pair q (0-3), element e (0-1): int q + 4e, lut 2q + e."""
    return q + 4 * e if mode == 0 else 2 * q + e


def rs_columns(mode: int) -> torch.Tensor:
    """src [64]: position 8 * word + nibble of a 64-column block of rs words <- the block's column."""
    src = torch.empty(64, dtype=torch.long)
    for t in range(4):
        for sp in range(2):
            for s_lo in range(2):
                for h in range(2):
                    for e in range(2):
                        pos = 8 * (2 * t + sp) + rs_nibble(h + 2 * s_lo, e, mode)
                        src[pos] = 32 * sp + 16 * s_lo + 8 * h + 2 * t + e
    return src


def _unpack(w: torch.Tensor) -> torch.Tensor:
    n, kw = w.shape
    sh = torch.arange(0, 32, 4, device=w.device, dtype=torch.int64)
    return ((w.to(torch.int64).unsqueeze(-1) >> sh) & 15).reshape(n, kw * 8)


def rs_shuffle(w: torch.Tensor, mode: int, rows: int = 4096) -> torch.Tensor:
    """Checkpoint words w [N, K/8] (int32, column 8j + i in nibble i of word j; K % 64 == 0) -> the rs
    words [N, K/8]: the same rows, each 64-column block's nibbles permuted (module docstring)."""
    n, kw = w.shape
    assert (kw * 8) % 64 == 0, "K must be a multiple of 64"
    src = rs_columns(mode).to(w.device)
    out = torch.empty_like(w, dtype=torch.int32)
    for r0 in range(0, n, rows):  # bounded scratch: int64 codes of `rows` rows at a time
        c = _unpack(w[r0:r0 + rows]).view(-1, kw // 8, 64)[:, :, src]
        out[r0:r0 + rows] = nibble_words(c.reshape(-1, kw * 8))
    return out


def rs_unshuffle(ws: torch.Tensor, mode: int) -> torch.Tensor:
    """The inverse of ``rs_shuffle``."""
    n, kw = ws.shape
    inv = torch.argsort(rs_columns(mode)).to(ws.device)
    return nibble_words(_unpack(ws).view(n, kw // 8, 64)[:, :, inv].reshape(n, kw * 8))


# x rows per tile (wgmma's N side): 64-256 for large M; 8-32 for small M (decode, small batches), where the
# weight stream is the whole cost and the tensor cores idle on the padding (Machete's small-M tiles)
RS_BM = (8, 16, 32, 64, 128, 256)


def rs_ok(bn: int, bk: int, warps: int) -> bool:
    """Tile shapes the kernel takes: one or two warpgroups (the linear layouts want powers of two; more
    were never compiled nor run), 64 or 128 weight rows per warpgroup, BK 64 or 128."""
    return warps in (4, 8) and bk in (64, 128) and bn in (16 * warps, 32 * warps)


if HAVE_GLUON:
    from ._wgmma import (
        _ASM_LBF16,
        _ASM_LFP16,
        _CONS_C,
        _CONS_LC,
        _cta_barrier,
        _dq_group,
        _dq_rows,
        _splitk_put,
        _splitk_sum,
        _tile,
        _tma_load,
        _ws_load,
        gl,
        gluon,
        mbarrier,
        warpgroup_mma,
        warpgroup_mma_wait,
    )

    _ASM_RBF16 = gl.constexpr(_ASM_RS_BF16_S)
    _ASM_RFP16 = gl.constexpr(_ASM_RS_FP16_S)

    @gluon.constexpr_function
    def _rs_words_layout(BN, BK, num_warps):
        """The rs words' register layout [BN, BK/8]: lane 4 rl + t of warp v holds rows 16 v + rl (+ 8)
        and words 8 kb + 2 t + sp, i.e. the A fragment's rows and columns (module docstring); warp v is
        warp v % 4 of warpgroup v // 4, whose wgmma covers rows 64 (v // 4) .. + 63 of each 16 x num_warps
        (the accumulator's warps_per_cta [num_warps, 1]; all warpgroups emulated by the CPU tests)."""
        reg = [[0, 1], [8, 0]]
        kb = 8
        while kb < BK // 8:
            reg.append([0, kb])
            kb *= 2
        r = 16 * num_warps
        while r < BN:
            reg.append([r, 0])
            r *= 2
        warp = []
        v = 16
        while v < 16 * num_warps:
            warp.append([v, 0])
            v *= 2
        return gl.DistributedLinearLayout(reg_bases=reg, lane_bases=[[0, 2], [0, 4], [1, 0], [2, 0], [4, 0]],
                                          warp_bases=warp, block_bases=[], shape=[BN, BK // 8])

    @gluon.constexpr_function
    def _rs_acc_layout(BN, BM, num_warps):
        """outᵀ's accumulator [BN, BM]: warps along the weight rows, 16 each; the wgmma N side is BM."""
        return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BM, 16])

    @gluon.constexpr_function
    def _rs_out_layout(BN, BM, num_warps):
        """The store layout of outᵀ: 8 consecutive output columns (weight rows) per thread."""
        tn = min(32, BN // 8)
        return gl.BlockedLayout([8, 1], [tn, 32 // tn], [1, num_warps], [0, 1])

    @gluon.jit
    def _rs_deq(w, zz, ss, tp, XDT: gl.constexpr, MODE: gl.constexpr, BK: gl.constexpr):
        """rs words w [BN, BK/8] -> the [BN, BK] dequantized tile ((q - z) * s or table[q] * s in XDT) in
        column order, each value in the register of the thread whose A fragment holds it."""
        if MODE == 0:
            if XDT == gl.bfloat16:
                o0, o1, o2, o3, o4, o5, o6, o7 = gl.inline_asm_elementwise(
                    _ASM_RBF16, _CONS_C, [w, zz, ss], dtype=(gl.bfloat16,) * 8, is_pure=True, pack=1)
            else:
                o0, o1, o2, o3, o4, o5, o6, o7 = gl.inline_asm_elementwise(
                    _ASM_RFP16, _CONS_C, [w, zz, ss], dtype=(gl.float16,) * 8, is_pure=True, pack=1)
        else:  # the lut lookup's outputs are the nibbles in order; the lut rs words put pair q at 2q, 2q + 1
            args = [w, tp[0], tp[1], tp[2], tp[3], tp[4], tp[5], tp[6], tp[7], ss]
            if XDT == gl.bfloat16:
                o0, o1, o2, o3, o4, o5, o6, o7 = gl.inline_asm_elementwise(
                    _ASM_LBF16, _CONS_LC, args, dtype=(gl.bfloat16,) * 8, is_pure=True, pack=1)
            else:
                o0, o1, o2, o3, o4, o5, o6, o7 = gl.inline_asm_elementwise(
                    _ASM_LFP16, _CONS_LC, args, dtype=(gl.float16,) * 8, is_pure=True, pack=1)
        # output 2q + e = fragment pair q = h + 2 s_lo, element e; join puts its new axis last:
        # t[n, j, e, h, s_lo] with word j = 8 kb + 2 t + sp and column 64 kb + 32 sp + 16 s_lo + 8 h + 2 t + e
        t = gl.join(gl.join(gl.join(o0, o1), gl.join(o2, o3)), gl.join(gl.join(o4, o5), gl.join(o6, o7)))
        BN: gl.constexpr = w.shape[0]
        t = gl.reshape(t, [BN, BK // 64, 4, 2, 2, 2, 2])  # n, kb, t, sp, e, h, s_lo (RS_SPLIT)
        t = gl.permute(t, (0, 1, 3, 6, 5, 2, 4))  # n, kb, sp, s_lo, h, t, e (RS_PERM: Triton 3.6 wants a literal)
        return gl.reshape(t, [BN, BK])

    @gluon.jit
    def _rs_store(acc, out_ptr, off_m, off_n, M, N, BM: gl.constexpr, BN: gl.constexpr, EPI: gl.constexpr,
                  acc_l: gl.constexpr, num_warps: gl.constexpr):
        """outᵀ tile acc [BN, BM] (fp32) -> out[off_m + j, off_n + i] (masked), in x's dtype."""
        v = acc.to(out_ptr.dtype.element_ty)
        if EPI == 1:
            ol: gl.constexpr = _rs_out_layout(BN, BM, num_warps)
            v = gl.convert_layout(v, ol)
        else:
            ol: gl.constexpr = acc_l
        on = off_n + gl.arange(0, BN, layout=gl.SliceLayout(1, ol))
        om = off_m + gl.arange(0, BM, layout=gl.SliceLayout(0, ol))
        optr = out_ptr + gl.expand_dims(on, 1) + gl.expand_dims(om.to(gl.int64) * N, 0)
        mask = gl.expand_dims(on < N, 1) & gl.expand_dims(om < M, 0)
        gl.store(optr, v, mask=mask)

    @gluon.jit
    def _rs_issue(x_desc, w_desc, xs, ws, bars, c, c0, off_m, off_n, STAGES: gl.constexpr, BK: gl.constexpr):
        slot = c % STAGES
        bar = bars.index(slot)
        mbarrier.expect(bar, x_desc.block_type.nbytes + w_desc.block_type.nbytes)
        _tma_load(x_desc, [off_m, (c0 + c) * BK], bar, xs.index(slot))
        _tma_load(w_desc, [off_n, (c0 + c) * (BK // 8)], bar, ws.index(slot))

    @gluon.jit
    def _rs_chunk(xs, ws, c, c0, srow, z_ptr, rn, G, zz, tp, XDT: gl.constexpr, MODE: gl.constexpr,
                  HAS_SCALE: gl.constexpr, HAS_ZERO: gl.constexpr, GS: gl.constexpr, STAGES: gl.constexpr,
                  BN: gl.constexpr, BK: gl.constexpr, wl: gl.constexpr, a_l: gl.constexpr, ready):
        """Chunk c: wait for its slot, dequantize the words into the A fragment, issue the async wgmma."""
        slot = c % STAGES
        # the group's scale and zero: their global loads go out before the wait
        ss, zc = _dq_group(srow, z_ptr, rn, G, ((c0 + c) * BK) // GS, zz, XDT, HAS_SCALE, HAS_ZERO, BN, wl)
        mbarrier.wait(ready.index(slot), (c // STAGES) & 1)
        w = ws.index(slot).load(wl)
        sb, _ = gl.broadcast(gl.expand_dims(ss, 1), w)
        zb, _ = gl.broadcast(zc, w)
        a = gl.convert_layout(_rs_deq(w, zb, sb, tp, XDT, MODE, BK), a_l)  # a register renaming
        return a, slot

    @gluon.jit
    def _rs_step(x_desc, w_desc, xs, ws, bars, acc, c, c0, nch, off_m, off_n, srow, z_ptr, rn, G, zz, tp,
                 XDT: gl.constexpr, MODE: gl.constexpr, HAS_SCALE: gl.constexpr, HAS_ZERO: gl.constexpr,
                 GS: gl.constexpr, STAGES: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr,
                 wl: gl.constexpr, a_l: gl.constexpr):
        """Chunk c of the single-partition loop: dequantize, one CTA barrier, the TMA of chunk c + STAGES - 2,
        the asynchronous wgmma (the caller waits)."""
        a, slot = _rs_chunk(xs, ws, c, c0, srow, z_ptr, rn, G, zz, tp, XDT, MODE, HAS_SCALE, HAS_ZERO, GS,
                            STAGES, BN, BK, wl, a_l, bars)
        # every warp is past chunk c - 1's wait: wgmma c - 2 has retired everywhere, its slot is free
        _cta_barrier()
        if c + STAGES - 2 < nch:
            _rs_issue(x_desc, w_desc, xs, ws, bars, c + STAGES - 2, c0, off_m, off_n, STAGES, BK)
        return warpgroup_mma(a, xs.index(slot).permute((1, 0)), acc, is_async=True)

    @gluon.jit
    def _rs_loop(x_desc, w_desc, xs, ws, s_ptr, z_ptr, lut_ptr, off_m, off_n, N, G, c0, nch,
                 XDT: gl.constexpr, MODE: gl.constexpr, LUT_ROW: gl.constexpr, HAS_SCALE: gl.constexpr,
                 HAS_ZERO: gl.constexpr, ZC: gl.constexpr, GS: gl.constexpr, STAGES: gl.constexpr,
                 BN: gl.constexpr, BM: gl.constexpr, BK: gl.constexpr):
        """The single-partition main loop: every warp dequantizes, issues its wgmma and (one CTA barrier per
        chunk) the TMA loads STAGES - 2 chunks ahead.

        The A registers of a wgmma are read by the tensor cores until the wait that retires it (PTX ISA:
        touching them earlier is undefined), and the wait after wgmma c only retires c - 1: chunk c + 1
        must not be dequantized into the registers wgmma c reads. The loop is therefore unrolled by two
        (even chunks into one register set, odd chunks into another: two static definitions, two sets of
        registers); an odd chunk count runs chunk 0 alone first, retired at once (tests check the SASS)."""
        num_warps: gl.constexpr = gl.num_warps()
        wl: gl.constexpr = _rs_words_layout(BN, BK, num_warps)
        acc_l: gl.constexpr = _rs_acc_layout(BN, BM, num_warps)
        a_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_l, k_width=2)
        bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(bars.index(i), count=1)
        rn, srow, tp, zz = _dq_rows(s_ptr, lut_ptr, off_n, N, G, XDT, MODE, LUT_ROW, ZC, BN, BK // 8, wl)
        for j in gl.static_range(STAGES - 2):
            if j < nch:
                _rs_issue(x_desc, w_desc, xs, ws, bars, j, c0, off_m, off_n, STAGES, BK)
        acc = gl.zeros([BN, BM], gl.float32, acc_l)
        odd = nch % 2
        if odd == 1:  # chunk 0 alone, retired before the pairs reuse any register
            acc = _rs_step(x_desc, w_desc, xs, ws, bars, acc, 0, c0, nch, off_m, off_n, srow, z_ptr, rn, G, zz,
                           tp, XDT, MODE, HAS_SCALE, HAS_ZERO, GS, STAGES, BN, BK, wl, a_l)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        for p in range(nch // 2):
            c = odd + 2 * p
            acc = _rs_step(x_desc, w_desc, xs, ws, bars, acc, c, c0, nch, off_m, off_n, srow, z_ptr, rn, G, zz,
                           tp, XDT, MODE, HAS_SCALE, HAS_ZERO, GS, STAGES, BN, BK, wl, a_l)
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))  # retires chunk c - 1 (the other set)
            acc = _rs_step(x_desc, w_desc, xs, ws, bars, acc, c + 1, c0, nch, off_m, off_n, srow, z_ptr, rn, G,
                           zz, tp, XDT, MODE, HAS_SCALE, HAS_ZERO, GS, STAGES, BN, BK, wl, a_l)
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))  # retires chunk c
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(bars.index(i))
        return acc

    @gluon.jit
    def _rs_mma(xs, ws, ready, empty, s_ptr, z_ptr, lut_ptr, off_n, N, G, c0, nch,
                XDT: gl.constexpr, MODE: gl.constexpr, LUT_ROW: gl.constexpr, HAS_SCALE: gl.constexpr,
                HAS_ZERO: gl.constexpr, ZC: gl.constexpr, GS: gl.constexpr, STAGES: gl.constexpr,
                BN: gl.constexpr, BM: gl.constexpr, BK: gl.constexpr):
        """The warp-specialized consumer: dequantize + wgmma; frees chunk c - 1's slot once its wgmma retired
        (the partition's arrive follows a barrier of its warps: every warpgroup has passed the wait).
        Unrolled by two like ``_rs_loop``: chunk c + 1 is dequantized while wgmma c still reads its A
        registers, so consecutive chunks use different registers."""
        num_warps: gl.constexpr = gl.num_warps()
        wl: gl.constexpr = _rs_words_layout(BN, BK, num_warps)
        acc_l: gl.constexpr = _rs_acc_layout(BN, BM, num_warps)
        a_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_l, k_width=2)
        gl.assume(nch > 0)
        rn, srow, tp, zz = _dq_rows(s_ptr, lut_ptr, off_n, N, G, XDT, MODE, LUT_ROW, ZC, BN, BK // 8, wl)
        acc = gl.zeros([BN, BM], gl.float32, acc_l)
        odd = nch % 2
        if odd == 1:  # chunk 0 alone, retired before the pairs reuse any register (its slot: freed by chunk 1)
            a, slot = _rs_chunk(xs, ws, 0, c0, srow, z_ptr, rn, G, zz, tp, XDT, MODE, HAS_SCALE, HAS_ZERO, GS,
                                STAGES, BN, BK, wl, a_l, ready)
            acc = warpgroup_mma(a, xs.index(slot).permute((1, 0)), acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        for p in range(nch // 2):
            c = odd + 2 * p
            a, slot = _rs_chunk(xs, ws, c, c0, srow, z_ptr, rn, G, zz, tp, XDT, MODE, HAS_SCALE, HAS_ZERO, GS,
                                STAGES, BN, BK, wl, a_l, ready)
            acc = warpgroup_mma(a, xs.index(slot).permute((1, 0)), acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
            mbarrier.arrive(empty.index((c + STAGES - 1) % STAGES), count=1, pred=c > 0)
            b, slot = _rs_chunk(xs, ws, c + 1, c0, srow, z_ptr, rn, G, zz, tp, XDT, MODE, HAS_SCALE, HAS_ZERO, GS,
                                STAGES, BN, BK, wl, a_l, ready)
            acc = warpgroup_mma(b, xs.index(slot).permute((1, 0)), acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
            mbarrier.arrive(empty.index(c % STAGES), count=1)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        return (acc,)  # a tuple: the partition's results are flattened

    @gluon.jit
    def w4a16_wgmma_rs(x_desc, w_desc, s_ptr, z_ptr, out_ptr, M, N, K, G, lut_ptr, ws_ptr, cnt_ptr, cps, SPLIT,
                       MODE: gl.constexpr, LUT_ROW: gl.constexpr,
                       HAS_SCALE: gl.constexpr, HAS_ZERO: gl.constexpr, ZC: gl.constexpr, GS: gl.constexpr,
                       STAGES: gl.constexpr, GROUP_M: gl.constexpr, EPI: gl.constexpr, SPLITK: gl.constexpr,
                       WS: gl.constexpr = False):
        """outᵀ tile [BN, BM] = W[off_n:, :] · x[off_m:, :]ᵀ; w_desc reads the rs words. Split-K
        (SPLITK, grid axis 1 = SPLIT ranges of cps chunks): fp32 partials in ws_ptr, the last program of
        a tile (counter cnt_ptr[tile]) sums them in a fixed order (the scheme of w4a16_wgmma_ws). WS: a
        1-warp TMA loader partition (``_wgmma._ws_load``: ready / empty mbarriers per slot, the ring's
        depth is the prefetch distance) beside the kernel's warps, which dequantize and issue the wgmma
        (``_rs_mma``); else one partition (``_rs_loop``)."""
        XDT: gl.constexpr = x_desc.dtype
        BM: gl.constexpr = x_desc.block_type.shape[0]
        BK: gl.constexpr = x_desc.block_type.shape[1]
        BN: gl.constexpr = w_desc.block_type.shape[0]
        BW: gl.constexpr = BK // 8
        num_warps: gl.constexpr = gl.num_warps()
        pid, off_m, off_n = _tile(M, N, BM, BN, GROUP_M)

        xs = gl.allocate_shared_memory(XDT, [STAGES, BM, BK], x_desc.layout)
        ws = gl.allocate_shared_memory(gl.int32, [STAGES, BN, BW], w_desc.layout)
        acc_l: gl.constexpr = _rs_acc_layout(BN, BM, num_warps)
        nch = K // BK
        c0 = 0
        if SPLITK:
            c0 = gl.program_id(1) * cps
            nch = gl.minimum(nch - c0, cps)
        gl.assume(nch > 0)  # (every split range is non-empty) no zero-chunk path: ptxas would serialize the wgmmas
        if WS:
            ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
            empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
            for i in gl.static_range(STAGES):
                mbarrier.init(ready.index(i), count=1)
                mbarrier.init(empty.index(i), count=1)
            res = gl.warp_specialize([
                (_rs_mma, (xs, ws, ready, empty, s_ptr, z_ptr, lut_ptr, off_n, N, G, c0, nch, XDT, MODE, LUT_ROW,
                           HAS_SCALE, HAS_ZERO, ZC, GS, STAGES, BN, BM, BK)),
                (_ws_load, (x_desc, w_desc, xs, ws, ready, empty, off_m, off_n, c0, nch, STAGES, BK)),
            ], [1], [24])
            acc = res[0]
        else:
            acc = _rs_loop(x_desc, w_desc, xs, ws, s_ptr, z_ptr, lut_ptr, off_m, off_n, N, G, c0, nch, XDT, MODE,
                           LUT_ROW, HAS_SCALE, HAS_ZERO, ZC, GS, STAGES, BN, BM, BK)
        if SPLITK:  # the scheme of w4a16_wgmma_ws, on the transposed tile [BN, BM]
            last, base, loc = _splitk_put(acc, ws_ptr, cnt_ptr, pid, SPLIT, BN, BM, acc_l)
            if last:
                _rs_store(_splitk_sum(base, loc, SPLIT, BN, BM, acc_l), out_ptr, off_m, off_n, M, N, BM, BN, EPI,
                          acc_l, num_warps)
                gl.atomic_xchg(cnt_ptr + pid, 0)
        else:
            _rs_store(acc, out_ptr, off_m, off_n, M, N, BM, BN, EPI, acc_l, num_warps)
