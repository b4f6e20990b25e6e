"""Where one GPTQ solve spends its time, on 8B-shaped linears (random weights, a real-sized Hessian).

    python bench/gptq_profile.py            (GPU)
Times, per shape: the Hessian factorisation (as GPTQ does it, and the reversed-Cholesky variant),
the whole GPTQ solve, the solve of half the rows, and the host-to-device copy of one 8B block from
pageable and from pinned memory. Prints one table.
"""

from __future__ import annotations

import time

import torch

from quantkit.formats.base import format_from_spec
from quantkit.quantizers.base import LayerStats, quantizer_from_spec
from quantkit.quantizers.gptq import inverse_hessian_factor


def timed(fn, reps=3):
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2] * 1e3


def reversed_factor(h, damp=0.01):
    n = h.shape[0]
    hd = h + damp * torch.mean(torch.diagonal(h)) * torch.eye(n, device=h.device)
    k = torch.linalg.cholesky(hd.flip(0, 1))
    kinv = torch.linalg.solve_triangular(k, torch.eye(n, device=h.device), upper=False)
    return kinv.flip(0, 1)


def main():
    dev = "cuda"
    fmt = format_from_spec({"type": "int", "bits": 4, "group_size": 128, "sym": True})
    q = quantizer_from_spec({"type": "gptq", "act_order": True, "static_groups": True})
    rows = []
    for name, r, c in [("down", 4096, 14336), ("gate", 14336, 4096), ("q", 4096, 4096), ("k", 1024, 4096)]:
        g = torch.Generator(device=dev).manual_seed(0)
        x = torch.randn(16384, c, device=dev, generator=g) * torch.rand(c, device=dev, generator=g)
        h = x.t() @ x
        w = torch.randn(r, c, device=dev, generator=g) * 0.02
        st = LayerStats(x.shape[0], h, torch.diagonal(h).clone(), x.abs().amax(0))
        hp = h / x.shape[0]
        f_cur = timed(lambda hp=hp: inverse_hessian_factor(hp, 0.01, 3))
        f_rev = timed(lambda hp=hp: reversed_factor(hp))
        U, _ = inverse_hessian_factor(hp, 0.01, 3)
        err = float((reversed_factor(hp) - U).abs().max() / U.abs().max())
        whole = timed(lambda w=w, st=st: q.quantize(w, fmt, st), reps=1)
        half = timed(lambda w=w, r=r, st=st: q.quantize(w[: r // 2], fmt, st), reps=1)
        rows.append((name, r, c, f_cur, f_rev, err, whole, half))
    print("| linear | rows x cols | factor ms (chol+inv+chol) | factor ms (reversed chol + trsm) | rel diff | "
          "GPTQ whole ms | GPTQ half rows ms |")
    print("|---|---|---|---|---|---|---|")
    for n, r, c, a, b, e, wh, hf in rows:
        print(f"| {n} | {r}x{c} | {a:.1f} | {b:.1f} | {e:.1e} | {wh:.1f} | {hf:.1f} |")
    blk = [torch.empty(s, dtype=torch.bfloat16) for s in [(4096 * 6, 4096), (14336 * 3, 4096)]]
    pin = [t.pin_memory() for t in blk]
    gb = sum(t.numel() * 2 for t in blk) / 1e9
    pg = timed(lambda: [t.to(dev) for t in blk])
    pn = timed(lambda: [t.to(dev, non_blocking=True) for t in pin])
    print(f"one 8B block ({gb:.2f} GB) to the GPU: pageable {pg:.1f} ms ({gb / pg * 1e3:.1f} GB/s), "
          f"pinned {pn:.1f} ms ({gb / pn * 1e3:.1f} GB/s)")


if __name__ == "__main__":
    main()
