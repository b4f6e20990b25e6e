"""Fused MoE W4A16: the experts of a layer as one grouped GEMM per matrix (issue 16, item 5).

The per-expert path (``quantkit.moe.Experts.forward_loop``) runs one W4A16 kernel call per matrix per
hit expert, with a host sync to learn which experts are hit. Here every expert's packed weights are
stacked on a leading E dimension in the layout of kernels/src/w4a16.py (``w [E, N, K/8]`` int32 words,
column 8j+i in nibble i of word j; ``scales``/``zeros`` [E, N, G]; ``lut`` [E, N or 1, 16] fp16) and
one launch computes every (token, expert) pair's product:

* :func:`align` sorts the T*k (token, slot) pairs by expert on the device and pads each expert's run to
  a multiple of BM (the idea of vLLM's ``moe_align_block_size``): ``sorted_ids`` [cap] (pair index,
  ``P = T*k`` in padding), ``block_expert`` [cap/BM] (the expert of each BM-row block) and ``n_pad`` [1]
  (the padded total). ``cap`` is a bound known on the host (P + min(E, P)*(BM-1), rounded to BM), so
  the grid never depends on the routing: no ``.item()``, no sync, CUDA-graph capturable.
* :func:`moe_w4a16` (the kernel): program (block b, column tile, K split) reads the BM pairs of block b,
  gathers their rows of x (row ``pair // X_DIV``: the token for gate_up, the pair for down), dequantizes
  the [BN, 8*BKW] weight tile of the block's expert (``_kdeq`` of the W4A16 kernels: int sym/asym
  groups, lut per-row or fixed table, with scales) and accumulates ``x @ W^T`` with ``tl.dot``; blocks
  past ``n_pad`` return at once. The output row is the pair (``[P, N]``); ``MUL_W`` multiplies the
  routing weight in. Split-K programs add fp32 partials with atomics into a zeroed buffer. ``SWAP``
  (default at BM = 16) computes W·xᵀ, the weight tile as the MMA's wide operand, as the dense kernels do.

:func:`fused_experts` runs a gated layer: gate_up (one launch, [P, 2I]), ``act(gate) * up`` in torch,
down (one launch, routing weights multiplied in), sum over the k slots. Own code; design after vLLM's
``fused_moe`` Triton kernel (Apache-2.0), nothing copied.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._launch import INTERPRET, Launcher, cdiv
from .moe_align import align_kernel
from .moe_align import supported as align_supported
from .w4a16_jit import _chunk_acc, _kdeq


@triton.jit(do_not_specialize=["P", "G"])
def moe_w4a16(x_ptr, w_ptr, s_ptr, z_ptr, lut_ptr, out_ptr, ids_ptr, bexp_ptr, npad_ptr, rw_ptr,
              P, N, K, KWS, G,
              X_DIV: tl.constexpr, MUL_W: tl.constexpr,
              MODE: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_ZERO: tl.constexpr, ZC: tl.constexpr,
              GS: tl.constexpr, LS: tl.constexpr, LUT_ROW: tl.constexpr, LUT_ROWS: tl.constexpr,
              BM: tl.constexpr, BN: tl.constexpr, BKW: tl.constexpr, SPLIT: tl.constexpr, SWAP: tl.constexpr,
              INTERP: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    n_pad = tl.load(npad_ptr)
    if pid_m * BM >= n_pad:
        return
    XDT = x_ptr.dtype.element_ty
    e = tl.load(bexp_ptr + pid_m).to(tl.int64)
    pairs = tl.load(ids_ptr + pid_m * BM + tl.arange(0, BM))
    valid = pairs < P
    rows = tl.where(valid, pairs // X_DIV, 0).to(tl.int64)
    offs_n = pid_n * BN + tl.arange(0, BN)
    rn = tl.minimum(offs_n, N - 1)
    # this expert's slices of the stacked tensors
    wb = w_ptr + e * N * KWS
    sb = s_ptr + e * N * G
    zb = z_ptr + e * N * G
    lb = lut_ptr + e * (LUT_ROWS * LS)
    kw = tl.arange(0, BKW)
    kk = tl.arange(0, 8 * BKW)
    nch = tl.cdiv(KWS, BKW)
    cps = tl.cdiv(nch, SPLIT)
    c0 = pid_k * cps
    c1 = tl.minimum(c0 + cps, nch)
    # chunks inside one group: the chunk's dot product times the rows' scale (int: q - z is exact in the
    # 16-bit dot dtype); else each weight dequantized with its own scale
    SA: tl.constexpr = HAS_SCALE and (GS % (8 * BKW) == 0)
    if SWAP:  # W·xᵀ: the weight tile is the MMA's wide side, the few token rows the narrow one
        acc = tl.zeros([BN, BM], dtype=tl.float32)
    else:
        acc = tl.zeros([BM, BN], dtype=tl.float32)
    wrow = wb + rn[:, None].to(tl.int64) * KWS
    xrow = x_ptr + rows[:, None] * K
    for c in range(c0, c1):
        kwc = c * BKW + kw
        wt = tl.load(wrow + kwc[None, :], mask=kwc[None, :] < KWS, other=0)
        wd = _kdeq(wt, rn, c, sb, zb, lb, G, MODE, HAS_SCALE and not SA, HAS_ZERO, ZC, GS, LS, LUT_ROW, BKW, False)
        kc = c * (8 * BKW) + kk
        xt = tl.load(xrow + kc[None, :], mask=valid[:, None] & (kc[None, :] < K), other=0.0)
        acc = _chunk_acc(acc, wd.to(XDT), xt, sb, rn, c, G, GS, BKW, SA, SWAP, BN, BM, INTERP)
    if SWAP:
        acc = tl.trans(acc)
    if MUL_W:
        rw = tl.load(rw_ptr + tl.where(valid, pairs, 0), mask=valid, other=0.0).to(tl.float32)
        acc = acc * rw[:, None]
    optr = out_ptr + tl.where(valid, pairs, 0).to(tl.int64)[:, None] * N + offs_n[None, :]
    omask = valid[:, None] & (offs_n[None, :] < N)
    if SPLIT > 1:
        tl.atomic_add(optr, acc, mask=omask)
    else:
        tl.store(optr, acc.to(out_ptr.dtype.element_ty), mask=omask)


# ================================================================================================
# Host side (torch only: no host sync)
# ================================================================================================
def block_m(P: int) -> int:
    """Rows per block for P pairs (a heuristic: decode 16, larger batches up to 64)."""
    return 16 if P <= 64 else (32 if P <= 512 else 64)


def align(top_k_index: torch.Tensor, E: int, BM: int):
    """Sort the P = T*k pairs by expert, each expert's run padded to a multiple of BM, on the device.

    Returns (sorted_ids int32 [cap], block_expert int32 [cap // BM], n_pad int32 [1]); slots past an
    expert's pairs hold P; pairs whose expert id is outside [0, E) are dropped (they get no output row:
    the caller zero-fills). ``cap`` depends only on P, E and BM."""
    dev = top_k_index.device
    flat = top_k_index.reshape(-1).to(torch.int64)
    P = flat.numel()
    key = torch.where((flat >= 0) & (flat < E), flat, E)
    counts = torch.zeros(E + 1, dtype=torch.int64, device=dev)
    counts.scatter_add_(0, key, torch.ones_like(key))  # torch.bincount on CUDA syncs (its max)
    counts = counts[:E]
    padded = (counts + (BM - 1)) // BM * BM
    ends = torch.cumsum(padded, 0)
    starts = ends - padded
    cstart = torch.cumsum(counts, 0) - counts
    skey, order = torch.sort(key, stable=True)
    rank = torch.arange(P, device=dev) - torch.cat([cstart, cstart.new_zeros(1)])[skey]
    cap = cdiv(P + min(E, P) * (BM - 1), BM) * BM
    dest = torch.where(skey < E, torch.cat([starts, starts.new_full((1,), cap)])[skey] + rank, cap)
    sorted_ids = torch.full((cap + 1,), P, dtype=torch.int32, device=dev)
    sorted_ids.scatter_(0, dest, order.to(torch.int32))
    sorted_ids = sorted_ids[:cap]
    bstart = torch.arange(0, cap, BM, device=dev)
    block_expert = torch.searchsorted(ends, bstart, right=True).clamp_(max=E - 1).to(torch.int32)
    n_pad = ends[-1:].to(torch.int32)
    return sorted_ids, block_expert, n_pad


class Stacked:
    """One matrix kind (gate_up or down) of all E experts, stacked: w [E, N, KW] int32, s/z [E, N, G],
    lut [E, rows, 16] fp16; mode 0 (int) or 1 (lut)."""

    def __init__(self, mode: int, w, s, z, lut, K: int, GS: int, zc: float):
        self.mode, self.w, self.s, self.z, self.lut = mode, w, s, z, lut
        self.E, self.N, self.KWS = w.shape
        self.K, self.GS, self.zc = K, GS, zc
        self.G = s.shape[2] if s is not None else 1
        self.lut_rows = lut.shape[1] if lut is not None else 1
        self.launchers: dict = {}  # (dtypes, constexprs) -> Launcher (the compiled kernel called directly)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.w, self.s, self.z, self.lut) if t is not None)


def chunk_words(GS: int) -> int:
    """Words per K chunk (8 columns each): 16 (128 columns), fewer where that keeps a chunk inside one
    group (the scale after the dot); per-word scales where no power of two fits."""
    bkw = 16
    while bkw > 4 and GS % (8 * bkw):
        bkw //= 2
    return bkw if GS % (8 * bkw) == 0 else 16


_SMS: dict = {}


def _split(nblocks: int, ntn: int, nch: int, device) -> int:
    """Split-K factor: enough programs to fill the GPU when few blocks are live (decode)."""
    if device.type != "cuda":
        return 1
    sms = _SMS.get(device.index)
    if sms is None:
        sms = _SMS[device.index] = torch.cuda.get_device_properties(device).multi_processor_count
    progs = nblocks * ntn
    if progs >= sms:
        return 1
    return max(1, min(8, nch // 4 or 1, cdiv(2 * sms, max(progs, 1))))


def grouped_gemm(st: Stacked, x: torch.Tensor, align_out, P: int, top_k_div: int, routing: torch.Tensor | None,
                 BM: int, live_blocks: int, cfg: dict | None = None) -> torch.Tensor:
    """out[p] = x[p // top_k_div] @ W[expert(p)]^T (times routing[p] when given) for the P pairs: [P, N]
    in x's dtype (fp32 when split-K). Pairs without an expert are zero."""
    sorted_ids, block_expert, n_pad = align_out
    cfg = cfg or {}
    BN = int(cfg.get("BN", 64))
    BKW = int(cfg.get("BKW", 0)) or chunk_words(st.GS)
    ntn = cdiv(st.N, BN)
    nch = cdiv(st.KWS, BKW)
    split = int(cfg.get("split", 0)) or _split(live_blocks, ntn, nch, x.device)
    split = max(1, min(split, nch))
    nb = block_expert.numel()
    if split > 1:
        out = torch.zeros((P, st.N), dtype=torch.float32, device=x.device)
    else:
        out = torch.zeros((P, st.N), dtype=x.dtype, device=x.device)
    w = st.w
    s = st.s if st.s is not None else w
    z = st.z if st.z is not None else w
    lut = st.lut if st.lut is not None else w
    rw = routing if routing is not None else x
    warps, stages = int(cfg.get("warps", 4)), int(cfg.get("stages", 2))
    swap = bool(cfg.get("swap", BM <= 16))  # as the dense W4A16 kernel's default at M <= 16 (tensor cores)
    key = (x.dtype, rw.dtype, top_k_div, routing is not None, BM, BN, BKW, split, swap, warps, stages)
    lau = st.launchers.get(key)
    if lau is None:
        consts = dict(X_DIV=top_k_div, MUL_W=routing is not None, MODE=st.mode, HAS_SCALE=st.s is not None,
                      HAS_ZERO=st.z is not None, ZC=float(st.zc), GS=st.GS, LS=16, LUT_ROW=st.lut_rows > 1,
                      LUT_ROWS=st.lut_rows, BM=BM, BN=BN, BKW=BKW, SPLIT=split, SWAP=swap, INTERP=INTERPRET)
        lau = st.launchers[key] = Launcher(moe_w4a16, consts, num_warps=warps, num_stages=stages, device=x.device)
    lau((nb, ntn, split), x, w, s, z, lut, out, sorted_ids, block_expert, n_pad, rw, P, st.N, st.K, st.KWS, st.G)
    return out


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """Contiguous and 16-byte aligned (the compiled kernel is specialized on its pointers' alignment)."""
    t = t.contiguous()
    return t.clone() if t.data_ptr() % 16 else t


ALIGN = os.environ.get("QUANTKIT_MOE_ALIGN", "auto")  # auto (kernel on CUDA), kernel, torch


def _use_align_kernel(x: torch.Tensor, P: int, E: int) -> bool:
    """One-launch alignment (:mod:`moe_align`) on CUDA; the torch ops under the interpreter (slow there) or
    when ``QUANTKIT_MOE_ALIGN=torch``; ``=kernel`` forces it (tests)."""
    if ALIGN == "torch" or not align_supported(P, E):
        return False
    return ALIGN == "kernel" or (x.is_cuda and not INTERPRET)


_ALIGN_OK: dict = {}  # device -> the alignment kernel gave the torch form's outputs on its first use


def _align_checked(top_k_index: torch.Tensor, E: int, BM: int):
    """The alignment kernel, checked once per device against the torch form (outside graph capture): a
    compile failure or a mismatch on some GPU/Triton warns once and keeps the torch ops there."""
    dev = top_k_index.device
    ok = _ALIGN_OK.get(dev)
    if ok:
        return align_kernel(top_k_index, E, BM)
    capturing = dev.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if ok is None and not capturing:
        ref = align(top_k_index, E, BM)
        try:
            got = align_kernel(top_k_index, E, BM)
            ok = all(torch.equal(a.to(torch.int32), b) for a, b in zip(ref, got))
            why = "its outputs differ from the torch form's"
        except Exception as e:  # noqa: BLE001 - any compile/launch failure: the torch ops are always correct
            ok, why = False, f"{type(e).__name__}: {str(e)[:200]}"
        _ALIGN_OK[dev] = ok
        if not ok:
            import warnings

            warnings.warn(f"MoE alignment kernel disabled on {dev} ({why}); using torch ops "
                          "(QUANTKIT_MOE_ALIGN=torch silences this)", stacklevel=3)
        return got if ok else ref
    return align(top_k_index, E, BM)


def fused_experts(x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, gate_up: Stacked,
                  down: Stacked, act, cfg: dict | None = None) -> torch.Tensor:
    """A gated MoE layer: ``sum_j w_j * down_e(act(gate_e(x)) * up_e(x))`` over each token's k experts,
    with gate_up = cat(gate, up) rows per expert. x [T, H] (bf16/fp16) -> [T, H]. Two GEMM launches."""
    T, _ = x.shape
    k = top_k_index.shape[1]
    P = T * k
    E = gate_up.E
    if P == 0:
        return torch.zeros_like(x)
    x = _aligned(x)
    BM = int((cfg or {}).get("BM", 0)) or block_m(P)
    al = _align_checked(top_k_index, E, BM) if _use_align_kernel(x, P, E) else align(top_k_index, E, BM)
    live = min(cdiv(P + min(E, P) * (BM - 1), BM), min(E, P) + cdiv(P, BM))  # blocks that can hold pairs
    h = grouped_gemm(gate_up, x, al, P, k, None, BM, live, cfg).to(x.dtype)
    inter = gate_up.N // 2
    a = _aligned(act(h[:, :inter]) * h[:, inter:])
    rw = _aligned(top_k_weights.reshape(-1))
    y = grouped_gemm(down, a, al, P, 1, rw, BM, live, cfg)
    return y.view(T, k, -1).sum(1, dtype=torch.float32).to(x.dtype)
