"""Triton kernels behind :class:`quantkit.nn.QuantLinear` on GPU.

``find_kernel(fmt, packed, shape, device)`` returns a callable ``x -> x @ W^T`` for the layer, or
None when no kernel serves this format/device (the layer then falls back to plain PyTorch).
Each kernel module registers a builder with :func:`register_kernel`; modules are imported lazily
so that CPU-only installs never import Triton.

Modules: ``lowbit`` registers the int2-int4 and lut builders; they pick ``w4a16`` (the default: the
checkpoint's own layout, split-K GEMV, tensor-core GEMM, dequantize+cuBLAS; Triton code in
``w4a16_jit``, inline-PTX dequant in ``_ptx``) or ``w4a16_repacked`` (a block-interleaved repack).
``fp8`` (W8A8 with a fused activation-quant kernel + ``torch._scaled_mm`` or a Triton FP8 dot;
W8A16). ``moe_w4a16`` is not a layer kernel: the grouped W4A16 GEMM over stacked experts that
``quantkit.moe.fused`` calls (docs/MOE.md). Every layer kernel follows ``base.LayerKernel`` (key,
config, plan per M bucket, call): it
picks a plan per power-of-two M bucket from the tuned configs of its GPU (``tuned_<gpu>.json``,
written by bench/kernel_bench.py --tune; the nearest GPU's where its own has none) or a heuristic.
See docs/PERFORMANCE.md.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable

import torch

_BUILDERS: list[tuple[str, Callable]] = []
_SCANNED = False


def register_kernel(format_type: str):
    def deco(fn):
        _BUILDERS.append((format_type, fn))
        return fn
    return deco


def _scan() -> None:
    global _SCANNED
    if _SCANNED:
        return
    _SCANNED = True
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_") or info.name.startswith("bench"):
            continue
        try:
            importlib.import_module(f"{__name__}.{info.name}")
        except ImportError:  # Triton missing: CPU fallback everywhere
            pass


def find_kernel(fmt, packed: dict[str, torch.Tensor], shape: tuple[int, int], device: torch.device):
    if device.type != "cuda":
        return None
    _scan()
    for ftype, builder in _BUILDERS:
        if ftype == fmt.cfg.type:
            k = builder(fmt, packed, shape, device)
            if k is not None:
                return k
    return None
