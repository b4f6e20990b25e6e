"""Evaluation speed on CPU: unpack each quantized weight once per evaluation, not once per forward.

On CPU a :class:`quantkit.nn.QuantLinear` computes through its format's plain-PyTorch ``linear``,
which for weight-only formats is ``F.linear(x, unpack(packed))``: the whole model's weights are
unpacked at every forward pass (every perplexity batch, every task batch, every generated token).
:func:`cached_dequant` (quantkit's public API, :func:`quantkit.api.cached_dequant`) unpacks each such
layer once and reuses the result while the context is open, so the numbers are exactly those of the
format's own ``linear`` (same unpack, same matmul). Layers whose format quantizes activations (W8A8,
FP8 activations) and layers on GPU (Triton kernels) are left alone. Memory: one float copy of the
quantized weights.
"""

from __future__ import annotations

from quantkit.api import cached_dequant

__all__ = ["cached_dequant"]
