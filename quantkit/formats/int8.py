"""INT8 W8A8: int8 symmetric per-channel weights and int8 activations (dynamic per token or static).

Weights are the ``int`` format with bits 8, symmetric, one group per row: stored exactly as the
``int`` layout (``qweight`` uint8 [out, in] holding q = w_int8 + 128, ``scales`` fp16 [out, 1]),
and rounded by :class:`quantkit.formats.int.IntFormat`'s own math (this class subclasses it).

Activations: ``dynamic`` — each token's row x is scaled by s_x = max|x| / 127 and rounded to
integers in [-127, 127]; ``static`` — one scale s_x = (max |x| over the calibration set) / 127,
stored as ``input_scale`` fp32 [1, 1] (the same key as the fp8 layout), larger values saturate at
±127. The CPU/reference ``linear`` simulates the integer matmul in float:
``y = (x_int @ (q - 128)^T) * s_x * s_w^T``.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import model_validator

from ..errors import CheckpointError
from ..registry import register
from .base import expect, static_input_scale
from .int import _DTYPES as _SDT
from .int import IntConfig, IntFormat
from .packing import unpack_codes

INT8_ACT_MAX = 127.0


def quantize_activations_int8(x: torch.Tensor, input_scale: torch.Tensor | None = None
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(integer-valued float32 activations in [-127, 127], fp32 scale) for x [..., in]: per token
    when ``input_scale`` is None (scale [..., 1]), else the static scale ([1, 1])."""
    xf = x.float()
    if input_scale is None:
        s = xf.abs().amax(dim=-1, keepdim=True) / INT8_ACT_MAX
        s = torch.where(s > 0, s, torch.ones_like(s))
    else:
        s = input_scale.float().reshape(1, 1)
    return torch.round(xf / s).clamp(-INT8_ACT_MAX, INT8_ACT_MAX), s


class Int8A8Config(IntConfig):
    type: Literal["int8a8"] = "int8a8"
    bits: int = 8
    sym: bool = True
    group_size: int | None = None
    activations: Literal["dynamic", "static"] = "dynamic"

    @model_validator(mode="after")
    def _check(self):
        if self.bits != 8 or not self.sym or (self.group_size is not None and self.group_size > 0):
            raise ValueError(f"int8a8 weights are 8-bit, symmetric, per channel: use bits: 8, sym: true, "
                             f"group_size: null (got bits {self.bits}, sym {self.sym}, "
                             f"group_size {self.group_size})")
        self.group_size = None
        return self


@register("format", "int8a8")
class Int8A8Format(IntFormat):
    Config = Int8A8Config
    cfg: Int8A8Config

    def describe(self) -> str:
        return f"int8-w8a8-{'dyn' if self.cfg.activations == 'dynamic' else 'static'}"

    @property
    def needs_calibration(self) -> bool:
        return self.cfg.activations == "static" or super().needs_calibration

    def affine_maxq(self) -> None:
        # the grid is int's, but GPTQ's Triton loop (close to, not bit-equal with, the PyTorch loop) was
        # only ever used and measured for the weight-only int format: int8a8 keeps the PyTorch loop
        return None

    def begin_layer(self, w, col_weight, stats=None):
        if self.cfg.activations != "static":
            return {}
        return static_input_scale(self.describe(), stats, INT8_ACT_MAX, w.device)

    def pack(self, codes, layer, groups, g_idx):
        out = super().pack(codes, layer, groups, g_idx)
        if self.cfg.activations == "static":
            out["input_scale"] = layer["input_scale"].to(torch.float32).reshape(1, 1).contiguous()
        return out

    def _input_scale(self, packed, shape):
        what = f"{self.describe()} weight {tuple(shape)}"
        if self.cfg.activations == "static":
            xs = expect(packed, "input_scale", (1, 1), torch.float32, what)
            if not (torch.isfinite(xs).all() and float(xs) > 0):
                raise CheckpointError(f"{what}: input_scale must be a positive finite number, got {float(xs)}")
            return xs
        if "input_scale" in packed:
            raise CheckpointError(f"{what}: input_scale is stored but the format's activations are dynamic; "
                                  f"the checkpoint and its format spec disagree")
        return None

    def unpack(self, packed, shape):
        self._input_scale(packed, shape)
        return super().unpack(packed, shape)

    def linear(self, x, packed, shape):
        rows, cols = shape
        xs = self._input_scale(packed, shape)
        what = f"{self.describe()} weight {tuple(shape)}"
        qw = expect(packed, "qweight", (rows, cols), torch.uint8, what)
        sw = expect(packed, "scales", (rows, 1), _SDT[self.cfg.scale_dtype], what).float().reshape(1, -1)
        wq = unpack_codes(qw, 8, cols).float() - 128.0
        xq, sx = quantize_activations_int8(x, xs)
        y = torch.nn.functional.linear(xq, wq) * sx * sw
        return y.to(x.dtype)


__all__ = ["INT8_ACT_MAX", "Int8A8Config", "Int8A8Format", "quantize_activations_int8"]
