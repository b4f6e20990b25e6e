"""Triton device helpers shared by the kernel files (w4a16_jit, w4a16_repacked, fp8)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _tile_mn(pid, M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """Output tile (pid_m, pid_n) of program ``pid``; with GROUP_M > 1 in grouped order (programs
    that share tiles of x or of the weights run together, for L2 reuse)."""
    n_m = tl.cdiv(M, BM)
    n_n = tl.cdiv(N, BN)
    if GROUP_M > 1:
        width = GROUP_M * n_n
        gid = pid // width
        first = gid * GROUP_M
        gsz = tl.minimum(n_m - first, GROUP_M)
        pid_m = first + (pid % width) % gsz
        pid_n = (pid % width) // gsz
    else:
        pid_m = pid // n_n
        pid_n = pid % n_n
    return pid_m, pid_n


@triton.jit
def _finish(acc, out_ptr, ws_ptr, cnt_ptr, offs_m, offs_n, M, N, tile, pid_k, SPLIT,
            BM: tl.constexpr, BN: tl.constexpr, SPLITK: tl.constexpr):
    """Write [BM, BN] (split-K: partials to the workspace; the last program of the tile sums them
    in a fixed order and writes the output)."""
    omask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    optr = out_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    if SPLITK:
        loc = tl.arange(0, BM)[:, None] * BN + tl.arange(0, BN)[None, :]
        base = ws_ptr + tile * SPLIT * (BM * BN)
        tl.store(base + pid_k * (BM * BN) + loc, acc)
        tl.debug_barrier()
        old = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
        if old == SPLIT - 1:
            tot = tl.zeros([BM, BN], dtype=tl.float32)
            for sp in range(SPLIT):  # fixed order: deterministic
                tot += tl.load(base + sp * (BM * BN) + loc, cache_modifier=".cg")
            tl.store(optr, tot.to(out_ptr.dtype.element_ty), mask=omask)
            tl.atomic_xchg(cnt_ptr + tile, 0)
    else:
        tl.store(optr, acc.to(out_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _cols8(d0, d1, d2, d3, d4, d5, d6, d7):
    """The 8 nibble tensors of a word tile ([BN, BKW] each, d_i holding column 8*kw + i) as one
    [BN, 8*BKW] tile in column order (interleaved in registers)."""
    a = tl.interleave(tl.interleave(d0, d4), tl.interleave(d2, d6))
    b = tl.interleave(tl.interleave(d1, d5), tl.interleave(d3, d7))
    return tl.interleave(a, b)
