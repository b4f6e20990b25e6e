"""Norm tweaking (Li et al., 2023, "Norm Tweaking: High-performance Low-bit Quantization of Large
Language Models") as a block plugin — written here from the paper.

After a decoder block's linears are quantized, the weights of the block's normalization layers
(every submodule whose class name ends in one of ``norm_suffixes`` — ``RMSNorm``, ``LayerNorm`` —
and that has a floating ``weight``) are trained so that the quantized block's output distribution
matches the float block's on the calibration inputs. Loss (``loss: dist``, the paper's
channel-wise distribution distance), over the tokens of a step::

    L = 1/C Σ_c ( |μ_f[c] − μ_q[c]| + |σ²_f[c] − σ²_q[c]| )

(``loss: mse`` uses the plain mean squared output error instead; on smollm2-135m it gave the lower
perplexity, see docs/quality/lowbit.md, so the built-in recipes use it). Adam, a few steps:
``epochs`` passes over the calibration sequences, ``micro_batch`` sequences per step. Each learning rate of
``lrs`` is tried from the same start; the one whose block output error on the calibration inputs
(``Σ‖out_q − out_f‖² / Σ‖out_f‖²``) is lowest is kept, and the untweaked weights are kept if no
learning rate lowers it (so the plugin never makes the block worse on its calibration data).

The tweaked weights are ordinary parameters of the model: the checkpoint stores them as it
stores every float tensor. The linears are untouched.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from pydantic import Field

from ..registry import register
from .base import BlockPlugin, PluginConfig


class NormTweakConfig(PluginConfig):
    lrs: list[float] = Field(default_factory=lambda: [1e-3, 3e-3])
    epochs: int = Field(2, ge=1)
    micro_batch: int = Field(1, ge=1)  # sequences per Adam step (when the batch can be split)
    loss: Literal["dist", "mse"] = "dist"
    norm_suffixes: list[str] = Field(default_factory=lambda: ["Norm"])
    tweak_bias: bool = False  # also train LayerNorm biases
    max_steps: int | None = Field(None, ge=1)  # cap on Adam steps per learning rate


def find_norms(block: torch.nn.Module, suffixes: list[str]) -> dict[str, torch.nn.Module]:
    """Normalization submodules of ``block`` with a floating ``weight`` parameter."""
    out = {}
    for name, m in block.named_modules():
        w = getattr(m, "weight", None)
        if any(type(m).__name__.endswith(s) for s in suffixes) and isinstance(w, torch.nn.Parameter) \
                and w.dtype.is_floating_point:
            out[name] = m
    return out


def dist_loss(q: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Channel-wise distribution distance: mean over channels of |Δmean| + |Δvariance| (over tokens)."""
    q = q.reshape(-1, q.shape[-1]).float()
    f = f.reshape(-1, f.shape[-1]).float()
    mq, mf = q.mean(0), f.mean(0)
    vq, vf = q.var(0, unbiased=False), f.var(0, unbiased=False)
    return ((mq - mf).abs() + (vq - vf).abs()).mean()


def _slice_tree(obj: Any, s: int, e: int, batch: int) -> Any:
    """Slice every tensor whose first axis is the batch axis; leave broadcast (size-1) ones alone."""
    if isinstance(obj, torch.Tensor):
        return obj[s:e] if obj.dim() > 0 and obj.shape[0] == batch else obj
    if isinstance(obj, tuple):
        return tuple(_slice_tree(o, s, e, batch) for o in obj)
    if isinstance(obj, list):
        return [_slice_tree(o, s, e, batch) for o in obj]
    if isinstance(obj, dict):
        return {k: _slice_tree(v, s, e, batch) for k, v in obj.items()}
    return obj


@register("block_plugin", "norm_tweak")
class NormTweak(BlockPlugin):
    Config = NormTweakConfig
    cfg: NormTweakConfig

    def _params(self, norms: dict[str, torch.nn.Module]) -> list[torch.nn.Parameter]:
        ps = []
        for m in norms.values():
            ps.append(m.weight)
            b = getattr(m, "bias", None)
            if self.cfg.tweak_bias and isinstance(b, torch.nn.Parameter):
                ps.append(b)
        return ps

    def _steps(self, inputs, kwargs, float_outputs):
        """(hidden, kwargs, target) per Adam step: each batch split into micro-batches."""
        mb = self.cfg.micro_batch
        for h, kw, f in zip(inputs, kwargs, float_outputs):
            b = h.shape[0]
            if b <= mb:
                yield h, kw, f
                continue
            for s in range(0, b, mb):
                e = min(s + mb, b)
                yield h[s:e], _slice_tree(kw, s, e, b), f[s:e]

    @staticmethod
    def _block_error(block, inputs, kwargs, float_outputs, forward, device) -> float:
        num = den = 0.0
        with torch.no_grad():
            for h, kw, f in zip(inputs, kwargs, float_outputs):
                out = forward(block, h.to(device), kw).float()
                ref = f.to(device).float()
                num += float((out - ref).pow(2).sum())
                den += float(ref.pow(2).sum())
        return num / max(den, 1e-30)

    def after_block(self, block: torch.nn.Module, inputs: list[torch.Tensor], kwargs: list[dict],
                    float_outputs: list[torch.Tensor], forward: Callable) -> dict[str, float]:
        norms = find_norms(block, self.cfg.norm_suffixes)
        params = self._params(norms)
        if not params or not inputs:
            return {"norm_tweak_norms": 0.0}
        device = params[0].device
        start = [p.detach().clone() for p in params]
        flags = {id(p): p.requires_grad for p in block.parameters()}
        for p in block.parameters():
            p.requires_grad_(False)
        before = self._block_error(block, inputs, kwargs, float_outputs, forward, device)
        best_err, best_lr, best_state = before, 0.0, [t.clone() for t in start]
        try:
            for lr in self.cfg.lrs:
                with torch.no_grad():
                    for p, t in zip(params, start):
                        p.copy_(t)
                for p in params:
                    p.requires_grad_(True)
                opt = torch.optim.Adam(params, lr=lr)
                n = 0
                with torch.enable_grad():
                    for _ in range(self.cfg.epochs):
                        for h, kw, f in self._steps(inputs, kwargs, float_outputs):
                            if self.cfg.max_steps is not None and n >= self.cfg.max_steps:
                                break
                            out = forward(block, h.to(device), kw)
                            ref = f.to(device)
                            if self.cfg.loss == "dist":
                                loss = dist_loss(out, ref)
                            else:
                                loss = (out.float() - ref.float()).pow(2).mean()
                            opt.zero_grad(set_to_none=True)
                            loss.backward()
                            opt.step()
                            n += 1
                for p in params:
                    p.requires_grad_(False)
                if not all(torch.isfinite(p).all() for p in params):
                    continue
                err = self._block_error(block, inputs, kwargs, float_outputs, forward, device)
                if err < best_err:
                    best_err, best_lr, best_state = err, lr, [p.detach().clone() for p in params]
        finally:
            with torch.no_grad():
                for p, t in zip(params, best_state):
                    p.copy_(t)
            for p in block.parameters():
                p.requires_grad_(flags.get(id(p), False))
        return {"norm_tweak_lr": float(best_lr), "norm_tweak_err_before": before,
                "norm_tweak_err_after": best_err, "norm_tweak_norms": float(len(norms))}


__all__ = ["NormTweak", "NormTweakConfig", "find_norms", "dist_loss"]
