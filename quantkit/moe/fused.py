"""The fused path of :class:`quantkit.moe.Experts` on GPU: two grouped W4A16 launches per layer.

:func:`stacked_for` builds, once per layer and device, the experts' packed tensors stacked on a leading
E dimension (``quantkit.kernels.moe_w4a16.Stacked``: gate_up = gate rows then up rows per expert, and
down) from the ``{i}.gate_proj/up_proj/down_proj`` QuantLinear children, and keeps them on the module.
The stack is a copy: the experts' packed weights are held twice on the GPU while the fused path is used
(the per-expert buffers stay what the checkpoint and the loop read).

The cache is dropped when any QuantLinear's buffers, bias or ``dense_weight`` are replaced or moved
(``quantkit.nn.generation()``, bumped by QuantLinear). In-place edits of a packed buffer
(``ql.qweight.copy_(...)``) are not seen: call :func:`invalidate` after such an edit.

Supported (else :func:`stacked_for` returns None with the reason in ``reason(ex)``, and the caller runs
the per-expert loop): gated experts without bias whose host has no ``_apply_gate`` (gpt-oss has one);
every expert matrix a plain QuantLinear (no transforms, no bias, no dense weight) of one ``int`` 4-bit
(sym or asym, groups of a multiple of 8 columns or per channel, no act-order ``g_idx``) or ``lut`` 4-bit
(per-row or fixed table, with or without group scales) spec; in_features a multiple of 8.
``QUANTKIT_MOE_FUSED=0`` turns the fused path off.
"""

from __future__ import annotations

import os

import torch

from ..nn import QuantLinear, bump_generation, generation

MAX_TOKENS = int(os.environ.get("QUANTKIT_MOE_FUSED_MAX_TOKENS", "256"))  # above: the per-expert loop
ENABLED = os.environ.get("QUANTKIT_MOE_FUSED", "1") != "0"
_ATTR = "_quantkit_fused"


def invalidate() -> None:
    """Forget every fused stack (after an in-place edit of a QuantLinear's packed buffers)."""
    bump_generation()


def _spec_key(ql) -> tuple | None:
    """What must be equal across the experts' matrices for one stacked launch; None if unsupported."""
    if not isinstance(ql, QuantLinear):
        return None
    if not ql._plain or ql.bias is not None or ql.dense_weight is not None:
        return None
    cfg = ql.fmt.cfg
    if cfg.type not in ("int", "lut") or cfg.bits != 4:
        return None
    p = ql.packed
    if "g_idx" in p or set(p) - {"qweight", "scales", "zeros", "lut"}:
        return None
    N, K = ql.shape
    qw = p["qweight"]
    if K % 8 or tuple(qw.shape) != (N, K // 2) or qw.dtype != torch.uint8:
        return None
    gs = ql.fmt.group_size
    if gs and gs < K and gs % 8:
        return None
    s = p.get("scales")
    if cfg.type == "int":
        if s is None or (cfg.sym and "zeros" in p):
            return None
        z = p.get("zeros")
        if not cfg.sym and z is None:
            return None
        return ("int", cfg.sym, gs, K, s.dtype, z.dtype if z is not None else None, qw.device)
    lut = p.get("lut")
    if lut is None or lut.shape[1] != 16 or "zeros" in p:
        return None
    return ("lut", lut.shape[0] == 1, gs, K, s.dtype if s is not None else None, lut.dtype, qw.device)


def _stack(mats: list[list], mode: int, K: int, gs: int | None, sym: bool, device):
    """mats: per expert, the QuantLinears whose rows are concatenated (gate, up) or [down]."""
    from quantkit.kernels.moe_w4a16 import Stacked

    def cat(name, f=lambda t: t):
        parts = [torch.cat([f(q.packed[name]) for q in row], 0) for row in mats]
        return torch.stack(parts, 0).to(device).contiguous()

    w = cat("qweight", lambda t: t.contiguous().view(torch.int32))
    has_s = "scales" in mats[0][0].packed
    s = cat("scales") if has_s else None
    z = cat("zeros") if mode == 0 and not sym else None
    lut = None
    if mode == 1:
        if mats[0][0].packed["lut"].shape[0] == 1:  # a fixed table: one row per expert (same for gate and up)
            for row in mats:
                if not all(torch.equal(q.packed["lut"], row[0].packed["lut"]) for q in row):
                    return None
            lut = torch.stack([row[0].packed["lut"] for row in mats], 0).to(device, torch.float16).contiguous()
        else:
            lut = cat("lut").to(torch.float16)
    GS = gs if gs and gs < K else (1 << 30)
    zc = 8.0 if mode == 0 and sym else 0.0
    return Stacked(mode, w, s, z, lut, K, GS, zc)


def reason(ex) -> str | None:
    """Why ``ex`` cannot take the fused path (None: it can)."""
    if not ex.gated:
        return "experts without a gate"
    if ex.has_bias:
        return "experts with biases"
    if getattr(type(ex._host), "_apply_gate", None) is not None:
        return f"{ex.source_class}: its own gate function (_apply_gate)"
    keys = set()
    for i in range(ex.num_experts):
        e = ex.expert(i)
        for name in ("gate_proj", "up_proj", "down_proj"):
            k = _spec_key(getattr(e, name, None))
            if k is None:
                return f"expert {i}.{name}: not a plain int4/lut4 QuantLinear the fused kernel takes"
            keys.add((name == "down_proj",) + k)
    if len({k for k in keys if not k[0]}) != 1 or len({k for k in keys if k[0]}) != 1:
        return "the experts' matrices do not share one spec"
    return None


class FusedExperts:
    """The stacked gate_up and down of one Experts module on one device."""

    def __init__(self, ex, device):
        self.device = device
        e0 = ex.expert(0)
        ku, kd = _spec_key(e0.gate_proj), _spec_key(e0.down_proj)
        E = ex.num_experts
        self.gate_up = _stack([[ex.expert(i).gate_proj, ex.expert(i).up_proj] for i in range(E)],
                              0 if ku[0] == "int" else 1, ku[3], ku[2], ku[0] == "int" and ku[1], device)
        self.down = _stack([[ex.expert(i).down_proj] for i in range(E)],
                           0 if kd[0] == "int" else 1, kd[3], kd[2], kd[0] == "int" and kd[1], device)
        self.ok = self.gate_up is not None and self.down is not None
        self.act = ex._host.act_fn

    def __call__(self, hidden, top_k_index, top_k_weights, cfg: dict | None = None):
        from quantkit.kernels.moe_w4a16 import fused_experts

        return fused_experts(hidden, top_k_index, top_k_weights, self.gate_up, self.down, self.act, cfg)


def stacked_for(ex, device: torch.device) -> FusedExperts | None:
    """The fused runner of ``ex`` on ``device`` (built once, cached), or None when unsupported."""
    hit = ex.__dict__.get(_ATTR)
    gen = generation()
    if hit is not None and hit[0] == gen and hit[1] == device:
        return hit[2]
    run = None
    if reason(ex) is None:
        try:
            import quantkit.kernels.moe_w4a16  # noqa: F401 - Triton present?
        except ImportError:
            run = None
        else:
            run = FusedExperts(ex, device)
            if not run.ok:
                run = None
    ex.__dict__[_ATTR] = (gen, device, run)
    return run


def usable(ex, hidden: torch.Tensor, top_k_index: torch.Tensor) -> bool:
    """Whether this call may take the fused path (before looking at the weights)."""
    return (ENABLED and hidden.is_cuda and hidden.dim() == 2 and top_k_index.dim() == 2
            and hidden.dtype in (torch.bfloat16, torch.float16) and hidden.shape[0] <= MAX_TOKENS
            and not ex.calibrate_all and ex.count is None
            and not (hidden.requires_grad and torch.is_grad_enabled())
            and not torch.compiler.is_compiling())
