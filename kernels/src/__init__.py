"""Triton kernels behind :class:`quantkit.nn.QuantLinear` on GPU.

``find_kernel(fmt, packed, shape, device)`` returns a callable ``x -> x @ W^T`` for the layer, or
None when no kernel serves this format/device (the layer then falls back to plain PyTorch).
Each kernel module registers a builder with :func:`register_kernel`; modules are imported lazily
so that CPU-only installs never import Triton.

Modules: ``lowbit`` (int2-int4 and lut formats: split-K GEMV, tensor-core GEMM, dequantize+cuBLAS;
its builders pick ``_kmajor``, the "k" kernels on the checkpoint's own layout, by default, with the
inline-PTX dequant of ``_ptx``),
``fp8`` (W8A8 with a fused activation-quant kernel + ``torch._scaled_mm`` or a Triton FP8 dot;
W8A16). Builders repack once; the returned callable picks a plan per power-of-two M bucket from
``tuned_hopper.json`` (bench/kernels.py --tune) or a heuristic. See docs/PERFORMANCE.md.
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
