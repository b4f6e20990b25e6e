"""What the kernel tests share: packed tensors built by following docs/FORMAT.md, float64 references
computed from them with FORMAT.md's formulas (not with the kernels' code), fresh random inputs, the
error check, and the runner that calls a kernel through one plan with its outputs poisoned.

Importing this module switches Triton to its CPU interpreter (TRITON_INTERPRET=1) unless
QUANTKIT_TEST_CUDA=1 asks for the compiled kernels on a GPU; import it before Triton.
"""

from __future__ import annotations

import os

if os.environ.get("QUANTKIT_TEST_CUDA") != "1":
    os.environ["TRITON_INTERPRET"] = "1"

import torch

from quantkit.formats.base import format_from_spec
from quantkit.formats.packing import pack_codes, unpack_codes

DEV = torch.device("cuda" if os.environ.get("QUANTKIT_TEST_CUDA") == "1" else "cpu")
BOUND = {torch.bfloat16: 1.2e-2, torch.float16: 2e-3}


def rel_err(out, ref):
    assert torch.isfinite(out).all(), "non-finite output (unwritten or NaN)"
    return float((out.double() - ref).norm() / ref.norm())


# ---- packed tensors per docs/FORMAT.md, and the float64 reference --------------------------------
def make_int(n, k, bits, g, sym, act_order=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    gs = g or k
    ng = -(-k // gs)
    codes = torch.randint(0, 1 << bits, (n, k), generator=gen)
    scales = (torch.rand(n, ng, generator=gen) * 0.02 + 0.002).to(torch.float16)
    p = {"qweight": pack_codes(codes, bits), "scales": scales}
    if not sym:
        p["zeros"] = torch.randint(0, 1 << bits, (n, ng), generator=gen).to(torch.uint8)
    gidx = torch.arange(k) // gs
    if act_order:
        gidx = gidx[torch.randperm(k, generator=gen)]
        p["g_idx"] = gidx.to(torch.int32)
    spec = {"type": "int", "bits": bits, "group_size": g, "sym": sym}
    return spec, p, gidx


def ref_int(p, n, k, bits, gidx, sym):
    codes = unpack_codes(p["qweight"], bits, k).double()
    s = p["scales"].double()[:, gidx]
    z = float(1 << (bits - 1)) if sym else p["zeros"].double()[:, gidx]
    return (codes - z) * s


def make_lut(n, k, bits, g, fixed=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (n, k), generator=gen)
    if fixed:
        fmt = format_from_spec({"type": "lut", "table": fixed, "bits": 4, "group_size": g})
        lut = fmt.fixed_table().to(torch.float16)
    else:
        lut = torch.sort(torch.randn(n, 1 << bits, generator=gen), dim=1).values.to(torch.float16)
    p = {"qweight": pack_codes(codes, bits), "lut": lut}
    if g or fixed:
        gs = g or k
        p["scales"] = (torch.rand(n, -(-k // gs), generator=gen) * 0.02 + 0.002).to(torch.float16)
    spec = {"type": "lut", "bits": bits, "group_size": g, **({"table": fixed} if fixed else {})}
    return spec, p


def ref_lut(p, n, k, bits, g):
    codes = unpack_codes(p["qweight"], bits, k).long()
    lut = p["lut"].double()
    w = lut[0][codes] if lut.shape[0] == 1 else lut.gather(1, codes)
    if "scales" in p:
        gs = g or k
        w = w * p["scales"].double()[:, torch.arange(k) // gs]
    return w


def rand_x(m, k, dtype, seed):
    gen = torch.Generator().manual_seed(seed + 1000)
    return (torch.randn(m, k, generator=gen) * (1 + torch.rand(m, 1, generator=gen) * 3)).to(dtype)


def check(outs, ref, dtype, bound=None):
    for out in outs:
        assert out.dtype == dtype and out.shape == ref.shape
        e = rel_err(out, ref)
        assert e < (bound or BOUND[dtype]), e


def run_poisoned(kern, cfg: dict, x: torch.Tensor) -> list[torch.Tensor]:
    """Call ``kern`` on x through the plan of ``cfg`` — twice on a GPU (the second call takes the fast
    launch path) — with every new floating-point tensor (``torch.empty``, ``Tensor.new_empty``: the
    outputs and scratch buffers) filled with NaN first, so an element the kernel does not write shows
    as non-finite. Returns the outputs, on the CPU."""
    m = x.shape[0]
    kern.plans.clear()
    kern.plan(m, x.dtype, cfg)
    real_empty, real_new_empty = torch.empty, torch.Tensor.new_empty

    def nan(t):
        return t.fill_(float("nan")) if t.is_floating_point() and t.element_size() > 1 else t

    torch.empty = lambda *a, **kw: nan(real_empty(*a, **kw))
    torch.Tensor.new_empty = lambda self, *a, **kw: nan(real_new_empty(self, *a, **kw))
    outs = []
    try:
        for _ in range(2 if DEV.type == "cuda" else 1):
            outs.append(kern(x.to(DEV)).cpu())
    finally:
        torch.empty, torch.Tensor.new_empty = real_empty, real_new_empty
    return outs
