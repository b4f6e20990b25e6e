"""Triton kernel for GPTQ's inner column loop on GPU (static per-column grids, affine formats).

GPTQ's recursion is independent across output rows: for the columns i of one lazy block,
    q = grid(w_i);  e = (w_i - q) / U[i, i];  W[:, j] -= e * U[i, j]  (j > i).
One program owns BLOCK_R rows and keeps the block's columns in registers, so a 128-column block
costs one launch instead of ~10 small launches per column. The Python loop stays the reference
(CPU, LUT formats, dynamic groups); tests compare the two under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gptq_block_kernel(W_ptr, U_ptr, S_ptr, Z_ptr, Q_ptr, E_ptr, rows, ncols, stride_w, stride_u,
                       maxq, BLOCK_R: tl.constexpr, B: tl.constexpr):
    pid = tl.program_id(0)
    r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.arange(0, B)
    rmask = r < rows
    cmask = c < ncols
    m2 = rmask[:, None] & cmask[None, :]
    offs = r[:, None] * stride_w + c[None, :]
    W = tl.load(W_ptr + offs, mask=m2, other=0.0)
    S = tl.load(S_ptr + offs, mask=m2, other=1.0)
    Z = tl.load(Z_ptr + offs, mask=m2, other=0.0)
    Q = tl.zeros((BLOCK_R, B), dtype=tl.float32)
    E = tl.zeros((BLOCK_R, B), dtype=tl.float32)
    for i in range(0, ncols):
        sel = (c == i)[None, :]
        w = tl.sum(tl.where(sel, W, 0.0), axis=1)
        s = tl.sum(tl.where(sel, S, 0.0), axis=1)
        z = tl.sum(tl.where(sel, Z, 0.0), axis=1)
        x = w / s
        # round half to even, as torch.round does
        fl = tl.floor(x)
        diff = x - fl
        half_even = tl.where((fl - 2.0 * tl.floor(fl * 0.5)) == 0.0, fl, fl + 1.0)
        rx = tl.where(diff > 0.5, fl + 1.0, tl.where(diff < 0.5, fl, half_even))
        qi = tl.minimum(tl.maximum(rx + z, 0.0), maxq)
        dq = (qi - z) * s
        urow = tl.load(U_ptr + i * stride_u + c, mask=cmask & (c >= i), other=0.0)
        d = tl.sum(tl.where(c == i, urow, 0.0), axis=0)
        err = (w - dq) / d
        W = W - err[:, None] * urow[None, :]
        Q = tl.where(sel, dq[:, None], Q)
        E = tl.where(sel, err[:, None], E)
    tl.store(Q_ptr + offs, Q, mask=m2)
    tl.store(E_ptr + offs, E, mask=m2)


def gptq_block(W1: torch.Tensor, U1: torch.Tensor, S1: torch.Tensor, Z1: torch.Tensor, maxq: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """One lazy block: W1/S1/Z1 [rows, n] fp32 (per-column scale/zero), U1 [n, n] -> (Q1, Err1)."""
    rows, n = W1.shape
    B = triton.next_power_of_2(max(n, 16))
    W1, U1, S1, Z1 = (t.contiguous() for t in (W1, U1, S1, Z1))
    Q1 = torch.empty_like(W1)
    E1 = torch.empty_like(W1)
    block_r = 16 if B <= 128 else 8
    grid = (triton.cdiv(rows, block_r),)
    _gptq_block_kernel[grid](W1, U1, S1, Z1, Q1, E1, rows, n, W1.stride(0), U1.stride(0), float(maxq),
                             BLOCK_R=block_r, B=B)
    return Q1, E1
