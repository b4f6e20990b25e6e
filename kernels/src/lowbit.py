"""Builders of the ``int`` (INT2-INT4 affine) and ``lut`` (any4/any3/any2, NF4, FP4) layer kernels.

Two implementations serve these formats:
  * "k" (kernels/src/w4a16.py, the default): on the checkpoint's own K-major layout, no repack, no
    second copy; GEMV, tensor-core and dequantize+cuBLAS paths.
  * "v1" (kernels/src/w4a16_repacked.py): on a block-interleaved repack; the fallback where "k"
    declines a layer (act-order groups that are not contiguous runs after sorting).
Defaults, from the H100 runs of 2026-11-26 (docs/PERFORMANCE.md): "k" for int (faster than v1 at
M <= 64 on every Llama shape but one cell) and for lut (its table lookups in registers, inline-PTX
byte permutes: 2-4x faster than v1's shared-memory lookups). QUANTKIT_LOWBIT=k|v1 forces one.
"""

from __future__ import annotations

import os

import torch

from . import register_kernel, w4a16, w4a16_repacked

IMPL = os.environ.get("QUANTKIT_LOWBIT")
DEFAULT_IMPL = {"int": "k", "lut": "k"}


def _impl(impl, ftype: str = "int"):
    name = (impl or IMPL or DEFAULT_IMPL[ftype]).lower()
    if name not in ("k", "v1"):
        raise ValueError(f"unknown int/lut kernel implementation {name!r} (impl= or $QUANTKIT_LOWBIT): "
                         "use 'k' (the default) or 'v1'")
    return name


@register_kernel("int")
def build_int(fmt, packed, shape, device, impl: str | None = None):
    bits = fmt.cfg.bits
    sym = fmt.cfg.sym
    tag = f"int{bits}{'' if sym else 'a'}g{fmt.group_size or 0}"
    if packed.get("scales") is None:
        return None
    zc = float(1 << (bits - 1)) if sym else 0.0
    if _impl(impl, "int") == "k":
        k = w4a16.build(0, fmt, packed, shape, device, bits, not sym, zc, None, False, tag)
        if k is not None:
            return k
    return w4a16_repacked.build(0, fmt, packed, shape, device, bits, not sym, zc, None, False, tag)


@register_kernel("lut")
def build_lut(fmt, packed, shape, device, impl: str | None = None):
    bits = fmt.cfg.bits
    rows = packed["lut"].shape[0]
    tag = f"lut{bits}{'r' if rows > 1 else 'f'}g{fmt.group_size or 0}{'s' if 'scales' in packed else ''}"
    if _impl(impl, "lut") == "k":
        k = w4a16.build(1, fmt, packed, shape, device, bits, False, 0.0, packed["lut"], rows > 1, tag)
        if k is not None:
            return k
    lut = packed["lut"].float()
    lt = torch.zeros(16, rows, dtype=torch.float32, device=lut.device)
    lt[: lut.shape[1]] = lut.t()
    lt = lt.contiguous()
    return w4a16_repacked.build(1, fmt, packed, shape, device, bits, False, 0.0, lt, rows > 1, tag)
