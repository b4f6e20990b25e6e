"""MoE calibration: routed-token counts, all-expert statistics, and the few-token fallback.

Each expert matrix is an ordinary linear (quantkit.moe.experts), so the pipeline's hooks already give
it its own XᵀX from the tokens that reach it. This adds, for the pipeline's calibrate step:

* :func:`expert_calibration`: while open, every :class:`Experts` container of the block counts the
  tokens its router sends to each expert and, with ``all_experts`` (recipe ``moe.calibrate_all_experts``,
  on by default), runs every token through every expert so the statistics see all of them; the
  block's output still uses the real routing.
* :func:`fallback_schemes`: an expert matrix whose statistics come from fewer than ``moe.min_tokens``
  tokens is rounded with RTN instead (an int format's range chosen by MSE search), and the report says so.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..formats.base import format_from_spec
from ..quantizers.base import quantizer_from_spec
from ..recipe import MoEConfig, Scheme
from .experts import Experts


@contextlib.contextmanager
def expert_calibration(module: nn.Module, prefix: str, all_experts: bool) -> Iterator[dict[str, torch.Tensor]]:
    """Yields {container name: routed-token counts [E]} filled while the block runs."""
    found = {f"{prefix}{n}": m for n, m in module.named_modules() if isinstance(m, Experts)}
    counts: dict[str, torch.Tensor] = {}
    for n, m in found.items():
        m.count = counts[n] = torch.zeros(m.num_experts, dtype=torch.int64)
        m.calibrate_all = all_experts
    try:
        yield counts
    finally:
        for m in found.values():
            m.count, m.calibrate_all = None, False


def expert_of(counts: dict[str, Any], name: str) -> tuple[str, int] | None:
    """(container, expert index) of an expert linear's full name, or None."""
    for c in counts:
        if name.startswith(c + "."):
            head = name[len(c) + 1:].split(".", 1)[0]
            if head.isdigit():
                return c, int(head)
    return None


def fallback_scheme(scheme: Scheme) -> tuple[Scheme, list[str]]:
    """RTN into the same format (an int format picks its ranges by MSE search), keeping the transforms that
    need no statistics (QuIP's rotation: RTN then rounds in the rotated basis). Returns the scheme and the
    transforms it had to drop (those that need calibration statistics, e.g. SmoothQuant)."""
    spec = scheme.fmt.spec()
    if spec.get("type") == "int":
        spec = {**spec, "clip": "mse"}
    kept = [t for t in scheme.transforms if not t.needs_calibration]
    dropped = [t.spec().get("type", type(t).__name__) for t in scheme.transforms if t.needs_calibration]
    return Scheme(quantizer_from_spec("rtn", where="moe.fallback"), format_from_spec(spec, where="moe.fallback"),
                  kept), dropped


def fallback_schemes(schemes: dict[str, Scheme], stats, counts: dict[str, list[int]], cfg: MoEConfig
                     ) -> tuple[dict[str, Scheme], dict[str, dict[str, Any]]]:
    """Schemes with the few-token expert matrices switched to the fallback, and every expert
    linear's report additions (routed tokens, statistics tokens, fallback: what changed, transforms kept
    and dropped)."""
    out, notes = dict(schemes), {}
    for n, s in schemes.items():
        where = expert_of(counts, n)
        if where is None:
            continue
        routed = int(counts[where[0]][where[1]])
        seen = int(stats.get(n).nsamples)
        note: dict[str, Any] = {"expert_routed_tokens": routed, "expert_stat_tokens": seen}
        if s.needs_calibration and seen < cfg.min_tokens:
            out[n], dropped = fallback_scheme(s)
            kept = [t.spec().get("type", type(t).__name__) for t in out[n].transforms]
            note["fallback"] = (f"{cfg.fallback}: statistics from {seen} tokens < moe.min_tokens {cfg.min_tokens} "
                                f"(was {s.quantizer.spec().get('type')})"
                                + (f"; transforms kept: {', '.join(kept)}" if kept else "")
                                + (f"; transforms DROPPED (they need statistics): {', '.join(dropped)}"
                                   if dropped else ""))
        notes[n] = note
    return out, notes
