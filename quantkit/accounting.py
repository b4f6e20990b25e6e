"""Honest accounting: every parameter of the decoder blocks, quantized or kept float.

:func:`account` walks the whole model once: each :class:`QuantLinear` counts ``out x in`` weights at
its packed storage bits (codes, scales, zeros, tables), every other parameter tensor its elements at
its dtype's bits; tied tensors count once. Parameters are grouped as decoder blocks, embeddings,
lm_head and other (final norm ...). ``QuantizedModel.bits_per_weight()``, the run report and the CLI
summary take the decoder blocks' figure, so a model whose experts stayed float is never labelled 4-bit.

:func:`check_coverage` is the matching check before calibration: a parameter tensor of a decoder block
larger than ``COVERAGE_FRACTION`` of its block that no recipe rule can quantize and no ``ignore`` pattern
names is an error (or, with ``allow_unquantized``, a loud warning).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .errors import ModelSourceError, QuantkitError
from .models.discovery import ROUTER_FLAG, find_blocks, is_linear
from .nn import QuantLinear
from .recipe import Recipe, matches

COVERAGE_FRACTION = 0.01


@dataclass
class Group:
    params: int = 0  # weights (elements)
    bits: float = 0.0  # storage bits
    quantized: int = 0  # of which in quantized linears

    def add(self, n: int, bits: float, quantized: bool) -> None:
        self.params += n
        self.bits += bits
        self.quantized += n if quantized else 0

    @property
    def bits_per_weight(self) -> float:
        return self.bits / self.params if self.params else float("nan")


@dataclass
class Accounting:
    blocks: Group = field(default_factory=Group)
    embeddings: Group = field(default_factory=Group)
    lm_head: Group = field(default_factory=Group)
    other: Group = field(default_factory=Group)
    kept_float: dict[str, dict[str, Any]] = field(default_factory=dict)  # block float tensors by role
    n_quantized_layers: int = 0
    tied_lm_head: bool = False

    def summary(self) -> dict[str, Any]:
        g = {k: {"params": v.params, "quantized": v.quantized, "bits_per_weight": round(v.bits_per_weight, 4)}
             for k, v in (("blocks", self.blocks), ("embeddings", self.embeddings), ("lm_head", self.lm_head),
                          ("other", self.other)) if v.params}
        return {"bits_per_weight": round(self.blocks.bits_per_weight, 4), "groups": g,
                "quantized_layers": self.n_quantized_layers, "tied_lm_head": self.tied_lm_head,
                "kept_float": self.kept_float}

    def line(self) -> str:
        """One line for the CLI: the blocks' bits per weight and what stayed float."""
        b = self.blocks
        pct = 100.0 * b.quantized / b.params if b.params else 0.0
        kept = ", ".join(f"{r} {v['params']:,}" for r, v in sorted(self.kept_float.items()))
        rest = [f"{k} {g.params:,} float" for k, g in (("embeddings", self.embeddings), ("lm_head", self.lm_head))
                if g.params and g.quantized == 0]
        return (f"{b.bits_per_weight:.3f} bits/weight over all {b.params:,} decoder-block parameters "
                f"({pct:.2f}% in {self.n_quantized_layers} quantized layers; kept float: {kept or 'none'})"
                + (f"; {', '.join(rest)}" if rest else "") + (" (tied)" if self.tied_lm_head else ""))


def _role(mod: nn.Module, pname: str, t) -> str:
    if getattr(mod, ROUTER_FLAG, False):
        return "router"
    if t.dim() <= 1:
        return "bias" if "bias" in pname else "norm"
    if is_linear(mod):
        return "linear"
    return "other"


def account(model: nn.Module) -> Accounting:
    """The storage of every parameter of ``model``, by group (see the module docstring)."""
    acc = Accounting()
    try:
        bname, _ = find_blocks(model)
    except ModelSourceError:
        bname = None
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    emb_ids = {id(p) for p in emb.parameters()} if emb is not None else set()
    if head is not None and any(id(p) in emb_ids for p in head.parameters()):
        acc.tied_lm_head = True
    seen: set[int] = set()
    for name, mod in model.named_modules():
        in_block = bname is not None and name.startswith(bname + ".")
        if mod is emb:
            grp = acc.embeddings
        elif mod is head:
            grp = acc.lm_head
        else:
            grp = acc.blocks if in_block else acc.other
        if isinstance(mod, QuantLinear):
            n = mod.in_features * mod.out_features
            grp.add(n, mod.bits_per_weight() * n, True)
            acc.n_quantized_layers += 1
        for pname, p in mod._parameters.items():
            if p is None or id(p) in seen:
                continue
            seen.add(id(p))
            grp.add(p.numel(), p.numel() * p.element_size() * 8, False)
            if grp is acc.blocks:
                r = acc.kept_float.setdefault(_role(mod, pname, p), {"params": 0, "tensors": 0})
                r["params"] += p.numel()
                r["tensors"] += 1
    return acc


def _block_params(block: nn.Module, prefix: str):
    for mname, mod in block.named_modules():
        for pname, p in mod._parameters.items():
            if p is not None:
                yield f"{prefix}{mname + '.' if mname else ''}", mod, pname, p


def uncovered(model: nn.Module, recipe: Recipe) -> list[tuple[str, tuple, float]]:
    """Block parameter tensors above COVERAGE_FRACTION of their block that would stay float although
    the recipe does not say so: (name, shape, fraction of the block)."""
    try:
        bname, blocks = find_blocks(model)
    except ModelSourceError:
        return []
    out = []
    for i, block in enumerate(blocks):
        entries = list(_block_params(block, f"{bname}.{i}."))
        total = sum(p.numel() for *_, p in entries)
        seen = set()
        for mprefix, mod, pname, p in entries:
            if id(p) in seen or p.numel() <= COVERAGE_FRACTION * total:
                continue
            seen.add(id(p))
            mname = mprefix[:-1]
            if getattr(mod, ROUTER_FLAG, False) or isinstance(mod, QuantLinear):
                continue
            if is_linear(mod) and pname in ("weight", "bias"):
                continue  # a linear: quantized by a rule, or kept float by the recipe's targets/ignore/skip
            if matches(recipe.ignore, mname) or matches(recipe.ignore, f"{mname}.{pname}"):
                continue
            out.append((f"{mname}.{pname}", tuple(p.shape), p.numel() / total))
    return out


def check_coverage(model: nn.Module, recipe: Recipe, allow_unquantized: bool = False) -> list[str]:
    """An error (or with ``allow_unquantized`` a warning) for large block tensors no rule quantizes and
    no ignore names; returns their names."""
    bad = uncovered(model, recipe)
    if not bad:
        return []
    shown = "; ".join(f"{n} {list(s)} ({100 * f:.1f}% of its block)" for n, s, f in bad[:4])
    more = f" and {len(bad) - 4} more" if len(bad) > 4 else ""
    msg = (f"{recipe.source}: {len(bad)} decoder-block parameter tensor(s) would stay float although no rule "
           f"quantizes them and no ignore pattern names them: {shown}{more}. The model would be reported smaller "
           f"than it is. Quantize them (quantkit finds MoE expert containers of transformers 5; see docs/MOE.md), "
           f"or name them in the recipe's ignore to keep them float on purpose")
    if allow_unquantized or recipe.allow_unquantized:
        warnings.warn("UNQUANTIZED TENSORS (allow_unquantized): " + msg, stacklevel=2)
        return [n for n, *_ in bad]
    raise QuantkitError(msg + ", or pass allow_unquantized=True (recipe key allow_unquantized: true) to go on "
                        "with a warning")
