"""MoE pair alignment in one launch: the device-side sort and padding of :func:`moe_w4a16.align` as a single
Triton program (as vLLM's ``moe_align_block_size`` is one CUDA kernel), for the eager decode path.

The torch form of the same step is ~20 small ops, each 10-20 µs of host time when run eagerly (the whole
fused MoE layer measured ~600-700 µs eager against 97-250 µs in a CUDA graph on an H100). This kernel
computes the same three outputs, element for element:

* the expert id of each of the P = T*k pairs (ids outside [0, E) count as "no expert"),
* per-expert counts (``tl.histogram``), padded to BM and prefix-summed (``tl.cumsum``),
* a stable sort of the pairs by expert (``tl.sort`` of ``expert * BLOCK_P + pair``), each pair's slot =
  its expert's padded start + its rank among that expert's pairs,
* each BM-row block's expert (the number of padded run ends at or before the block's first row, clamped to
  E - 1) and the padded total.

One program; P ≤ 4096 and E ≤ 1023 (the fused path's MAX_TOKENS × top-k stays well inside). Own code.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import Launcher, cdiv

MAX_PAIRS = 4096
MAX_EXPERTS = 1023


@triton.jit(do_not_specialize=["P", "E", "cap", "nblocks"])
def moe_align_kernel(idx_ptr, sorted_ptr, bexp_ptr, npad_ptr, scratch_ptr, P, E, cap, nblocks,
                     BM: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_C: tl.constexpr,
                     BLOCK_B: tl.constexpr):
    offs = tl.arange(0, BLOCK_P)
    pm = offs < P
    key = tl.load(idx_ptr + offs, mask=pm, other=-1).to(tl.int32)
    key = tl.where(pm & (key >= 0) & (key < E), key, E)  # E: no expert (and the lanes past P)
    eoffs = tl.arange(0, BLOCK_E)
    counts = tl.histogram(key, BLOCK_E)  # key <= E < BLOCK_E
    counts = tl.where(eoffs < E, counts, 0)
    padded = (counts + (BM - 1)) // BM * BM
    ends = tl.cumsum(padded, 0)
    starts = ends - padded
    cstart = tl.cumsum(counts, 0) - counts
    tl.store(scratch_ptr + eoffs, starts - cstart)  # slot of a pair = (start - cstart)[expert] + sorted pos
    fill = tl.zeros([BLOCK_C], dtype=tl.int32) + P
    for c in range(0, cap, BLOCK_C):
        co = c + tl.arange(0, BLOCK_C)
        tl.store(sorted_ptr + co, fill, mask=co < cap)
    for b in range(0, nblocks, BLOCK_B):
        bo = b + tl.arange(0, BLOCK_B)
        hit = (ends[None, :] <= (bo * BM)[:, None]) & (eoffs[None, :] < E)
        be = tl.minimum(tl.sum(hit.to(tl.int32), 1), E - 1)
        tl.store(bexp_ptr + bo, be, mask=bo < nblocks)
    tl.store(npad_ptr, tl.sum(padded, 0))
    tl.debug_barrier()  # the fill and the scratch are written before the scatter below reads/overwrites
    comp = tl.sort(key * BLOCK_P + offs)  # stable by construction: the pair index breaks ties
    skey = comp // BLOCK_P
    order = comp % BLOCK_P
    ok = skey < E
    shift = tl.load(scratch_ptr + skey, mask=ok, other=0)
    tl.store(sorted_ptr + shift + offs, order, mask=ok)


_LAUNCHERS: dict = {}


def supported(P: int, E: int) -> bool:
    return 0 < P <= MAX_PAIRS and 0 < E <= MAX_EXPERTS


def align_kernel(top_k_index: torch.Tensor, E: int, BM: int):
    """Same outputs as :func:`quantkit.kernels.moe_w4a16.align` (sorted_ids int32 [cap], block_expert int32
    [cap // BM], n_pad int32 [1]), from one kernel launch and one allocation."""
    flat = top_k_index.reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    P = flat.numel()
    if not supported(P, E):
        raise ValueError(f"moe_align: {P} pairs / {E} experts outside the kernel's range "
                         f"(1..{MAX_PAIRS} / 1..{MAX_EXPERTS})")
    cap = cdiv(P + min(E, P) * (BM - 1), BM) * BM
    nb = cap // BM
    BLOCK_P = max(16, triton.next_power_of_2(P))
    BLOCK_E = max(16, triton.next_power_of_2(E + 1))
    buf = torch.empty(cap + nb + 1 + BLOCK_E, dtype=torch.int32, device=flat.device)
    sorted_ids, block_expert = buf[:cap], buf[cap:cap + nb]
    n_pad, scratch = buf[cap + nb:cap + nb + 1], buf[cap + nb + 1:]
    key = (BM, BLOCK_P, BLOCK_E, flat.dtype, flat.device)
    lau = _LAUNCHERS.get(key)
    if lau is None:
        warps = 4 if BLOCK_P <= 1024 else 8
        lau = _LAUNCHERS[key] = Launcher(moe_align_kernel, dict(BM=BM, BLOCK_P=BLOCK_P, BLOCK_E=BLOCK_E,
                                                                BLOCK_C=256, BLOCK_B=32),
                                         num_warps=warps, num_stages=1, device=flat.device)
    lau((1, 1, 1), flat, sorted_ids, block_expert, n_pad, scratch, P, E, cap, nb)
    return sorted_ids, block_expert, n_pad
