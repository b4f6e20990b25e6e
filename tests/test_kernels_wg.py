# ruff: noqa: I001 - kernel_ref must be imported first: it selects Triton's interpreter before Triton loads
"""The Hopper Gluon GEMM (kernels/src/_wgmma.py, path ``wg``).

On a GPU of compute capability 9.x (QUANTKIT_TEST_CUDA=1): outputs against the float64 reference of
tests/kernel_ref.py (docs/FORMAT.md formulas), poisoned with NaN first, for odd M and N (tails of the
TMA boxes and of the stores), asym/sym, per group/per channel, bf16/fp16. Without one (CPU CI): the
kernel is compiled for sm_90 by Triton's own compiler (no GPU needed) and its PTX must hold the
asynchronous wgmma, the TMA loads and the overlap (a wait that leaves one wgmma in flight).
"""

from __future__ import annotations

from kernel_ref import DEV, check, make_int, make_lut, rand_x, ref_int, ref_lut, run_poisoned  # noqa: I001

import pytest
import torch

triton = pytest.importorskip("triton")

from quantkit.formats.base import format_from_spec  # noqa: E402


def _wg():
    from quantkit.kernels import _wgmma

    if not _wgmma.HAVE_GLUON:
        pytest.skip("this Triton has no Gluon")
    return _wgmma


def _hopper() -> bool:
    return DEV.type == "cuda" and torch.cuda.get_device_capability()[0] == 9


@pytest.mark.skipif(not _hopper(), reason="needs an sm_90 GPU (QUANTKIT_TEST_CUDA=1 on an H100/H200)")
@pytest.mark.parametrize("m,n,k,g,fixed,dtype", [
    (200, 264, 1024, 128, None, torch.bfloat16),   # any4, per-row tables + group scales
    (130, 136, 512, None, None, torch.float16),     # any4 rows, no scales
    (256, 128, 768, 64, "nf4", torch.bfloat16),     # one shared table
])
@pytest.mark.parametrize("ws", [False, True])
def test_wg_lut_matches_reference(m, n, k, g, fixed, dtype, ws):
    from quantkit.kernels import lowbit

    _wg()
    spec, p = make_lut(n, k, 4, g, fixed=fixed, seed=m + n)
    kern = lowbit.build_lut(format_from_spec(spec), {a: v.to(DEV) for a, v in p.items()}, (n, k), DEV, impl="k")
    c = {"path": "wg", "BM": 128, "BN": 128, "BK": 64, "warps": 4 if ws else 8, "stages": 5, "ws": ws}
    assert kern.wg_ok(64, dtype)
    x = rand_x(m, k, dtype, m + k)
    check(run_poisoned(kern, c, x), x.double() @ ref_lut(p, n, k, 4, g).t(), dtype)


@pytest.mark.skipif(not _hopper(), reason="needs an sm_90 GPU (QUANTKIT_TEST_CUDA=1 on an H100/H200)")
@pytest.mark.parametrize("m,n,k,g,sym,dtype,cfg", [
    (200, 264, 1024, 128, True, torch.bfloat16, (128, 128, 64, 8, 5)),   # M, N tails
    (64, 256, 512, 64, False, torch.float16, (64, 128, 64, 4, 6)),       # asym g64, fp16
    (300, 520, 768, None, False, torch.bfloat16, (128, 256, 64, 8, 4)),  # per channel, asym
    (513, 128, 4096, 128, True, torch.bfloat16, (256, 128, 64, 8, 4)),
    (130, 136, 192, 64, True, torch.float16, (128, 128, 64, 4, 5)),       # 3 chunks < stages
])
@pytest.mark.parametrize("ws", [{}, {"ws": True}, {"ws": True, "split": 3}], ids=["plain", "ws", "ws-splitk3"])
def test_wg_matches_reference(m, n, k, g, sym, dtype, cfg, ws):
    """ws: the warp-specialized kernel (a loader warp, a dequantizing warpgroup, the MMA warps), also
    split-K (3 ranges of K, partials summed by the last program of each tile; run_poisoned calls twice,
    so the counters' reset is exercised)."""
    from quantkit.kernels import lowbit

    _wg()
    spec, p, gidx = make_int(n, k, 4, g, sym, seed=m + n)
    kern = lowbit.build_int(format_from_spec(spec), {a: v.to(DEV) for a, v in p.items()}, (n, k), DEV, impl="k")
    bm, bn, bk, w, st = cfg
    c = {"path": "wg", "BM": bm, "BN": bn, "BK": bk, "warps": w, "stages": st, **ws}
    assert kern.wg_ok(bk, dtype)
    x = rand_x(m, k, dtype, m + k)
    check(run_poisoned(kern, c, x), x.double() @ ref_int(p, n, k, 4, gidx, sym).t(), dtype)


_COMPILE = r"""
import json, sys, torch, triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource
from triton.runtime.jit import mangle_type
from quantkit.kernels import _wgmma as W

x = torch.empty(256, 1024, dtype=torch.bfloat16)
xd = W.TensorDescriptor.from_tensor(x, [128, 64], W.x_layout(128, 64, x.dtype))
wd = W.w_descriptor(torch.empty(512, 128, dtype=torch.int32), 128, 64)
sig = {"x_desc": mangle_type(xd), "w_desc": mangle_type(wd), "s_ptr": "*fp16", "z_ptr": "*u8",
       "out_ptr": "*bf16", "M": "i32", "N": "i32", "K": "i32", "G": "i32", "lut_ptr": "*i32"}
mode, ws = int(sys.argv[1]), sys.argv[2] == "ws"
if ws:
    sig.update(ws_ptr="*fp32", cnt_ptr="*i32", cps="i32", SPLIT="i32")
const = {"MODE": mode, "LUT_ROW": True, "HAS_SCALE": True, "HAS_ZERO": mode == 0, "ZC": 8.0, "GS": 128,
         "STAGES": 5, "GROUP_M": 8}
opts = {"num_warps": 8}
if ws:
    const.update(STAGES=4, NB=2, DQ_REGS=128, SPLITK=mode == 1)  # the lut case compiles the split-K epilogue
    opts = {"num_warps": 4, "maxnreg": 168}
names = list(sig) + list(const)
sig.update({c: "constexpr" for c in const})
src = GluonASTSource(W.w4a16_wgmma_ws if ws else W.w4a16_wgmma, sig, {(names.index(c),): v for c, v in const.items()})
ck = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
print(json.dumps({"ptx": ck.asm["ptx"], "shared": ck.metadata.shared}))
"""


@pytest.mark.parametrize("mode,variant", [(0, "plain"), (1, "plain"), (0, "ws"), (1, "ws")])
def test_wg_compiles_to_async_wgmma_for_sm90(mode, variant):
    """CPU: the kernel compiles for sm_90 and its PTX overlaps dequantization with the tensor cores.
    In a fresh process: Triton's interpreter (selected by kernel_ref for the other kernel tests) patches
    the language in this one."""
    import json
    import os
    import subprocess
    import sys

    _wg()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _COMPILE, str(mode), variant], capture_output=True, text=True, env=env,
                       timeout=300)
    if r.returncode and "ptxas" in r.stderr.lower() and "not found" in r.stderr.lower():
        pytest.skip(f"no ptxas here: {r.stderr[-200:]}")
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    ptx = out["ptx"]
    assert "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16" in ptx
    assert "cp.async.bulk.tensor.2d" in ptx  # TMA loads
    assert "wgmma.wait_group.sync.aligned 1" in ptx  # one wgmma left in flight while the next dequantizes
    assert out["shared"] <= 227 * 1024
    assert ("prmt.b32" in ptx) == (mode == 1) or mode == 0  # lut: the register-table lookups
    if variant == "ws":  # the partitions: register reallocation, mbarrier hand-overs, no CTA-wide barrier
        assert "setmaxnreg" in ptx and "mbarrier.arrive" in ptx and "mbarrier.try_wait" in ptx
        assert ("atom.global" in ptx) == (mode == 1)  # split-K: the tile counter
