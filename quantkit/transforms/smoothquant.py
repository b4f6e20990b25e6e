"""SmoothQuant (Xiao et al., 2023): move activation outliers into the weights before quantizing.

For one linear layer with calibration statistics, per input column j::

    s_j = max|x_j|^alpha / max_r |W[r, j]|^(1 - alpha)

The weight's columns are multiplied by s (W' = W diag(s)) and the layer's input is divided by s at
run time (x' = x / s), so x' W'^T = x W^T exactly in float while the activations' per-channel
range is evened out (what per-token INT8/FP8 activation quantization needs). The statistics the
quantizer sees are adjusted to the smoothed input: Hessian H' = diag(1/s) H diag(1/s),
Σx'^2 = Σx^2 / s^2, max|x'| = max|x| / s. Columns that never see an activation (or whose weights
are all zero) keep s = 1. s is rounded to fp16 before use and stored as ``smooth.scales``
(fp16 [in]) so the reloaded model divides by exactly the values the weights were multiplied by.

Unlike the original (which folds 1/s into the preceding LayerNorm), each smoothed layer applies
its own division at run time; the cost is one elementwise op per layer and no model surgery.
Recipe: ``transforms: [{type: smoothquant, alpha: 0.5}]``.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from ..errors import CheckpointError, NumericalError
from ..quantizers.base import LayerStats
from ..registry import register
from .base import LayerContext, PluginConfig, Transform

KEY = "smooth.scales"


class SmoothQuantConfig(PluginConfig):
    alpha: float = Field(0.5, ge=0.0, le=1.0)


def smoothing_scales(act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """s_j = max|x_j|^alpha / max|W[:, j]|^(1-alpha), fp16-representable, 1 where undefined."""
    a = act_absmax.float()
    wmax = weight.float().abs().amax(dim=0)
    s = a.clamp_min(1e-12).pow(alpha) / wmax.clamp_min(1e-12).pow(1 - alpha)
    ok = (a > 0) & (wmax > 0) & torch.isfinite(s)
    s = torch.where(ok, s, torch.ones_like(s))
    # keep s inside fp16's normal range so that 1/s and W*s stay finite and s survives storage
    s = s.clamp(2.0 ** -14, 65504.0).to(torch.float16).float()
    return s


def smooth_stats(stats: LayerStats, s: torch.Tensor) -> LayerStats:
    """Statistics of x / s (a new object: the input owner's statistics may be shared)."""
    inv = 1.0 / s
    h = None if stats.hessian is None else stats.hessian * inv.unsqueeze(1) * inv.unsqueeze(0)
    sq = None if stats.act_sqsum is None else stats.act_sqsum * inv.pow(2)
    am = None if stats.act_absmax is None else stats.act_absmax / s
    return LayerStats(stats.nsamples, h, sq, am)


@register("transform", "smoothquant")
class SmoothQuant(Transform):
    Config = SmoothQuantConfig
    cfg: SmoothQuantConfig

    def before(self, ctx: LayerContext) -> None:
        st = ctx.stats
        if st is None or st.act_absmax is None or st.nsamples == 0:
            raise NumericalError(f"{ctx.name}: smoothquant needs calibration statistics (max |x| per input "
                                 f"column) and got none; run it with calibration data")
        s = smoothing_scales(st.act_absmax.to(ctx.weight.device), ctx.weight, self.cfg.alpha)
        ctx.weight = ctx.weight * s.unsqueeze(0)
        ctx.stats = smooth_stats(st, s.to(st.act_absmax.device))
        ctx.add_tensor(KEY, s.to(torch.float16))
        ctx.runtime.append({"type": "smoothquant", "alpha": self.cfg.alpha, "key": KEY})

    @classmethod
    def runtime(cls, spec: dict[str, Any], layer: torch.nn.Module):
        key = spec.get("key", KEY)
        buf = key.replace(".", "__")
        t = getattr(layer, buf, None)
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"smoothquant: the layer stores no '{key}' tensor; the checkpoint is incomplete")
        if t.dim() != 1 or t.numel() != layer.in_features:
            raise CheckpointError(f"smoothquant: '{key}' has shape {tuple(t.shape)}, expected "
                                  f"[{layer.in_features}] (one scale per input column)")
        # look the buffer up at call time: .to(device) replaces buffers
        def pre(x: torch.Tensor) -> torch.Tensor:
            return x / getattr(layer, buf).to(x.dtype)

        return pre, None


__all__ = ["SmoothQuant", "SmoothQuantConfig", "smoothing_scales", "smooth_stats"]
