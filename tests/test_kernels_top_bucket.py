# ruff: noqa: I001 - kernel_ref must be imported first: it selects Triton's interpreter before Triton loads
"""Split-K plans of the top M bucket. A plan is made per power-of-two bucket of M, and the last
bucket (``_launch.TOP_BUCKET``, 4096) holds every larger M too: a tiled split-K plan must size its
partial-sum workspace and tile counters for the M it runs, not for the bucket it was made for (at
M = 8192 on an H100 the buffers of the 4096 plan were overrun: an illegal memory access, or wrong
sums where the overrun landed in memory of ours). Here the top bucket is lowered to 16 rows so the
interpreter runs the same situation on small sizes: every tiled split-K path (the default int/LUT
kernels' mma and gemm paths, the v1 kernels' post path, FP8's gemm) against a float64 reference,
and the shared workspace must have grown to the tiles actually run."""

from __future__ import annotations

from kernel_ref import DEV, check, make_int, rand_x, ref_int, run_poisoned  # noqa: I001

import pytest
import torch

pytest.importorskip("triton")

from quantkit.formats.base import format_from_spec

TOP = 16


@pytest.fixture
def low_top(monkeypatch):
    from quantkit import kernels

    kernels._scan()
    from quantkit.kernels import _launch, w4a16

    monkeypatch.setattr(_launch, "TOP_BUCKET", TOP)
    monkeypatch.setattr(w4a16, "TOP_BUCKET", TOP)
    monkeypatch.setattr(_launch, "_WS", {})  # a fresh (small) shared workspace for this test
    monkeypatch.setattr(_launch, "_WS_OLD", [])
    assert _launch.m_bucket(4 * TOP) == TOP
    return _launch


def _grown(launch, tiles, split, tile_elems):
    part, cnt = launch._WS[(DEV.type, DEV.index)]
    assert part.numel() >= tiles * split * tile_elems and cnt.numel() >= tiles, (part.numel(), cnt.numel())


@pytest.mark.parametrize("impl,cfg", [
    ("k", {"path": "mma", "BM": 16, "BN": 16, "BKW": 4, "warps": 4, "split": 2, "swap": False}),
    ("k", {"path": "gemm", "BM": 16, "BN": 16, "BKW": 4, "warps": 4, "stages": 2, "split": 2}),
    ("v1", {"path": "post", "BM": 16, "BN": 16, "warps": 4, "stages": 2, "split": 2}),
])
def test_int_split_k_above_top_bucket(low_top, impl, cfg):
    from quantkit.kernels import lowbit

    n, k, m = 24, 264, 3 * TOP + 5  # four row tiles of 16 from a plan made for the 16-row bucket
    spec, p, gidx = make_int(n, k, 4, 64, False, seed=11)
    kern = lowbit.build_int(format_from_spec(spec), {q: v.to(DEV) for q, v in p.items()}, (n, k), DEV, impl=impl)
    x = rand_x(m, k, torch.bfloat16, 5)
    check(run_poisoned(kern, cfg, x), x.double() @ ref_int(p, n, k, 4, gidx, False).t(), torch.bfloat16)
    _grown(low_top, -(-m // 16) * -(-n // 16), 2, 16 * 16)


def test_fp8_split_k_above_top_bucket(low_top):
    from quantkit.kernels import fp8

    n, k, m = 24, 256, 2 * TOP + 3
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(n, k, generator=gen) * 0.05
    s = w.abs().amax(1, keepdim=True) / 448.0
    p = {"weight": (w / s).clamp(-448, 448).to(torch.float8_e4m3fn), "weight_scale": s.float()}
    spec = {"type": "fp8", "dtype": "e4m3", "weight_scale": "channel", "activations": "none"}
    kern = fp8.build_fp8(format_from_spec(spec), {q: v.to(DEV) for q, v in p.items()}, (n, k), DEV)
    cfg = {"path": "gemm", "BM": 16, "BN": 16, "BK": 64, "warps": 4, "stages": 2, "split": 2}
    x = rand_x(m, k, torch.bfloat16, 3)
    ref = x.double() @ (p["weight"].double() * p["weight_scale"].double()).t()
    check(run_poisoned(kern, cfg, x), ref, torch.bfloat16)
    _grown(low_top, -(-m // 16) * -(-n // 16), 2, 16 * 16)
