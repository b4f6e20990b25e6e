"""Kernel correctness on CPU through Triton's interpreter (TRITON_INTERPRET=1).

Every kernel path (GEMV split-K, tensor-core 'post' and 'pre', dequantize+matmul) is run on
random packed tensors built here by following docs/FORMAT.md, against a float64 reference
computed from the same packed tensors with the formulas of FORMAT.md (not with the kernels'
code). Outputs are poisoned with NaN before each call, sizes are odd, inputs fresh per check.
On a GPU machine the same tests run the compiled kernels (QUANTKIT_TEST_CUDA=1).
"""

from __future__ import annotations

import pytest
import torch
from kernel_ref import (  # noqa: F401, I001
    DEV,
    check,
    make_int,
    make_lut,
    rand_x,
    ref_int,
    ref_lut,
    rel_err,
    run_poisoned,  # first: it selects Triton's interpreter before Triton is imported
)

triton = pytest.importorskip("triton")

from quantkit.formats.base import format_from_spec  # noqa: E402 - after the interpreter is selected


def build(spec, p, shape):
    from quantkit import kernels

    kernels._scan()
    from quantkit.kernels import fp8, lowbit

    fmt = format_from_spec(spec)
    pd = {k: v.to(DEV) for k, v in p.items()}
    if spec["type"] in ("int", "lut"):  # this file tests the v1 kernels; test_kernels_k.py the default ones
        b = lowbit.build_int if spec["type"] == "int" else lowbit.build_lut
        return b(fmt, pd, shape, DEV, impl="v1")
    return fp8.build_fp8(fmt, pd, shape, DEV)


CFGS = {
    "gemv": {"path": "gemv", "BN": 32, "warps": 4, "stages": 2, "split": 2},
    "gemv1": {"path": "gemv", "BN": 64, "warps": 4, "stages": 2, "split": 1},
    "post2": {"path": "post", "BM": 16, "BN": 64, "warps": 4, "stages": 2, "split": 3},
    "post": {"path": "post", "BM": 16, "BN": 32, "warps": 4, "stages": 2, "split": 2},
    "post1": {"path": "post", "BM": 16, "BN": 32, "warps": 4, "stages": 2, "split": 1},
    "pre": {"path": "pre", "BM": 16, "BN": 32, "warps": 4, "stages": 2, "group_m": 2},
    "dq": {"path": "dq"},
    # fp8
    "f_gemv": {"path": "gemv", "BN": 16, "BK": 64, "warps": 4, "stages": 2, "split": 2},
    "f_gemm": {"path": "gemm", "BM": 16, "BN": 32, "BK": 64, "warps": 4, "stages": 2, "split": 2},
    "f_gemm1": {"path": "gemm", "BM": 16, "BN": 32, "BK": 64, "warps": 4, "stages": 2, "split": 1, "group_m": 2},
    "f_smm": {"path": "scaled_mm"},
    "f_swap": {"path": "gemm", "BM": 16, "BN": 32, "BK": 64, "warps": 4, "stages": 2, "split": 2, "swap": True},
}


def run_path(kern, path, x):
    return run_poisoned(kern, CFGS[path], x)


# ---- int ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path,m,g,sym,dtype", [
    ("gemv", 1, 32, True, torch.bfloat16),
    ("gemv1", 1, 64, False, torch.float16),
    ("gemv", 1, 128, False, torch.bfloat16),
    ("post", 5, 128, True, torch.bfloat16),
    ("post2", 3, 128, False, torch.float16),
    ("post1", 17, 32, False, torch.float16),  # g32: two groups per 128-column block
    ("pre", 19, 64, False, torch.bfloat16),
    ("pre", 33, 128, True, torch.float16),
    ("dq", 7, 32, True, torch.bfloat16),
])
def test_int4_paths(path, m, g, sym, dtype):
    n, k = 40, (200 if g != 128 else 264)  # odd sizes; partial last group; padded block
    m = 3 if path == "gemv1" else m  # the GEMV takes up to 4 rows
    spec, p, gidx = make_int(n, k, 4, g, sym, seed=g + m)
    kern = build(spec, p, (n, k))
    x = rand_x(m, k, dtype, m)
    check(run_path(kern, path, x), x.double() @ ref_int(p, n, k, 4, gidx, sym).t(), dtype)


@pytest.mark.parametrize("path,m", [("gemv", 1), ("post", 5), ("pre", 19), ("dq", 7)])
def test_int4_signed_scales(path, m):
    """``sym_range: full`` stores negative scales for groups whose larger end is positive: every path
    multiplies by the signed scale (no path may assume scales > 0)."""
    n, k = 40, 256
    spec, p, gidx = make_int(n, k, 4, 64, True, seed=7)
    flip = torch.rand(p["scales"].shape, generator=torch.Generator().manual_seed(3)) < 0.5
    p["scales"] = torch.where(flip, -p["scales"], p["scales"])
    kern = build({**spec, "sym_range": "full"}, p, (n, k))
    x = rand_x(m, k, torch.bfloat16, m)
    check(run_path(kern, path, x), x.double() @ ref_int(p, n, k, 4, gidx, True).t(), torch.bfloat16)


@pytest.mark.parametrize("path,bits,g,sym,act", [
    ("gemv", 4, 32, False, True),     # act-order g_idx
    ("post", 4, 64, True, True),
    ("gemv1", 3, None, True, False),  # int3, per channel
    ("post1", 2, 64, False, False),   # int2
    ("post", 4, None, True, False),   # per channel, tensor cores
])
def test_int_variants(path, bits, g, sym, act):
    n, k = 24, 136
    m = 2 if path.startswith("gemv") else 9
    spec, p, gidx = make_int(n, k, bits, g, sym, act_order=act, seed=bits)
    kern = build(spec, p, (n, k))
    x = rand_x(m, k, torch.bfloat16, bits)
    check(run_path(kern, path, x), x.double() @ ref_int(p, n, k, bits, gidx, sym).t(), torch.bfloat16)


def test_int_refuses_unaligned_groups():
    spec, p, _ = make_int(8, 96, 4, 24, True)  # 24-column groups: not 16-aligned
    assert build(spec, p, (8, 96)) is None
    spec, p, _ = make_int(8, 64, 8, 32, True)  # 8 bits: no 4-bit kernel
    assert build(spec, p, (8, 64)) is None


# ---- lut ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path,bits,g,fixed,dtype", [
    ("gemv", 4, None, None, torch.bfloat16),   # any4, per-row table, no scales
    ("gemv1", 4, 64, "nf4", torch.bfloat16),   # fixed table, g64
    ("post", 4, 128, None, torch.float16),     # any4 with group scales
    ("post2", 4, None, None, torch.bfloat16),  # any4 no scales, tensor cores
    ("pre", 4, 128, "nf4", torch.bfloat16),    # fixed table
    ("gemv1", 3, 32, None, torch.float16),     # any3
    ("dq", 4, None, "fp4", torch.bfloat16),    # fixed table, one scale per row
])
def test_lut_paths(path, bits, g, fixed, dtype):
    n, k = 40, 200
    m = {"gemv": 1, "gemv1": 4, "post": 6, "post2": 2, "pre": 21, "dq": 5}[path]
    spec, p = make_lut(n, k, bits, g, fixed, seed=bits + m)
    kern = build(spec, p, (n, k))
    x = rand_x(m, k, dtype, m)
    check(run_path(kern, path, x), x.double() @ ref_lut(p, n, k, bits, g).t(), dtype)


# ---- fp8 ------------------------------------------------------------------------------------------
FP8 = {"e4m3": (torch.float8_e4m3fn, 448.0), "e5m2": (torch.float8_e5m2, 57344.0)}


def make_fp8(n, k, kind="e4m3", per_channel=True, act="dynamic", seed=0):
    gen = torch.Generator().manual_seed(seed)
    dt, fmax = FP8[kind]
    w = torch.randn(n, k, generator=gen) * 0.05
    s = (w.abs().amax(1, keepdim=True) if per_channel else w.abs().amax().reshape(1, 1)) / fmax
    p = {"weight": (w / s).clamp(-fmax, fmax).to(dt), "weight_scale": s.float()}
    if act == "static":
        p["input_scale"] = torch.tensor([[3.0 / 448.0]])
    spec = {"type": "fp8", "dtype": kind, "weight_scale": "channel" if per_channel else "tensor",
            "activations": act}
    return spec, p


def fp8_ref(x, p, act, kind="e4m3"):
    w = p["weight"].double() * p["weight_scale"].double()
    if act == "none":
        return x.double() @ w.t()
    dt, fmax = FP8[kind]
    xf = x.float()
    if act == "static":
        s = p["input_scale"].float().reshape(1, 1)
    else:
        s = xf.abs().amax(1, keepdim=True) / fmax
        s = torch.where(s > 0, s, torch.ones_like(s))
    xq = (xf / s).clamp(-fmax, fmax).to(dt)
    return (xq.double() * s.double()) @ w.t()


@pytest.mark.parametrize("path,m,act,per_channel,dtype", [
    ("f_gemv", 3, "none", True, torch.bfloat16),       # W8A16
    ("f_gemm", 11, "none", False, torch.float16),
    ("f_gemv", 1, "dynamic", True, torch.bfloat16),    # W8A8 dynamic per token
    ("f_gemm1", 21, "dynamic", True, torch.float16),
    ("f_gemm", 9, "static", False, torch.bfloat16),
    ("f_gemm", 13, "none", True, torch.bfloat16),      # W8A16 bf16: x scaled into fp16 per row
    ("f_gemm1", 5, "none", True, torch.bfloat16),
    ("f_swap", 7, "none", True, torch.bfloat16),       # W8A16, weight tile as the A operand
    ("f_swap", 17, "none", False, torch.float16),
])
def test_fp8_paths(path, m, act, per_channel, dtype):
    n, k = 40, (256 if m in (1, 11, 13) else 208)  # 256: the unmasked-K (EVEN_K) variants
    spec, p = make_fp8(n, k, per_channel=per_channel, act=act, seed=m)
    kern = build(spec, p, (n, k))
    x = rand_x(m, k, dtype, m)
    check(run_path(kern, path, x), fp8_ref(x, p, act), dtype)


@pytest.mark.parametrize("m,k,act,kind", [
    (1, 256, "dynamic", "e4m3"),   # EVEN_K
    (3, 208, "dynamic", "e4m3"),   # masked K, a zero row
    (4, 200, "static", "e4m3"),
    (2, 264, "dynamic", "e5m2"),
    (4, 1100, "dynamic", "e4m3"),  # the row's max over 3 chunks of 512 (the last one masked)
])
def test_fp8_gemv_quantizes_in_the_kernel_bit_for_bit(m, k, act, kind):
    """W8A8 GEMV in one launch (each program derives the row's scale and quantizes its own slice):
    the same output, bit for bit, as the two-launch path (activation-quant kernel, then the GEMV), and
    the float64 reference of the format."""
    n = 40
    spec, p = make_fp8(n, k, kind=kind, act=act, seed=m + k)
    kern = build(spec, p, (n, k))
    x = rand_x(m, k, torch.bfloat16, m + 1)
    if m == 3:
        x[1] = 0
    x[0, 7] = 40.0  # an outlier sets row 0's scale
    x[-1, -3] = -50.0  # and one in the last (masked) chunk the last row's
    fused = run_path(kern, "f_gemv", x)
    two = run_poisoned(kern, {**CFGS["f_gemv"], "fq": False}, x)
    for a, b in zip(fused, two):
        assert torch.equal(a, b)
    check(fused, fp8_ref(x, p, act, kind), torch.bfloat16)


@pytest.mark.parametrize("path", ["f_gemm", "f_gemm1", "f_swap"])
def test_fp8_w8a16_bf16_activations_beyond_fp16_range(path):
    """The W8A16 tensor-core path multiplies in fp16 after dividing each row of x by a power of two:
    rows far beyond fp16's range (1e30), tiny rows (1e-30) and a zero row come out right."""
    n, k, m = 40, 256, 6
    spec, p = make_fp8(n, k, per_channel=True, act="none", seed=3)
    kern = build(spec, p, (n, k))
    x = rand_x(m, k, torch.bfloat16, 7)
    x[1] *= 1e30
    x[2] *= 1e-30
    x[3] = 0
    x[4, 5] = 3e5  # one outlier far above fp16's max in an ordinary row
    outs = run_path(kern, path, x)
    ref = fp8_ref(x, p, "none")
    for out in outs:
        assert torch.isfinite(out).all()
        for r in range(m):  # row by row: the rows' scales differ by 60 orders of magnitude
            den = ref[r].norm()
            e = 0.0 if den == 0 else float((out[r].double() - ref[r]).norm() / den)
            assert (den == 0 and out[r].abs().max() == 0) or e < 1e-2, (r, e)


def test_fp8_activation_quant():
    """The fused activation-quant kernel against the reference cast: the same codes and scales."""
    from quantkit.kernels import fp8

    spec, p = make_fp8(16, 200, act="dynamic")
    kern = build(spec, p, (16, 200))
    x = rand_x(5, 200, torch.bfloat16, 3).to(DEV)
    x[2] = 0  # an all-zero row gets scale 1
    xq = torch.empty(5, 200, dtype=torch.float8_e4m3fn, device=DEV)
    xs = torch.full((5,), float("nan"), device=DEV)
    kern.q_launch((5, 1, 1), x, xq, xs, kern.ws, 200)
    s = x.float().abs().amax(1) / 448.0
    s = torch.where(s > 0, s, torch.ones_like(s))
    assert torch.allclose(xs.cpu(), s.cpu(), rtol=0, atol=0)
    ref = (x.float() / s[:, None]).clamp(-448, 448).to(torch.float8_e4m3fn).float()
    assert torch.equal(xq.float().cpu(), ref.cpu())
    assert fp8 is not None


# ---- GPU only: cuBLAS FP8 path and the QuantLinear hook-up ----------------------------------------
cuda_only = pytest.mark.skipif(DEV.type != "cuda", reason="needs CUDA (run with QUANTKIT_TEST_CUDA=1)")


@cuda_only
@pytest.mark.parametrize("kind", ["e4m3", "e5m2"])
def test_fp8_scaled_mm(kind):
    n, k, m = 96, 256, 300
    spec, p = make_fp8(n, k, kind=kind, act="dynamic")
    kern = build(spec, p, (n, k))
    x = rand_x(m, k, torch.bfloat16, 5)
    check(run_path(kern, "f_smm", x), fp8_ref(x, p, "dynamic", kind), torch.bfloat16)


@cuda_only
def test_quantlinear_uses_kernel():
    from quantkit.nn import QuantLinear

    n, k = 80, 392
    spec, p, gidx = make_int(n, k, 4, 64, False, seed=3)
    layer = QuantLinear(k, n, {"format": spec}, {kk: v.to(DEV) for kk, v in p.items()}).to(DEV)
    for m in (1, 3, 16, 70, 1500):
        x = rand_x(m, k, torch.bfloat16, m).to(DEV)
        y = layer(x.view(1, m, k))
        assert layer._kernel is not None
        check([y.view(m, n).cpu()], x.double().cpu() @ ref_int(p, n, k, 4, gidx, False).t(), torch.bfloat16)
