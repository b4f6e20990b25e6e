"""FP8 weights (E4M3 / E5M2) with per-channel or per-tensor scales, and optional FP8 activations.

Layout ``fp8`` (docs/FORMAT.md): ``weight`` float8 [out, in] = w / s, ``weight_scale`` fp32
[out, 1] (``weight_scale: channel``) or [1, 1] (``tensor``), ``input_scale`` fp32 [1, 1] only
for static activation quantization. w = weight.float() * weight_scale.

Encoding is round-to-nearest-even with **saturation**: values beyond the largest finite FP8 value
(448 for E4M3, 57344 for E5M2), and ±inf, become ± that value; NaN stays NaN. (PyTorch's cast
alone saturates E4M3 but overflows E5M2 to inf, so the clamp is explicit.) Weight scales are
s = max|w| / fmax per row (or over the tensor), so weights never saturate.

Activations (``activations``): ``none`` (W8A16: only the weights are FP8), ``dynamic`` (each
token's row scaled by its own max|x| / fmax at run time) or ``static`` (one scale, max|x| over the
calibration set / fmax, stored as ``input_scale``; larger activations saturate). The CPU/reference
``linear`` simulates the W8A8 matmul in plain PyTorch: quantize x to FP8 and back, multiply the
FP8 values in float32 and apply the scales afterwards, ``y = (x_q @ w_q^T) * s_x * s_w^T`` — the
same math as ``torch._scaled_mm`` with row-wise scales. ``act_dtype`` picks the activations' FP8
encoding (default: the weights'). GPTQ works too: its "codes" are the FP8 bit patterns.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import model_validator

from ..errors import CheckpointError
from ..registry import register
from .base import FormatConfig, WeightFormat, expect, static_input_scale

FP8_DTYPES = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
FP8_MAX = {"e4m3": 448.0, "e5m2": 57344.0}


def fp8_quantize(x: torch.Tensor, kind: str) -> torch.Tensor:
    """Saturating round-to-nearest-even cast of a float tensor to FP8 (``kind`` e4m3 or e5m2)."""
    m = FP8_MAX[kind]
    return x.float().clamp(-m, m).to(FP8_DTYPES[kind])  # clamp keeps NaN, maps ±inf to ±max


def fp8_codes(q: torch.Tensor) -> torch.Tensor:
    """The bit patterns (0..255, int32) of an FP8 tensor."""
    return q.view(torch.uint8).to(torch.int32)


def fp8_from_codes(codes: torch.Tensor, kind: str) -> torch.Tensor:
    return codes.to(torch.uint8).view(FP8_DTYPES[kind])


def quantize_activations_fp8(x: torch.Tensor, kind: str, input_scale: torch.Tensor | None = None
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(FP8 activations, fp32 scale) for x [..., in]: per-token dynamic when ``input_scale`` is None
    (scale [..., 1]), else the static scale (broadcast, [1, 1])."""
    xf = x.float()
    if input_scale is None:
        s = xf.abs().amax(dim=-1, keepdim=True) / FP8_MAX[kind]
        s = torch.where(s > 0, s, torch.ones_like(s))
    else:
        s = input_scale.float().reshape(1, 1)
    return fp8_quantize(xf / s, kind), s


class FP8Config(FormatConfig):
    type: Literal["fp8"] = "fp8"
    dtype: Literal["e4m3", "e5m2"] = "e4m3"
    weight_scale: Literal["channel", "tensor"] = "channel"
    activations: Literal["none", "dynamic", "static"] = "dynamic"
    act_dtype: Literal["e4m3", "e5m2"] | None = None  # None: the same as ``dtype``
    group_size: int | None = None

    @model_validator(mode="after")
    def _check(self):
        if self.group_size is not None and self.group_size > 0:
            raise ValueError(f"fp8 has per-channel or per-tensor scales, not groups; remove group_size "
                             f"(got {self.group_size}) and use weight_scale: channel or tensor")
        self.group_size = None
        return self

    @property
    def act_kind(self) -> str:
        return self.act_dtype or self.dtype


@register("format", "fp8")
class FP8Format(WeightFormat):
    Config = FP8Config
    cfg: FP8Config

    def row_tensors(self) -> frozenset[str] | None:
        if self.cfg.weight_scale == "tensor":  # one scale from every row: no row ranges
            return None
        return frozenset({"weight", "weight_scale"})  # input_scale is per layer

    def describe(self) -> str:
        a = {"none": "a16", "dynamic": "a8-dyn", "static": "a8-static"}[self.cfg.activations]
        return f"fp8-{self.cfg.dtype}-{self.cfg.weight_scale}-w8{a}"

    @property
    def fmax(self) -> float:
        return FP8_MAX[self.cfg.dtype]

    @property
    def needs_calibration(self) -> bool:
        return self.cfg.activations == "static"

    # ---- rounding -------------------------------------------------------------------------
    def begin_layer(self, w, col_weight, stats=None):
        if self.cfg.activations != "static":
            return {}
        return static_input_scale(self.describe(), stats, FP8_MAX[self.cfg.act_kind], w.device)

    def fit_group(self, w, col_weight, layer):
        w = w.float()
        if self.cfg.weight_scale == "channel":
            amax = w.abs().amax(dim=1, keepdim=True)
        else:
            amax = w.abs().amax().reshape(1, 1)
        s = amax / self.fmax
        return {"scale": torch.where(s > 0, s, torch.ones_like(s))}

    def quantize(self, w, params, layer):
        s = params["scale"]
        q = fp8_quantize(w.float() / s, self.cfg.dtype)
        return fp8_codes(q), q.float() * s

    # ---- storage --------------------------------------------------------------------------
    def pack(self, codes, layer, groups, g_idx):
        out = {"weight": fp8_from_codes(codes, self.cfg.dtype).contiguous(),
               "weight_scale": groups[0]["scale"].to(torch.float32).contiguous()}
        if self.cfg.activations == "static":
            out["input_scale"] = layer["input_scale"].to(torch.float32).reshape(1, 1).contiguous()
        return out

    def _check(self, packed, shape):
        rows, cols = shape
        what = f"{self.describe()} weight {tuple(shape)}"
        w = expect(packed, "weight", (rows, cols), FP8_DTYPES[self.cfg.dtype], what)
        srows = rows if self.cfg.weight_scale == "channel" else 1
        s = expect(packed, "weight_scale", (srows, 1), torch.float32, what)
        xs = None
        if self.cfg.activations == "static":
            xs = expect(packed, "input_scale", (1, 1), torch.float32, what)
            if not (torch.isfinite(xs).all() and float(xs) > 0):
                raise CheckpointError(f"{what}: input_scale must be a positive finite number, got {float(xs)}")
        elif "input_scale" in packed:
            raise CheckpointError(f"{what}: input_scale is stored but the format's activations are "
                                  f"'{self.cfg.activations}'; the checkpoint and its format spec disagree")
        return w, s, xs

    def unpack(self, packed, shape):
        w, s, _ = self._check(packed, shape)
        return w.float() * s

    def linear(self, x, packed, shape):
        if self.cfg.activations == "none":
            return torch.nn.functional.linear(x, self.unpack(packed, shape).to(x.dtype))
        w, sw, xs = self._check(packed, shape)
        xq, sx = quantize_activations_fp8(x, self.cfg.act_kind, xs)
        y = torch.nn.functional.linear(xq.float(), w.float())
        y = y * sx * sw.reshape(1, -1)
        return y.to(x.dtype)


__all__ = [
    "FP8_DTYPES",
    "FP8_MAX",
    "FP8Config",
    "FP8Format",
    "fp8_codes",
    "fp8_from_codes",
    "fp8_quantize",
    "quantize_activations_fp8",
]
