"""Hopper (sm_90) large-M W4A16 GEMM in Gluon: TMA loads, the dequantized weight tile staged in shared
memory, asynchronous wgmma whose work overlaps the next chunk's dequantization (path ``wg``).

Why a Gluon kernel: the Triton ``gemm`` path (w4a16_jit.py) lets the compiler place the dequantized
tile; it stores it to shared memory and then waits for each wgmma before the buffer may be rewritten,
so the dequantization never overlaps the tensor cores (docs/PERFORMANCE.md measured it at 0.55-0.69x
cuBLAS). Here the buffers and waits are explicit:

  per chunk c of BK columns (program = one [BM, BN] output tile, chunks c = 0 .. K/BK - 1):
    1. wait for chunk c's x tile [BM, BK] and packed words [BN, BK/8] (TMA, STAGES-slot ring, one
       mbarrier per slot; issued STAGES-2 chunks ahead);
    2. dequantize the words with their group scale, ``(q - z) * s`` in the x dtype (the inline PTX of
       ``_ptx``: packed magic-number pairs, one packed FMA for the scale), store the [BN, BK] tile to
       shared buffer c % 3;
    3. fence + barrier, issue the TMA load of chunk c + STAGES - 2 into the slot chunk c - 2 used;
    4. issue wgmma(x tile, dequantized tileᵀ) asynchronously and wait until at most one is in flight:
       the tensor cores run chunk c while the threads dequantize chunk c + 1.
  Three dequant buffers and the prefetch distance STAGES - 2 make every reuse safe with one barrier
  per chunk: when a warp passes chunk c's barrier, every warpgroup has retired wgmma c - 2.

``w4a16_wgmma_ws`` (config key ``ws``) is the same GEMM warp-specialized: a loader warp, a dequantizing
warpgroup and the MMA warps hand chunks over by mbarriers, with optional split-K (docs/PERFORMANCE.md,
"Round five").

Requirements (else the caller keeps another path): compiled CUDA on compute capability 9.x, Triton
with Gluon (3.5+), x in bf16/fp16 and contiguous, K % BK == 0, the group size a multiple of BK (or
no groups), 4-bit int codes on the checkpoint layout (int32 words [N, K/8]).

Own code. Ideas from Machete / CUTLASS mixed-input GEMMs and Marlin (Apache-2.0): dequantize just
before the MMA, overlap it with asynchronous MMAs; nothing copied.
"""

from __future__ import annotations

try:  # Gluon: Triton >= 3.5
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    # the TMA load was renamed between Triton 3.6 (the GPU machine's) and 3.9 (CPU CI's)
    _tma_load = tma.async_load if hasattr(tma, "async_load") else tma.async_copy_global_to_shared
    _cta_barrier = gl.barrier if hasattr(gl, "barrier") else gl.thread_barrier
    HAVE_GLUON = True
except Exception:  # noqa: BLE001 - an older Triton: the path is simply not offered
    HAVE_GLUON = False

from ._ptx import _ASM_INT_BF16_S, _ASM_INT_FP16_S, _ASM_LUT_BF16_S, _ASM_LUT_FP16_S, _OUT8

_CONS = _OUT8 + "r,r,r"
_CONS_L = _OUT8 + "r," * 9 + "r"

if HAVE_GLUON:
    _ASM_BF16 = gl.constexpr(_ASM_INT_BF16_S)
    _ASM_FP16 = gl.constexpr(_ASM_INT_FP16_S)
    _CONS_C = gl.constexpr(_CONS)
    _ASM_LBF16 = gl.constexpr(_ASM_LUT_BF16_S)
    _ASM_LFP16 = gl.constexpr(_ASM_LUT_FP16_S)
    _CONS_LC = gl.constexpr(_CONS_L)

    @gluon.jit
    def _pair(v, XDT: gl.constexpr):
        """fp32 v -> the value in XDT twice, as int32 bits (a packed pair)."""
        b = v.to(XDT).to(gl.int16, bitcast=True).to(gl.int32) & 0xFFFF
        return b | (b << 16)

    @gluon.jit
    def _deq(w, zz, ss, tp, XDT: gl.constexpr, MODE: gl.constexpr):
        """Words w [BN, BW] (int32) -> [BN, 8*BW] values of XDT in column order: (q - z) * s (MODE 0, int)
        or table[q] * s (MODE 1: tp = the rows' 8 table-plane words, ``_ptx.lut_planes``)."""
        if MODE == 0:
            if XDT == gl.bfloat16:
                d0, d1, d2, d3, d4, d5, d6, d7 = gl.inline_asm_elementwise(
                    _ASM_BF16, _CONS_C, [w, zz, ss], dtype=(gl.bfloat16,) * 8, is_pure=True, pack=1)
            else:
                d0, d1, d2, d3, d4, d5, d6, d7 = gl.inline_asm_elementwise(
                    _ASM_FP16, _CONS_C, [w, zz, ss], dtype=(gl.float16,) * 8, is_pure=True, pack=1)
        else:
            args = [w, tp[0], tp[1], tp[2], tp[3], tp[4], tp[5], tp[6], tp[7], ss]
            if XDT == gl.bfloat16:
                d0, d1, d2, d3, d4, d5, d6, d7 = gl.inline_asm_elementwise(
                    _ASM_LBF16, _CONS_LC, args, dtype=(gl.bfloat16,) * 8, is_pure=True, pack=1)
            else:
                d0, d1, d2, d3, d4, d5, d6, d7 = gl.inline_asm_elementwise(
                    _ASM_LFP16, _CONS_LC, args, dtype=(gl.float16,) * 8, is_pure=True, pack=1)
        # join puts its new axis last: t[n, w, i, k, m] is the i-th of the innermost pair, so the flat
        # column 8w + 4i + 2k + m must hold nibble 4i + 2k + m (the interleave order of _tl._cols8)
        a = gl.join(gl.join(d0, d4), gl.join(d2, d6))
        b = gl.join(gl.join(d1, d5), gl.join(d3, d7))
        t = gl.join(a, b)
        BN: gl.constexpr = w.shape[0]
        BW: gl.constexpr = w.shape[1]
        return gl.reshape(t, [BN, 8 * BW])

    @gluon.jit
    def _issue(x_desc, w_desc, xs, ws, bars, c, off_m, off_n, STAGES: gl.constexpr, BK: gl.constexpr):
        slot = c % STAGES
        bar = bars.index(slot)
        mbarrier.expect(bar, x_desc.block_type.nbytes + w_desc.block_type.nbytes)
        _tma_load(x_desc, [off_m, c * BK], bar, xs.index(slot))
        _tma_load(w_desc, [off_n, c * (BK // 8)], bar, ws.index(slot))

    @gluon.constexpr_function
    def _words_layout(BK, num_warps):
        """The packed words' register layout: 4 consecutive words (16 bytes) per thread, one vector load,
        32 weights in column order; rows over the warps."""
        BW = BK // 8
        VW = 4 if BW >= 4 else BW
        return gl.BlockedLayout([1, VW], [32 // (BW // VW), BW // VW], [num_warps, 1], [1, 0])

    @gluon.constexpr_function
    def _acc_layout(BM, BN, num_warps):
        """The wgmma accumulator's layout: warps along M 16 rows each (at least a warpgroup's 4)."""
        WM = max(4, min(num_warps, BM // 16))
        return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WM, num_warps // WM],
                                         instr_shape=[16, BN // (num_warps // WM), 16])

    @gluon.jit
    def _tile(M, N, BM: gl.constexpr, BN: gl.constexpr, GROUP_M: gl.constexpr):
        """(program id, off_m, off_n) in grouped tile order: GROUP_M row tiles share the weight tiles in L2."""
        pid = gl.program_id(0)
        tiles_m = gl.cdiv(M, BM)
        tiles_n = gl.cdiv(N, BN)
        per_group = GROUP_M * tiles_n
        first_m = (pid // per_group) * GROUP_M
        gm = gl.minimum(tiles_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % gm
        pid_n = (pid % per_group) // gm
        return pid, pid_m * BM, pid_n * BN

    @gluon.jit
    def _dq_rows(s_ptr, lut_ptr, off_n, N, G, XDT: gl.constexpr, MODE: gl.constexpr, LUT_ROW: gl.constexpr,
                 ZC: gl.constexpr, BN: gl.constexpr, BW: gl.constexpr, wl: gl.constexpr):
        """What the dequantization of a tile's rows needs for the whole loop: the rows (clamped to N), their
        scale row pointers, their table planes (MODE 1, in registers) and the fixed zero as a packed pair."""
        rn = off_n + gl.arange(0, BN, layout=gl.SliceLayout(1, wl))
        rn = gl.minimum(rn, N - 1)
        srow = s_ptr + rn.to(gl.int64) * G
        tp = (0, 0, 0, 0, 0, 0, 0, 0)
        if MODE == 1:  # the rows' table planes, in registers for the whole loop
            if LUT_ROW:
                lrow = lut_ptr + rn.to(gl.int64) * 8
            else:
                lrow = lut_ptr + rn * 0
            wz = gl.full([BN, BW], 0, gl.int32, wl)
            tp = (gl.expand_dims(gl.load(lrow), 1) + wz, gl.expand_dims(gl.load(lrow + 1), 1) + wz,
                  gl.expand_dims(gl.load(lrow + 2), 1) + wz, gl.expand_dims(gl.load(lrow + 3), 1) + wz,
                  gl.expand_dims(gl.load(lrow + 4), 1) + wz, gl.expand_dims(gl.load(lrow + 5), 1) + wz,
                  gl.expand_dims(gl.load(lrow + 6), 1) + wz, gl.expand_dims(gl.load(lrow + 7), 1) + wz)
        zz = _pair(gl.full([BN, 1], -(ZC + 128.0), gl.float32, wl), XDT)
        if XDT == gl.float16:
            zz = _pair(gl.full([BN, 1], -(ZC + 1024.0), gl.float32, wl), XDT)
        return rn, srow, tp, zz

    @gluon.jit
    def _dq_group(srow, z_ptr, rn, G, g, zz, XDT: gl.constexpr, HAS_SCALE: gl.constexpr,
                  HAS_ZERO: gl.constexpr, BN: gl.constexpr, wl: gl.constexpr):
        """Group g's scale and zero of the rows, as packed pairs of XDT."""
        if HAS_SCALE:
            ss = _pair(gl.load(srow + g).to(gl.float32), XDT)
        else:
            ss = _pair(gl.full([BN], 1.0, gl.float32, gl.SliceLayout(1, wl)), XDT)
        zc = zz
        if HAS_ZERO:
            zv = gl.load(z_ptr + rn.to(gl.int64) * G + g).to(gl.float32)
            if XDT == gl.bfloat16:
                zc = _pair(gl.expand_dims(-(zv + 128.0), 1), XDT)
            else:
                zc = _pair(gl.expand_dims(-(zv + 1024.0), 1), XDT)
        return ss, zc

    @gluon.jit
    def _splitk_put(acc, ws_ptr, cnt_ptr, pid, SPLIT, R: gl.constexpr, C: gl.constexpr, acc_l: gl.constexpr):
        """Split-K, every program of tile ``pid``: its fp32 partial acc [R, C] into the workspace (slot
        program_id(1)), then the tile's counter. Returns (whether it is the tile's last program, the
        partials' base, their offsets): the last one sums them (``_splitk_sum``) and resets the counter."""
        loc = gl.expand_dims(gl.arange(0, R, layout=gl.SliceLayout(1, acc_l)) * C, 1) + \
            gl.expand_dims(gl.arange(0, C, layout=gl.SliceLayout(0, acc_l)), 0)
        base = ws_ptr + pid.to(gl.int64) * SPLIT * (R * C)
        gl.store(base + gl.program_id(1) * (R * C) + loc, acc)
        _cta_barrier()
        old = gl.atomic_add(cnt_ptr + pid, 1, sem="acq_rel")
        return old == SPLIT - 1, base, loc

    @gluon.jit
    def _splitk_sum(base, loc, SPLIT, R: gl.constexpr, C: gl.constexpr, acc_l: gl.constexpr):
        """The tile's SPLIT partials summed in a fixed order (deterministic)."""
        tot = gl.zeros([R, C], gl.float32, acc_l)
        for sp in range(SPLIT):
            tot += gl.load(base + sp * (R * C) + loc, cache_modifier=".cg")
        return tot

    @gluon.jit
    def _out_ptrs(out_ptr, off_m, off_n, M, N, BM: gl.constexpr, BN: gl.constexpr, acc_l: gl.constexpr):
        """The output tile's pointers and in-bounds mask in the accumulator's layout."""
        om = off_m + gl.arange(0, BM, layout=gl.SliceLayout(1, acc_l))
        on = off_n + gl.arange(0, BN, layout=gl.SliceLayout(0, acc_l))
        optr = out_ptr + gl.expand_dims(om.to(gl.int64) * N, 1) + gl.expand_dims(on, 0)
        mask = gl.expand_dims(om < M, 1) & gl.expand_dims(on < N, 0)
        return optr, mask

    @gluon.jit
    def w4a16_wgmma(x_desc, w_desc, s_ptr, z_ptr, out_ptr, M, N, K, G, lut_ptr,
                    MODE: gl.constexpr, LUT_ROW: gl.constexpr,
                    HAS_SCALE: gl.constexpr, HAS_ZERO: gl.constexpr, ZC: gl.constexpr, GS: gl.constexpr,
                    STAGES: gl.constexpr, GROUP_M: gl.constexpr):
        XDT: gl.constexpr = x_desc.dtype
        BM: gl.constexpr = x_desc.block_type.shape[0]
        BK: gl.constexpr = x_desc.block_type.shape[1]
        BN: gl.constexpr = w_desc.block_type.shape[0]
        BW: gl.constexpr = BK // 8
        num_warps: gl.constexpr = gl.num_warps()  # the launch option
        _pid, off_m, off_n = _tile(M, N, BM, BN, GROUP_M)

        xs = gl.allocate_shared_memory(XDT, [STAGES, BM, BK], x_desc.layout)
        ws = gl.allocate_shared_memory(gl.int32, [STAGES, BN, BW], w_desc.layout)
        b_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BN, BK], XDT)
        bs = gl.allocate_shared_memory(XDT, [3, BN, BK], b_layout)
        bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(bars.index(i), count=1)

        wl: gl.constexpr = _words_layout(BK, num_warps)
        acc_l: gl.constexpr = _acc_layout(BM, BN, num_warps)
        rn, srow, tp, zz = _dq_rows(s_ptr, lut_ptr, off_n, N, G, XDT, MODE, LUT_ROW, ZC, BN, BW, wl)
        nch = K // BK
        for c in gl.static_range(STAGES - 2):
            if c < nch:
                _issue(x_desc, w_desc, xs, ws, bars, c, off_m, off_n, STAGES, BK)

        acc = gl.zeros([BM, BN], gl.float32, acc_l)
        for c in range(nch):
            slot = c % STAGES
            mbarrier.wait(bars.index(slot), (c // STAGES) & 1)
            w = ws.index(slot).load(wl)
            ss, zc = _dq_group(srow, z_ptr, rn, G, (c * BK) // GS, zz, XDT, HAS_SCALE, HAS_ZERO, BN, wl)
            sb, _ = gl.broadcast(gl.expand_dims(ss, 1), w)
            zb, _ = gl.broadcast(zc, w)
            d = _deq(w, zb, sb, tp, XDT, MODE)
            buf = bs.index(c % 3)
            buf.store(d)
            fence_async_shared()
            _cta_barrier()
            if c + STAGES - 2 < nch:
                _issue(x_desc, w_desc, xs, ws, bars, c + STAGES - 2, off_m, off_n, STAGES, BK)
            acc = warpgroup_mma(xs.index(slot), buf.permute((1, 0)), acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(bars.index(i))

        optr, mask = _out_ptrs(out_ptr, off_m, off_n, M, N, BM, BN, acc_l)
        gl.store(optr, acc.to(XDT), mask=mask)


if HAVE_GLUON:
    # ---- warp-specialized variant (config key ``ws``) -------------------------------------------
    # Three partitions share the CTA: a 1-warp loader issues the TMA loads of x and the packed words
    # into a STAGES-slot ring; a 4-warp dequantizer turns each chunk's words into the [BN, BK] tile of
    # x's dtype in one of NB shared buffers; the default partition (the kernel's num_warps, whole
    # warpgroups) only issues wgmma and frees the slot and buffer of the chunk whose MMA retired. The
    # dequantization no longer stalls the tensor cores' issue, and no CTA-wide barrier is left in
    # the loop: each hand-over is an mbarrier (ready / empty per ring slot, b_ready / b_empty per
    # buffer).

    @gluon.jit
    def _ws_load(x_desc, w_desc, xs, ws, ready, empty, off_m, off_n, c0, nch,
                 STAGES: gl.constexpr, BK: gl.constexpr):
        for c in range(nch):  # this program's chunks c0 .. c0 + nch - 1 (split-K: a range of K)
            slot = c % STAGES
            # a fresh mbarrier counts as having completed the phase before 0: the first round passes
            mbarrier.wait(empty.index(slot), ((c // STAGES) & 1) ^ 1)
            bar = ready.index(slot)
            mbarrier.expect(bar, x_desc.block_type.nbytes + w_desc.block_type.nbytes)
            _tma_load(x_desc, [off_m, (c0 + c) * BK], bar, xs.index(slot))
            _tma_load(w_desc, [off_n, (c0 + c) * (BK // 8)], bar, ws.index(slot))

    @gluon.jit
    def _ws_deq(ws, bs, ready, b_ready, b_empty, s_ptr, z_ptr, lut_ptr, off_n, N, G, c0, nch,
                XDT: gl.constexpr, MODE: gl.constexpr, LUT_ROW: gl.constexpr, HAS_SCALE: gl.constexpr,
                HAS_ZERO: gl.constexpr, ZC: gl.constexpr, GS: gl.constexpr, STAGES: gl.constexpr,
                NB: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr):
        BW: gl.constexpr = BK // 8
        wl: gl.constexpr = _words_layout(BK, gl.num_warps())  # this partition's warps
        rn, srow, tp, zz = _dq_rows(s_ptr, lut_ptr, off_n, N, G, XDT, MODE, LUT_ROW, ZC, BN, BW, wl)
        for c in range(nch):
            slot = c % STAGES
            # the group's scale and zero: their global loads go out before the wait
            ss, zc = _dq_group(srow, z_ptr, rn, G, ((c0 + c) * BK) // GS, zz, XDT, HAS_SCALE, HAS_ZERO, BN, wl)
            mbarrier.wait(ready.index(slot), (c // STAGES) & 1)
            w = ws.index(slot).load(wl)
            sb, _ = gl.broadcast(gl.expand_dims(ss, 1), w)
            zb, _ = gl.broadcast(zc, w)
            d = _deq(w, zb, sb, tp, XDT, MODE)
            b = c % NB
            mbarrier.wait(b_empty.index(b), ((c // NB) & 1) ^ 1)
            bs.index(b).store(d)
            fence_async_shared()  # generic-proxy writes (and the words' read) before the async proxy
            _cta_barrier()  # every warp of this partition has stored its part
            mbarrier.arrive(b_ready.index(b), count=1)

    @gluon.jit
    def _ws_mma(xs, bs, ready, b_ready, b_empty, empty, nch, BM: gl.constexpr, BN: gl.constexpr,
                STAGES: gl.constexpr, NB: gl.constexpr, acc_l: gl.constexpr):
        acc = gl.zeros([BM, BN], gl.float32, acc_l)
        for c in range(nch):
            b = c % NB
            # x's TMA completion observed here too (it has been by the dequantizer, whose tile we wait for;
            # the slot cannot move to its next phase before this partition frees it)
            mbarrier.wait(ready.index(c % STAGES), (c // STAGES) & 1)
            mbarrier.wait(b_ready.index(b), (c // NB) & 1)
            acc = warpgroup_mma(xs.index(c % STAGES), bs.index(b).permute((1, 0)), acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
            # chunk c - 1's wgmma has retired: its ring slot and its tile buffer are free
            mbarrier.arrive(empty.index((c + STAGES - 1) % STAGES), count=1, pred=c > 0)
            mbarrier.arrive(b_empty.index((c + NB - 1) % NB), count=1, pred=c > 0)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        return (acc,)  # a tuple: the partition's results are flattened

    @gluon.jit
    def w4a16_wgmma_ws(x_desc, w_desc, s_ptr, z_ptr, out_ptr, M, N, K, G, lut_ptr, ws_ptr, cnt_ptr, cps, SPLIT,
                       MODE: gl.constexpr, LUT_ROW: gl.constexpr,
                       HAS_SCALE: gl.constexpr, HAS_ZERO: gl.constexpr, ZC: gl.constexpr, GS: gl.constexpr,
                       STAGES: gl.constexpr, GROUP_M: gl.constexpr, NB: gl.constexpr, DQ_REGS: gl.constexpr,
                       SPLITK: gl.constexpr):
        """Split-K (SPLITK, grid axis 1 = SPLIT ranges of cps chunks): each program writes its fp32
        partial tile to ws_ptr; the last of a tile (counter cnt_ptr[tile]) sums them in a fixed order,
        writes the output and resets the counter (the workspace scheme of _tl._finish)."""
        XDT: gl.constexpr = x_desc.dtype
        BM: gl.constexpr = x_desc.block_type.shape[0]
        BK: gl.constexpr = x_desc.block_type.shape[1]
        BN: gl.constexpr = w_desc.block_type.shape[0]
        BW: gl.constexpr = BK // 8
        num_warps: gl.constexpr = gl.num_warps()
        pid, off_m, off_n = _tile(M, N, BM, BN, GROUP_M)

        xs = gl.allocate_shared_memory(XDT, [STAGES, BM, BK], x_desc.layout)
        ws = gl.allocate_shared_memory(gl.int32, [STAGES, BN, BW], w_desc.layout)
        b_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BN, BK], XDT)
        bs = gl.allocate_shared_memory(XDT, [NB, BN, BK], b_layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        b_ready = gl.allocate_shared_memory(gl.int64, [NB, 1], mbarrier.MBarrierLayout())
        b_empty = gl.allocate_shared_memory(gl.int64, [NB, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=1)
        for i in gl.static_range(NB):
            mbarrier.init(b_ready.index(i), count=1)
            mbarrier.init(b_empty.index(i), count=1)

        acc_l: gl.constexpr = _acc_layout(BM, BN, num_warps)
        nall = K // BK
        c0 = 0
        nch = nall
        if SPLITK:
            c0 = gl.program_id(1) * cps
            nch = gl.minimum(nall - c0, cps)
        res = gl.warp_specialize([
            (_ws_mma, (xs, bs, ready, b_ready, b_empty, empty, nch, BM, BN, STAGES, NB, acc_l)),
            (_ws_load, (x_desc, w_desc, xs, ws, ready, empty, off_m, off_n, c0, nch, STAGES, BK)),
            (_ws_deq, (ws, bs, ready, b_ready, b_empty, s_ptr, z_ptr, lut_ptr, off_n, N, G, c0, nch, XDT, MODE,
                       LUT_ROW, HAS_SCALE, HAS_ZERO, ZC, GS, STAGES, NB, BN, BK)),
        ], [1, 4], [24, DQ_REGS])
        acc = res[0]

        optr, mask = _out_ptrs(out_ptr, off_m, off_n, M, N, BM, BN, acc_l)
        if SPLITK:
            last, base, loc = _splitk_put(acc, ws_ptr, cnt_ptr, pid, SPLIT, BM, BN, acc_l)
            if last:
                gl.store(optr, _splitk_sum(base, loc, SPLIT, BM, BN, acc_l).to(XDT), mask=mask)
                gl.atomic_xchg(cnt_ptr + pid, 0)
        else:
            gl.store(optr, acc.to(XDT), mask=mask)


def x_layout(BM: int, BK: int, dtype):
    """The shared-memory layout of an x tile (TMA destination, wgmma A operand)."""
    import torch

    return gl.NVMMASharedLayout.get_default_for([BM, BK], gl.bfloat16 if dtype == torch.bfloat16 else gl.float16)


def w_descriptor(w, BN: int, BK: int):
    """The TMA descriptor of the words w [N, K/8] (int32): [BN, BK/8] boxes."""
    return TensorDescriptor.from_tensor(w, [BN, BK // 8], gl.NVMMASharedLayout.get_default_for([BN, BK // 8], gl.int32))
