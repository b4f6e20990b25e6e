"""Mixture-of-experts support: expert containers found by pattern and split into per-expert linears
(:mod:`quantkit.moe.experts`). See docs/MOE.md."""

from .experts import (
    ROUTER_FLAG,
    ExpertMLP,
    Experts,
    expert_containers,
    flag_routers,
    is_fused_container,
    load_fused,
    prepare,
    unfuse_experts,
)

__all__ = ["ROUTER_FLAG", "ExpertMLP", "Experts", "expert_containers", "flag_routers", "is_fused_container",
           "load_fused", "prepare", "unfuse_experts"]
