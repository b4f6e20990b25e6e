"""Find decoder blocks and linear layers by walking the module tree (no per-architecture code).

The decoder blocks are the longest ``nn.ModuleList`` whose entries are all the same class and
each hold at least one linear layer (``nn.Linear`` or GPT-2's ``Conv1D``). Works for Llama,
Qwen2, Gemma3, Mistral, GPT-2, OPT, GPT-NeoX, Phi and the like.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ModelSourceError
from ..nn import QuantLinear

ROUTER_FLAG = "_quantkit_router"  # set by quantkit.moe on a MoE block's routers: they stay float


def is_linear(m: nn.Module) -> bool:
    """A float linear layer (nn.Linear or GPT-2's Conv1D); a MoE router (flagged by quantkit.moe) is not
    one: it stays float."""
    if getattr(m, ROUTER_FLAG, False):  # MoE: flagged by quantkit.moe
        return False
    if isinstance(m, nn.Linear):
        return True
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and hasattr(m, "weight")


def linear_weight(m: nn.Module) -> torch.Tensor:
    """The weight as [out, in] (GPT-2's Conv1D stores it transposed)."""
    return m.weight.t() if type(m).__name__ == "Conv1D" else m.weight


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The longest candidate list that is not inside another candidate (a MoE block's list of
    per-expert MLPs is never taken for the decoder blocks, however many experts it holds)."""
    best: tuple[str, nn.ModuleList] | None = None
    taken: list[str] = []
    for name, mod in model.named_modules():  # parents come before their children
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        if len({type(b) for b in mod}) != 1:
            continue
        if not any(is_linear(x) or isinstance(x, QuantLinear) for x in mod[0].modules()):
            continue
        if any(name.startswith(t + ".") for t in taken):
            continue
        taken.append(name)
        if best is None or len(mod) > len(best[1]):
            best = (name, mod)
    if best is None:
        raise ModelSourceError(
            f"cannot find the decoder blocks of {type(model).__name__}: no nn.ModuleList of identical "
            f"modules holding linear layers; this architecture is not supported")
    return best


def find_linears(module: nn.Module, prefix: str = "") -> dict[str, nn.Module]:
    return {f"{prefix}{n}": m for n, m in module.named_modules() if is_linear(m) and n}


def set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)
