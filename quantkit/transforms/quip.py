"""QuIP incoherence processing (Chee et al., 2023; random Hadamard variant as in QuIP#, Tseng et al.,
2024 — written here from the papers, no code taken).

For a linear ``y = W x`` (W: [out, in]) pick random orthogonal U = T_out·diag(s_u) and
V = T_in·diag(s_v), with T a fast Hadamard-type transform (:mod:`.hadamard`, any size, no padding)
and s random ±1 vectors from a seed. The quantizer then sees

    W' = U W Vᵀ          and the Hessian   H' = V H Vᵀ

(``H = Σ x xᵀ``; the rotated inputs are ``V x``), so its weights and Hessian are incoherent:
outliers are spread across all entries. GPTQ given H' is LDLQ (adaptive rounding on the LDL
factor of H'); RTN rounds W' directly. Either way the quantizer is unchanged: QuIP composes with it.

Stored per layer: ``quip.su`` and ``quip.sv``, the sign vectors bit-packed (uint8 [ceil(n/8)]),
and in the layer spec the Hadamard plans (``{"n", "m", "kind"}``). At run time, since
``y = Uᵀ (W' (V x))``, the quantized layer applies ``pre: x -> V x = T_in(s_v ⊙ x)`` before its
matmul and ``post: y -> Uᵀ y = s_u ⊙ T_outᵀ y`` after it (before the bias) — fast transforms, never
a dense matrix.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable
from typing import Any

import torch
from pydantic import Field

from ..errors import CheckpointError
from ..registry import register
from .base import LayerContext, PluginConfig, Transform
from .hadamard import HadamardPlan, hadamard_transform, pack_signs, plan, random_signs, unpack_signs


class QuIPConfig(PluginConfig):
    seed: int = Field(0, description="base seed of the random sign vectors (mixed with block and layer name)")
    rotate_in: bool = True  # V on the input side (x -> V x at run time)
    rotate_out: bool = True  # U on the output side (y -> Uᵀ y at run time)


def _rows(a: torch.Tensor, pl: HadamardPlan) -> torch.Tensor:
    """Apply T to every row of a (a Tᵀ)."""
    return hadamard_transform(a, pl)


def _cols(a: torch.Tensor, pl: HadamardPlan) -> torch.Tensor:
    """T a (T applied to every column)."""
    return hadamard_transform(a.t(), pl).t()


def rotate_weight(w: torch.Tensor, su: torch.Tensor | None, sv: torch.Tensor | None,
                  pl_out: HadamardPlan | None, pl_in: HadamardPlan | None) -> torch.Tensor:
    """W' = U W Vᵀ (float64 inside; the result in w's dtype)."""
    a = w.double()
    if sv is not None:
        a = _rows(a * sv.double().view(1, -1), pl_in)
    if su is not None:
        a = _cols(a * su.double().view(-1, 1), pl_out)
    return a.to(w.dtype)


def unrotate_weight(wr: torch.Tensor, su: torch.Tensor | None, sv: torch.Tensor | None,
                    pl_out: HadamardPlan | None, pl_in: HadamardPlan | None) -> torch.Tensor:
    """W = Uᵀ W' V (the inverse of :func:`rotate_weight`)."""
    a = wr.double()
    if su is not None:
        a = hadamard_transform(a.t(), pl_out, transpose=True).t() * su.double().view(-1, 1)
    if sv is not None:
        a = hadamard_transform(a, pl_in, transpose=True) * sv.double().view(1, -1)
    return a.to(wr.dtype)


def rotate_hessian(h: torch.Tensor, sv: torch.Tensor, pl_in: HadamardPlan) -> torch.Tensor:
    """H' = V H Vᵀ, symmetrized (float64 inside, float32 out)."""
    a = h.double() * sv.double().view(1, -1) * sv.double().view(-1, 1)
    a = _cols(_rows(a, pl_in), pl_in)
    return ((a + a.t()) * 0.5).to(h.dtype)


def rotate_diag(d: torch.Tensor, pl_in: HadamardPlan) -> torch.Tensor:
    """diag(V diag(d) Vᵀ) = (T∘T) d (computed exactly for T = K_m ⊗ H_p, since H_p∘H_p = 1/p).

    Used for the per-column activation energy when no Hessian was gathered: it is the rotated
    energy of uncorrelated inputs (the cross terms of the true diag(V H Vᵀ) are unknown without H);
    the total energy is exact."""
    k2 = pl_in.small(d.device, torch.float64).pow(2)
    x = d.double().view(pl_in.m, pl_in.p).mean(1)  # H_p∘H_p averages each row of the [m, p] view
    return (k2 @ x).repeat_interleave(pl_in.p).to(d.dtype)


def _seed(base: int, block: int, name: str, side: str) -> int:
    return (base * 1_000_003 + block * 7919 + zlib.crc32(f"{name}/{side}".encode())) & 0x7FFF_FFFF


@register("transform", "quip")
class QuIP(Transform):
    Config = QuIPConfig
    cfg: QuIPConfig
    needs_hessian = False  # uses the Hessian when the quantizer gathers one (GPTQ -> LDLQ); RTN needs none
    needs_calibration = False

    def before(self, ctx: LayerContext) -> None:
        out_f, in_f = ctx.weight.shape
        spec: dict[str, Any] = {"type": "quip"}
        su = sv = pl_in = pl_out = None
        if self.cfg.rotate_in:
            pl_in = plan(in_f)
            sv = random_signs(in_f, _seed(self.cfg.seed, ctx.seed, ctx.name, "in")).to(ctx.weight.device)
            ctx.add_tensor("quip.sv", pack_signs(sv).cpu())
            spec["in"] = pl_in.to_spec()
        if self.cfg.rotate_out:
            pl_out = plan(out_f)
            su = random_signs(out_f, _seed(self.cfg.seed, ctx.seed, ctx.name, "out")).to(ctx.weight.device)
            ctx.add_tensor("quip.su", pack_signs(su).cpu())
            spec["out"] = pl_out.to_spec()
        ctx.weight = rotate_weight(ctx.weight.float(), su, sv, pl_out, pl_in)
        if sv is not None:
            # a new stats object: linears that share an input (q/k/v) share one LayerStats
            st = ctx.stats
            h = None if st.hessian is None else rotate_hessian(st.hessian, sv, pl_in)
            if h is not None:
                sq = torch.diagonal(h).clone()
            elif st.act_sqsum is not None:
                sq = rotate_diag(st.act_sqsum, pl_in)
            else:
                sq = None
            # the per-column max of |V x| is not known in the rotated basis; a guaranteed bound is
            # |(V x)_j| <= max|T| * Σ_i max|x_i| (loose: for formats with static activation scales)
            am = None
            if st.act_absmax is not None:
                tmax = float(pl_in.small(dtype=torch.float64).abs().max()) / pl_in.p ** 0.5
                am = torch.full_like(st.act_absmax, float(st.act_absmax.float().sum()) * tmax)
            # cache=None: the rotation is this linear's own, so nothing derived from the rotated statistics
            # (GPTQ's cached factor) may be shared with q/k/v's other linears
            ctx.stats = dataclasses.replace(st, hessian=h, act_sqsum=sq, act_absmax=am, cache=None)
        ctx.runtime.append(spec)

    @classmethod
    def runtime(cls, spec: dict[str, Any], layer: torch.nn.Module
                ) -> tuple[Callable | None, Callable | None]:
        where = "quip transform"
        pre = post = None
        if "in" in spec:
            pl_in = HadamardPlan.from_spec(spec["in"], where)
            if pl_in.n != layer.in_features:
                raise CheckpointError(f"{where}: input plan size {pl_in.n} != in_features {layer.in_features}")
            _check_signs(layer, "quip__sv", pl_in.n, where)
            cache_in: dict = {}

            def pre(x: torch.Tensor) -> torch.Tensor:
                s = _signs(layer, "quip__sv", pl_in.n, x.device, cache_in)
                return hadamard_transform(x * s.to(x.dtype), pl_in)

        if "out" in spec:
            pl_out = HadamardPlan.from_spec(spec["out"], where)
            if pl_out.n != layer.out_features:
                raise CheckpointError(f"{where}: output plan size {pl_out.n} != out_features {layer.out_features}")
            _check_signs(layer, "quip__su", pl_out.n, where)
            cache_out: dict = {}

            def post(y: torch.Tensor) -> torch.Tensor:
                s = _signs(layer, "quip__su", pl_out.n, y.device, cache_out)
                return hadamard_transform(y, pl_out, transpose=True) * s.to(y.dtype)

        return pre, post


def _check_signs(layer: torch.nn.Module, attr: str, n: int, where: str) -> None:
    t = getattr(layer, attr, None)
    if t is None:
        raise CheckpointError(f"{where}: the layer has no stored '{attr.replace('__', '.')}' sign vector")
    if t.device.type != "meta":
        unpack_signs(t, n)


def _signs(layer: torch.nn.Module, attr: str, n: int, device, cache: dict) -> torch.Tensor:
    t = getattr(layer, attr)
    key = (t.data_ptr(), t.device)
    s = cache.get("s")
    if cache.get("key") != key or s is None:
        s = unpack_signs(t, n)
        cache["key"], cache["s"] = key, s
    return s if s.device == device else s.to(device)


__all__ = ["QuIP", "QuIPConfig", "rotate_weight", "unrotate_weight", "rotate_hessian", "rotate_diag"]
