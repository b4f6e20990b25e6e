"""Expert containers whose forward takes the tokens already laid out per expert (Llama 4).

Llama 4's ``Llama4TextExperts.forward(hidden_states)`` receives ``[E * T, H]``: every token repeated once per
expert and pre-multiplied by that expert's router score (zero where the router did not pick the expert),
and returns ``[E * T, H]`` (the caller sums over experts). Such a container is recognised by its forward
signature (one argument besides ``self``), never by its class; :class:`~quantkit.moe.experts.Experts` then
runs :func:`dense_forward` instead of the routed loop.

Calibration: a token reaches an expert when its row for that expert is not all zero (the routed-token
count). With all-expert calibration each expert's statistics see every token *as scaled for the expert it
was routed to* (the sum of a token's rows over experts; with Llama 4's top-1 routing exactly the input its
own expert saw), while the block's output still uses the real routing. Where a token has several non-zero
rows (top-k > 1) that sum is not an input any expert saw, so the container's statistics fall back to the
routed tokens only, with a warning.
"""

from __future__ import annotations

import inspect
import warnings

import torch
from torch import nn


def takes_expert_major_input(mod: nn.Module) -> bool:
    """Whether ``mod.forward`` takes only the hidden states (no routing indices or weights, not even optional)."""
    try:
        params = list(inspect.signature(type(mod).forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return False
    # exactly one argument: a container taking optional routing arguments (gpt-oss: router_indices=None)
    # is a routed one
    P = inspect.Parameter
    return len([p for p in params if p.kind is not P.VAR_KEYWORD]) == 1 and params[0].kind in (
        P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD)


def random_expert_major_input(num_experts: int, hidden: int, tokens: int, g: torch.Generator) -> torch.Tensor:
    """Verification input: each token routed to one random expert with a random score, zero rows elsewhere."""
    x = torch.zeros(num_experts, tokens, hidden)
    pick = torch.randint(0, num_experts, (tokens,), generator=g)
    x[pick, torch.arange(tokens)] = torch.randn(tokens, hidden, generator=g) * torch.rand(tokens, 1, generator=g)
    return x.reshape(num_experts * tokens, hidden)


def dense_forward(ex, hidden_states: torch.Tensor) -> torch.Tensor:
    """``[E * T, H] -> [E * T, H]`` with each expert run on its routed rows only (a zero row gives a zero
    output when the experts have no bias; with biases every row runs, as the original does)."""
    E, H = ex.num_experts, ex.hidden
    if hidden_states.shape[0] % E:
        raise ValueError(f"expert-major input of {hidden_states.shape[0]} rows is not a multiple of {E} experts")
    x = hidden_states.reshape(E, -1, H)
    routed = x.ne(0).any(-1)  # [E, T]
    if ex.count is not None:
        ex.count += routed.sum(-1).to(ex.count.device)
    all_rows = None
    if ex.calibrate_all:
        if bool((routed.sum(0) > 1).any()):
            if not getattr(ex, "_warned_topk", False):
                warnings.warn(f"{ex.source_class}: tokens routed to several experts in an expert-major container; "
                              "all-expert calibration falls back to routed tokens for it", stacklevel=2)
                ex._warned_topk = True
        else:
            all_rows = x.sum(0)  # each token as its own expert saw it (exact: the other rows are zero)
    out = torch.zeros_like(x)
    for i in range(E):
        if all_rows is not None:
            y = ex.run_expert(i, all_rows)  # statistics from every token; output from the routed ones
            out[i] = torch.where(routed[i, :, None], y.to(out.dtype), out[i])
            continue
        if ex.has_bias:
            out[i] = ex.run_expert(i, x[i]).to(out.dtype)
            continue
        rows = routed[i].nonzero().squeeze(-1)
        if rows.numel():
            out[i, rows] = ex.run_expert(i, x[i, rows]).to(out.dtype)
    return out.reshape(-1, H)
