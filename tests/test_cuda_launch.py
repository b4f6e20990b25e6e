"""The ctypes launch of compiled Triton kernels (kernels/src/_cuda_launch.py).

On the CPU: the parameter block is checked against a fake compiled kernel (the driver's parameter
sizes patched in), and every reason to keep Triton's launcher is refused. With QUANTKIT_TEST_CUDA=1 on a
GPU: a real int4 / any4 / FP8 layer gives the same output through the ctypes launch as through Triton's, and
the ctypes launch is the one used."""

from __future__ import annotations

import ctypes
from types import SimpleNamespace

import pytest
import torch
from kernel_ref import DEV

from quantkit.kernels import _cuda_launch, _launch

NAMES = ["x_ptr", "w_ptr", "M", "N", "scale", "BN"]
SIG = {"x_ptr": "*bf16", "w_ptr": "*u8", "M": "i32", "N": "i64", "scale": "fp32", "BN": "constexpr"}


def fake_ck(sig=SIG, **md):
    meta = dict(num_warps=4, shared=1024, global_scratch_size=0, profile_scratch_size=0,
                launch_cooperative_grid=False, launch_pdl=False, num_ctas=1)
    meta.update(md)
    return SimpleNamespace(metadata=SimpleNamespace(**meta), src=SimpleNamespace(signature=dict(sig)), function=1234)


@pytest.fixture
def sizes(monkeypatch):
    box = {"v": [8, 8, 4, 8, 4, 8, 8]}  # the five parameters, then Triton's two scratch pointers
    monkeypatch.setattr(_cuda_launch, "_param_sizes", lambda func: list(box["v"]))
    monkeypatch.setattr(_cuda_launch, "_libcuda", lambda: SimpleNamespace(cuLaunchKernel=None))
    return box


def test_parameter_block_matches_signature(sizes):
    cl = _cuda_launch.CtypesLaunch(fake_ck(), NAMES, [0x1000, 0x2000, 3, 1 << 40, 0.5, 64], (7, 2, 1))
    assert len(cl.params) == 7 and set(cl.slots) == {"x_ptr", "w_ptr", "M", "N", "scale"}
    vals = [ctypes.cast(cl.params[0], ctypes.POINTER(ctypes.c_uint64))[0],
            ctypes.cast(cl.params[1], ctypes.POINTER(ctypes.c_uint64))[0],
            ctypes.cast(cl.params[2], ctypes.POINTER(ctypes.c_int32))[0],
            ctypes.cast(cl.params[3], ctypes.POINTER(ctypes.c_int64))[0],
            ctypes.cast(cl.params[4], ctypes.POINTER(ctypes.c_float))[0],
            ctypes.cast(cl.params[5], ctypes.POINTER(ctypes.c_uint64))[0]]
    assert vals == [0x1000, 0x2000, 3, 1 << 40, 0.5, 0]
    cl.slot("x_ptr").value = 0x3000  # a call writes the slot the block points at
    assert ctypes.cast(cl.params[0], ctypes.POINTER(ctypes.c_uint64))[0] == 0x3000
    assert [g.value for g in cl.grid] == [7, 2, 1] and cl.block.value == 128 and cl.shared.value == 1024


@pytest.mark.parametrize("sizes_v, md, sig", [
    ([8, 8, 8, 8, 4, 8, 8], {}, SIG),             # M's size differs from its type's
    ([8, 8, 4, 8], {}, SIG),                      # fewer parameters than arguments
    ([8, 8, 4, 8, 4, 4], {}, SIG),                # a trailing parameter that is not a pointer
    ([8, 8, 4, 8, 4, 8, 8], {"global_scratch_size": 128}, SIG),
    ([8, 8, 4, 8, 4, 8, 8], {"profile_scratch_size": 64}, SIG),
    ([8, 8, 4, 8, 4, 8, 8], {"launch_pdl": True}, SIG),
    ([8, 8, 4, 8, 4, 8, 8], {"num_ctas": 2}, SIG),
    ([8, 8, 4, 8, 4, 8, 8], {}, {**SIG, "scale": "bf16"}),  # a type with no C slot here
])
def test_refuses_what_it_cannot_prove(sizes, sizes_v, md, sig):
    sizes["v"] = sizes_v
    with pytest.raises(_cuda_launch.Unsupported):
        _cuda_launch.CtypesLaunch(fake_ck(sig, **md), NAMES, [1, 2, 3, 4, 0.5, 64], (1, 1, 1))


@pytest.mark.skipif(DEV.type != "cuda", reason="verified() synchronizes a CUDA device")
def test_verified_compares_outputs():
    ref = torch.randn(3, 8, device=DEV)
    assert _cuda_launch.verified(ref, lambda b: b.copy_(ref))
    assert not _cuda_launch.verified(ref, lambda b: b.copy_(ref * 2))


def test_cpu_tensors_keep_triton_launcher():
    lau = SimpleNamespace(ck=object(), fn=None, tail=())
    out = torch.zeros(2)
    assert _launch.ctypes_run(lau, (1, 1, 1), (), ("x_ptr",), out, out, 1, 0) is None


@pytest.mark.skipif(DEV.type != "cuda", reason="compiled kernels on a GPU (QUANTKIT_TEST_CUDA=1)")
@pytest.mark.parametrize("kind", ["int4", "any4", "fp8", "fp8w"])
@pytest.mark.parametrize("M", [1, 2, 4])
def test_gpu_same_output_and_used(kind, M, monkeypatch):
    from _guards import load_bench

    from quantkit.kernels import fp8
    from quantkit.kernels._launch import m_bucket

    kb = load_bench("kernel_bench", "kernel_bench")

    used = []
    orig = _launch.checked
    spy = lambda *a, **k: used.append(orig(*a, **k)) or used[-1]  # noqa: E731
    monkeypatch.setattr(_launch, "checked", spy)
    monkeypatch.setattr(fp8, "checked", spy)
    spec, n, k = kb.KINDS[kind], 4096, 4096
    packed = kb.make_packed(spec, n, k, DEV)
    x = torch.randn(M, k, device=DEV, dtype=torch.bfloat16)
    outs = {}
    for on in (False, True):
        monkeypatch.setattr(_cuda_launch, "ENABLED", on)
        used.clear()
        kern = kb.build_kernel(spec, packed, n, k, DEV)[1]
        kern(x)
        outs[on] = [kern(x).float() for _ in range(3)]  # the later calls take the fast path
        # FP8: only the GEMV plan has the ctypes launch; this GPU's tuned plan for M's bucket may be a GEMM
        # (on the H100 it is from M = 2)
        mb = m_bucket(M)
        path = kern.check_config(kern.config(mb, x.dtype), mb, x.dtype).get("path")
        expect = on and (not kind.startswith("fp8") or path == "gemv")
        assert any(u is not None for u in used) == expect, (path, used)
    ref = outs[False][0]
    for y in outs[True]:
        assert (y - ref).norm() / ref.norm() < 1e-3


def test_empty_hook_chain_is_no_hook(monkeypatch):
    """Triton >= 3.4 keeps each launch hook as a HookChain that is never None: an empty one must not count as
    a hook (it did until 2026-12-08, which kept every GPU launch on Triton's slow path); one with a call must."""
    knobs = pytest.importorskip("triton.knobs")
    chain_cls = getattr(knobs, "HookChain", None)
    if chain_cls is None:
        pytest.skip("this Triton has no HookChain")
    monkeypatch.setattr(knobs.runtime, "launch_enter_hook", chain_cls())
    monkeypatch.setattr(knobs.runtime, "launch_exit_hook", chain_cls(reversed=True))
    assert not _launch._hooks_set()
    knobs.runtime.launch_enter_hook.add(print)
    assert _launch._hooks_set()
    monkeypatch.setattr(knobs.runtime, "launch_enter_hook", None)
    assert not _launch._hooks_set()
    monkeypatch.setattr(knobs.runtime, "launch_exit_hook", print)  # a plain callable (older Triton)
    assert _launch._hooks_set()
