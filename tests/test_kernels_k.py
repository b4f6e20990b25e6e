# ruff: noqa: I001 - kernel_ref must be imported first: it selects Triton's interpreter before Triton loads
"""The default W4A16 kernels (kernels/src/w4a16.py: the checkpoint's own K-major layout) on CPU through
Triton's interpreter, against the float64 references of tests/kernel_ref.py (docs/FORMAT.md
formulas, not the kernels' code). Odd sizes, outputs poisoned with NaN, fresh inputs per check.
QUANTKIT_TEST_CUDA=1 runs the compiled kernels on a GPU instead.
"""

from __future__ import annotations

from kernel_ref import DEV, check, make_int, make_lut, rand_x, ref_int, ref_lut, run_poisoned  # noqa: I001
# (first: it selects Triton's interpreter before Triton is imported)

import pytest
import torch

pytest.importorskip("triton")

from quantkit.formats.base import format_from_spec

KCFG = {
    "gemv": {"path": "gemv", "BN": 16, "BKW": 4, "warps": 4, "split": 3},
    "gemv1": {"path": "gemv", "BN": 32, "BKW": 8, "warps": 4, "split": 1, "pf": False},
    "gemvng": {"path": "gemv", "BN": 16, "BKW": 4, "warps": 4, "split": 2, "lutg": True},
    "swapg": {"path": "mma", "BM": 16, "BN": 32, "BKW": 4, "warps": 4, "split": 2, "swap": True, "lutg": True},
    "mma": {"path": "mma", "BM": 16, "BN": 32, "BKW": 4, "warps": 4, "split": 2, "swap": False},
    "swap": {"path": "mma", "BM": 16, "BN": 32, "BKW": 4, "warps": 4, "split": 3, "swap": True},
    "mma1": {"path": "mma", "BM": 16, "BN": 16, "BKW": 8, "warps": 4, "split": 1, "group_m": 2},
    "dq": {"path": "dq", "BN": 16, "BKW": 4},
    # inline-PTX dequant (compiled GPU only: on CPU these run the plain path of the same config)
    "swapa": {"path": "mma", "BM": 16, "BN": 32, "BKW": 4, "warps": 4, "split": 3, "swap": True, "asm": True},
    "mmaa": {"path": "mma", "BM": 16, "BN": 32, "BKW": 4, "warps": 4, "split": 2, "swap": False, "asm": True},
    "swapa1": {"path": "mma", "BM": 16, "BN": 64, "BKW": 16, "warps": 4, "split": 1, "swap": True, "asm": True},
    "swapu": {"path": "mma", "BM": 16, "BN": 32, "BKW": 4, "warps": 4, "split": 2, "swap": True, "asm": True,
              "unroll": 4},  # 4 chunks per iteration, the last partly past the program's range
    # large M: the scale inside the dequantized tile, one accumulator (inline PTX on a GPU)
    "gemm": {"path": "gemm", "BM": 16, "BN": 32, "BKW": 4, "warps": 4, "stages": 2, "split": 2},
    "gemm1": {"path": "gemm", "BM": 32, "BN": 16, "BKW": 8, "warps": 4, "stages": 3, "split": 1, "group_m": 2},
    "gemms": {"path": "gemm", "BM": 16, "BN": 32, "BKW": 8, "warps": 4, "stages": 2, "split": 3, "swap": True},
}


def kbuild(spec, p, shape):
    from quantkit.kernels import lowbit

    fmt = format_from_spec(spec)
    b = {"int": lowbit.build_int, "lut": lowbit.build_lut}[spec["type"]]
    return b(fmt, {k: v.to(DEV) for k, v in p.items()}, shape, DEV, impl="k")


def krun(kern, path, x):
    return run_poisoned(kern, KCFG[path], x)


@pytest.mark.parametrize("path,m,bits,g,sym,act,k,dtype", [
    ("gemv", 1, 4, 32, True, False, 200, torch.bfloat16),     # checkpoint view (25 words a row)
    ("gemv", 3, 4, 64, False, False, 264, torch.float16),     # 4 rows of x (one masked), asym
    ("gemv1", 2, 4, 128, False, False, 264, torch.bfloat16),  # partial last group, no split
    ("gemv", 1, 4, None, True, False, 136, torch.bfloat16),   # per channel
    ("gemv", 1, 3, 64, True, False, 200, torch.bfloat16),     # int3: repacked to nibbles
    ("gemv", 2, 4, 32, False, True, 200, torch.bfloat16),     # act-order g_idx: sorted, x permuted
    ("gemv1", 1, 4, 32, True, False, 196, torch.float16),     # 98-byte rows: repacked
    ("swap", 5, 4, 128, False, False, 264, torch.bfloat16),
    ("mma", 19, 4, 64, True, False, 200, torch.float16),      # two row tiles
    ("mma1", 33, 2, 32, False, False, 136, torch.bfloat16),   # int2, grouped order
    ("dq", 7, 4, 32, True, True, 200, torch.bfloat16),
    ("swapa", 1, 4, 128, True, False, 264, torch.bfloat16),   # asm: sym, M = 1 on tensor cores
    ("swapa", 3, 4, 32, False, False, 200, torch.float16),    # asm: asym zeros per group, fp16
    ("swapa", 2, 4, None, False, False, 136, torch.bfloat16),  # asm: per channel, asym
    ("mmaa", 19, 3, 64, True, False, 200, torch.bfloat16),    # asm: int3 repacked, two row tiles
    ("swapa", 5, 4, 32, True, True, 200, torch.float16),      # asm: act-order
    ("swapa1", 9, 4, 128, False, False, 1032, torch.bfloat16),  # asm: the tuned tile shape, odd K
    ("swapu", 3, 4, 32, False, False, 520, torch.bfloat16),   # unrolled chunks (65 words: 17 chunks, split 2)
    ("swapu", 1, 4, 128, True, False, 264, torch.float16),
    ("gemm", 37, 4, 128, True, False, 264, torch.bfloat16),    # gemm: sym, split-K, partial group
    ("gemm1", 70, 4, 32, False, False, 200, torch.float16),    # gemm: g32 (the chunk narrowed to 32 columns), asym
    ("gemms", 21, 4, 64, False, False, 520, torch.bfloat16),   # gemm, W xT, 3-way split
    ("gemm", 19, 4, None, False, False, 136, torch.bfloat16),  # gemm: per channel, asym
    ("gemm1", 40, 3, 64, True, True, 200, torch.bfloat16),     # gemm: int3 repacked, act-order
])
def test_k_int(path, m, bits, g, sym, act, k, dtype):
    n = 40
    spec, p, gidx = make_int(n, k, bits, g, sym, act_order=act, seed=bits * 7 + m)
    kern = kbuild(spec, p, (n, k))
    assert kern is not None and kern.impl == "k"
    assert kern.owns_codes == (bits != 4 or act or (k // 2) % 4 != 0)
    x = rand_x(m, k, dtype, m + k)
    check(krun(kern, path, x), x.double() @ ref_int(p, n, k, bits, gidx, sym).t(), dtype)


@pytest.mark.parametrize("path,m,bits,g,fixed,dtype", [
    ("gemv", 1, 4, None, None, torch.bfloat16),   # any4, per-row table, no scales
    ("gemv", 3, 4, 64, "nf4", torch.bfloat16),    # fixed table, g64
    ("gemv1", 1, 3, 32, None, torch.float16),     # any3 (8-entry tables), repacked
    ("swap", 6, 4, 128, None, torch.float16),     # any4 + group scales, tensor cores
    ("mma", 21, 4, None, None, torch.bfloat16),
    ("dq", 5, 4, None, "fp4", torch.bfloat16),    # fixed table, one scale per row
    ("gemvng", 3, 4, 32, None, torch.bfloat16),    # nibble GEMV + tl.gather
    ("gemv1", 4, 4, 128, None, torch.float16),
    ("swapg", 7, 4, 32, None, torch.bfloat16),
    ("swapa", 1, 4, 128, None, torch.bfloat16),   # asm PRMT lookups: any4 + group scales
    ("swapa", 4, 4, None, None, torch.float16),   # asm: any4 rows, no scales, fp16 planes
    ("mmaa", 20, 4, 64, "nf4", torch.bfloat16),   # asm: one shared table
    ("swapa", 2, 3, 32, None, torch.bfloat16),    # asm: any3 (8 entries) repacked
    ("swapu", 5, 4, 128, None, torch.bfloat16),   # unrolled chunks
    ("gemm", 33, 4, 128, None, torch.bfloat16),   # gemm: any4 + group scales
    ("gemm1", 45, 4, None, None, torch.float16),  # gemm: any4 rows, no scales
    ("gemms", 18, 4, 32, "nf4", torch.bfloat16),  # gemm: one shared table, g32 (chunk narrowed)
    ("gemm1", 23, 3, 24, None, torch.bfloat16),   # gemm: g24 (no power-of-two chunk inside a group: dq)
])
def test_k_lut(path, m, bits, g, fixed, dtype):
    n, k = 24, 200
    spec, p = make_lut(n, k, bits, g, fixed, seed=bits + m)
    kern = kbuild(spec, p, (n, k))
    assert kern is not None and kern.impl == "k"
    x = rand_x(m, k, dtype, m)
    check(krun(kern, path, x), x.double() @ ref_lut(p, n, k, bits, g).t(), dtype)


def test_k_no_second_copy():
    """4-bit rows of a multiple of 4 bytes: the kernel reads the checkpoint tensor itself."""
    spec, p, _ = make_int(16, 256, 4, 128, True)
    pd = {k: v.to(DEV) for k, v in p.items()}
    from quantkit.kernels import lowbit

    kern = lowbit.build_int(format_from_spec(spec), pd, (16, 256), DEV, impl="k")
    assert kern.w.data_ptr() == pd["qweight"].data_ptr() and not kern.owns_codes
    assert kern.s.data_ptr() == pd["scales"].data_ptr()


cuda_only = pytest.mark.skipif(DEV.type != "cuda", reason="needs CUDA (run with QUANTKIT_TEST_CUDA=1)")


@cuda_only
def test_k_asm_is_used_on_cuda():
    spec, p, _ = make_int(64, 256, 4, 128, True)
    kern = kbuild(spec, p, (64, 256))
    assert kern.asm_ok(16, torch.bfloat16) and kern.asm_ok(16, torch.float16)
    assert kern.default_config(16, torch.bfloat16)["asm"] and not kern.asm_ok(16, torch.float32)


@cuda_only
def test_k_quantlinear_all_m(monkeypatch):
    from quantkit.kernels import lowbit

    from quantkit.nn import QuantLinear

    monkeypatch.setattr(lowbit, "IMPL", "k")
    n, k = 96, 520
    spec, p, gidx = make_int(n, k, 4, 64, False, seed=5)
    layer = QuantLinear(k, n, {"format": spec}, {kk: v.to(DEV) for kk, v in p.items()}).to(DEV)
    for m in (1, 2, 3, 4, 7, 16, 40, 64, 100, 130, 700):  # 100: the default large-M GEMM (M bucket 128)
        x = rand_x(m, k, torch.bfloat16, m).to(DEV)
        y = layer(x.view(1, m, k))
        assert layer._kernel is not None and layer._kernel.impl == "k"
        check([y.view(m, n).cpu()], x.double().cpu() @ ref_int(p, n, k, 4, gidx, False).t(), torch.bfloat16)


def test_k_config_falls_back_to_the_reference_format_of_the_shape():
    """NF4 (a shared table) has no tuned entries of its own: it takes the tuned any4 config of the same
    shape, with the chunk narrowed to whole groups for smaller groups; unknown shapes get the default."""
    from quantkit.kernels._launch import tuned

    spec, p = make_lut(24, 256, 4, 64, "nf4", seed=1)
    kern = kbuild(spec, p, (24, 256))
    kern.N, kern.K = 4096, 4096  # a tuned Llama shape (config() only reads the shape)
    ref = tuned(kern.device)["lut4rg128s.k:4096x4096:bf16:m16"]
    got = kern.config(16, torch.bfloat16)
    assert got["path"] == ref["path"] and got.get("BN") == ref.get("BN")
    if ref["path"] == "mma":
        assert got["BKW"] == 8  # g64: 64-column chunks
    kern.N = 4104
    assert kern.config(16, torch.bfloat16) == kern.default_config(16, torch.bfloat16)


def test_k_config_missing_bucket_takes_a_neighbours_tile_config(monkeypatch):
    """A bucket the table lacks (M >= 64) runs the next larger bucket's config, else the next smaller
    one's, never a GEMV; below 64, and with no neighbour, the default."""
    from quantkit.kernels import _launch

    spec, p = make_lut(24, 256, 4, 64, "nf4", seed=1)
    kern = kbuild(spec, p, (24, 256))
    bf = torch.bfloat16
    a, b = {"path": "gemm", "BM": 128, "tag": "a"}, {"path": "gemm", "BM": 64, "tag": "b"}
    table = {kern.key(2048, bf): a, kern.key(512, bf): b, kern.key(64, bf): {"path": "gemv", "tag": "g"}}
    monkeypatch.setattr(_launch, "_TUNED", {"": table})
    monkeypatch.setattr(_launch, "_device_id", lambda device: ("", None))
    assert kern.config(1024, bf)["tag"] == "a"  # the larger neighbour first
    assert kern.config(4096, bf)["tag"] == "a"  # the top bucket: no larger one
    assert kern.config(256, bf)["tag"] == "b"  # 512 (larger)
    del table[kern.key(2048, bf)]
    assert kern.config(1024, bf)["tag"] == "b"  # then the smaller
    assert kern.config(128, bf) == kern.default_config(128, bf)  # 64's GEMV is not a tile config
    table[kern.key(64, bf)] = a
    assert kern.config(32, bf) == kern.default_config(32, bf)  # below 64: no neighbours
    assert kern.config(2048, bf) == kern.default_config(2048, bf)  # neighbours are one bucket away only


def test_tuned_configs_of_the_own_gpu_first_then_the_nearest(tmp_path, monkeypatch):
    """Each GPU's tuned file wins for that GPU; keys it lacks come from the nearest GPU's file (same
    compute capability before others); another GPU never sees a file's entries over its own."""
    import json

    from quantkit.kernels import _launch

    files = {"tuned_h100_80gb_hbm3.json": {"_gpu": "NVIDIA H100 80GB HBM3", "_cc": [9, 0], "a": 1, "b": 1},
             "tuned_h200.json": {"_gpu": "NVIDIA H200", "_cc": [9, 0], "a": 2},
             "tuned_a100_sxm4_80gb.json": {"_gpu": "NVIDIA A100-SXM4-80GB", "_cc": [8, 0], "a": 3, "b": 3, "c": 3}}
    for name, d in files.items():
        (tmp_path / name).write_text(json.dumps(d))
    monkeypatch.setattr(_launch, "_TUNED_DIR", tmp_path)
    monkeypatch.setattr(_launch, "_TUNED", {})
    for gpu, cc, want in (("NVIDIA H200", (9, 0), (2, 1, 3)), ("NVIDIA H100 80GB HBM3", (9, 0), (1, 1, 3)),
                          ("NVIDIA H20", (9, 0), None), ("NVIDIA A100-SXM4-80GB", (8, 0), (3, 3, 3))):
        monkeypatch.setattr(_launch, "_device_id", lambda device, gpu=gpu, cc=cc: (gpu, cc))
        t = _launch.tuned("cuda")
        got = (t["a"], t["b"], t["c"])
        if want is None:  # an unknown Hopper: both Hopper files over the A100's, in file order
            assert got[1] == 1 and got[2] == 3 and got[0] in (1, 2)
        else:
            assert got == want, (gpu, got)
    assert _launch.tuned_file("NVIDIA H100 80GB HBM3").name == "tuned_h100_80gb_hbm3.json"


def test_unknown_implementation_is_one_clear_error():
    from quantkit.kernels import lowbit

    spec, p, _ = make_int(16, 256, 4, 128, True)
    with pytest.raises(ValueError, match="QUANTKIT_LOWBIT"):
        lowbit.build_int(format_from_spec(spec), p, (16, 256), DEV, impl="v2")
