"""Evaluation speed on CPU: unpack each quantized weight once per evaluation, not once per forward.

On CPU a :class:`quantkit.nn.QuantLinear` computes through its format's plain-PyTorch ``linear``,
which for weight-only formats is ``F.linear(x, unpack(packed))``: the whole model's weights are
unpacked at every forward pass (every perplexity batch, every task batch, every generated token).
:func:`cached_dequant` unpacks each such layer once and reuses the result while the context is
open, so the numbers are exactly those of the format's own ``linear`` (same unpack, same matmul).
Layers whose format overrides ``linear`` (activation quantization: W8A8, FP8 activations) and
layers on GPU (Triton kernels) are left alone. Memory: one float copy of the quantized weights.
"""

from __future__ import annotations

import contextlib

import torch


class _CachedFormat:
    """Stands in for a layer's format: the same object in every respect but ``linear``."""

    def __init__(self, fmt, weight: torch.Tensor):
        self._fmt = fmt
        self._w = weight

    def linear(self, x, packed, shape):
        return torch.nn.functional.linear(x, self._w.to(x.dtype))

    def __getattr__(self, name):
        return getattr(self._fmt, name)


@contextlib.contextmanager
def cached_dequant(model):
    """While open, CPU weight-only quantized linears reuse one unpacked weight; yields how many."""
    from quantkit.formats.base import WeightFormat
    from quantkit.nn import QuantLinear

    patched = []
    try:
        with torch.no_grad():
            for m in model.modules():
                if not isinstance(m, QuantLinear) or isinstance(m.fmt, _CachedFormat):
                    continue
                if type(m.fmt).linear is not WeightFormat.linear:
                    continue
                if any(t.device.type != "cpu" for t in m.packed.values()):
                    continue
                orig = m.fmt
                m.fmt = _CachedFormat(orig, m.dequantized_weight())
                patched.append((m, orig))
        yield len(patched)
    finally:
        for m, orig in patched:
            m.fmt = orig
