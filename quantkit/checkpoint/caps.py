"""What each on-disk layout can hold, declared once per layout (its class's ``CAPS``) and checked in one
place, :func:`layout_problems`, before any calibration starts (``quantkit.checks.check_layout``).

A plan is one :class:`PlannedLayer` per linear layer of the model (quantized or left in float), known
from the recipe and the model's shapes alone (the model may be on the meta device). Whatever can only
be known from the quantized numbers (GPTQ v1's zero point 0, scales float16 cannot hold) is still
checked when the layout writes. docs/EXPORT.md's capability table is :func:`markdown_table`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# (predicate on the format object -> reason it cannot be stored, or None; what the predicate allows, in words)
FormatRule = tuple[Callable[[Any], "str | None"], str]


def any_config(_fmt) -> str | None:
    return None


@dataclass(frozen=True)
class LayoutCaps:
    """What a layout can hold. ``formats`` maps a format's registry name to its rule; absent = not held."""

    formats: dict[str, FormatRule] | None  # None: every registered format
    transforms: bool = False  # run-time transforms (QuIP rotations, SmoothQuant scales)
    act_order_g_idx: bool = True  # per-column group indices (GPTQ act_order without static_groups)
    one_scheme: bool = False  # every quantized layer must share one scheme (no mixed precision)
    float_block_linears: bool = True  # linears inside the decoder blocks may stay in float
    outside_blocks: bool = True  # layers outside the decoder blocks (lm_head) may be quantized
    conv1d: bool = True  # GPT-2-style Conv1D linears (weights stored transposed)
    kv_cache: bool = False  # the recipe's KV-cache allocation is stored
    shape: Callable[[Any, tuple[int, int]], str | None] | None = None  # format, (out, in) -> reason
    shape_rule: str = ""
    options: dict[str, tuple[str, ...]] = field(default_factory=dict)  # export option -> allowed values


@dataclass
class PlannedLayer:
    name: str
    shape: tuple[int, int]  # (out, in)
    in_blocks: bool
    conv1d: bool
    scheme: Any = None  # quantkit.recipe.Scheme, or None: stays in float


def _g_idx(scheme) -> bool:
    q = scheme.quantizer.spec()
    return bool(q.get("act_order")) and not q.get("static_groups", True) and scheme.fmt.group_size is not None


def _scheme_key(scheme) -> tuple:
    f = scheme.fmt.spec()
    return (f.get("type"), f.get("bits"), f.get("group_size"), f.get("sym"))


def layout_problems(layout: str, caps: LayoutCaps, plan: list[PlannedLayer], *, kv_cache: bool = False,
                    options: dict[str, Any] | None = None) -> list[str]:
    """Every reason why ``plan`` cannot be written in ``layout`` (empty: it can)."""
    out: list[str] = []
    for k, v in (options or {}).items():
        allowed = caps.options.get(k)
        if allowed is None:
            out.append(f"export option {k!r} does not apply to the {layout} layout "
                       f"(its options: {', '.join(caps.options) or 'none'})")
        elif v not in allowed:
            out.append(f"export option {k}={v!r}: the {layout} layout takes {' or '.join(map(repr, allowed))}")
    if kv_cache and not caps.kv_cache:
        out.append(f"the recipe's kv_cache allocation has no place in the {layout} layout (it would be dropped)")
    quantized = [p for p in plan if p.scheme is not None]
    schemes = set()
    for p in plan:
        if p.scheme is None:
            if p.in_blocks and not caps.float_block_linears:
                out.append(f"layer {p.name!r} stays in float inside a decoder block; {layout} loaders quantize every "
                           f"block linear (quantize it too)")
            continue
        fmt = p.scheme.fmt
        where = f"layer {p.name!r} ({fmt.describe()})"
        if p.conv1d and not caps.conv1d:
            out.append(f"{where} is a GPT-2-style Conv1D (transposed weight), which the {layout} layout does not hold")
        if not p.in_blocks and not caps.outside_blocks:
            out.append(f"{where} lies outside the decoder blocks; the {layout} layout only holds block linears "
                       f"(keep it in float: ignore: [{p.name.rsplit('.', 1)[-1]}])")
        if caps.formats is not None:
            rule = caps.formats.get(fmt.registry_name)
            if rule is None:
                out.append(f"{where}: the {layout} layout holds the formats {', '.join(sorted(caps.formats))}, not "
                           f"{fmt.registry_name!r}")
            else:
                why = rule[0](fmt)
                if why:
                    out.append(f"{where}: {why}")
        if caps.shape is not None:
            why = caps.shape(fmt, p.shape)
            if why:
                out.append(f"{where} of shape {p.shape}: {why}")
        if p.scheme.transforms and not caps.transforms:
            kinds = ", ".join(t.registry_name for t in p.scheme.transforms)
            out.append(f"{where} has run-time transforms ({kinds}) that the {layout} layout cannot express")
        if not caps.act_order_g_idx and _g_idx(p.scheme):
            out.append(f"{where}: act-order group indices (quantizer act_order: true with static_groups: false) have "
                       f"no place in the {layout} layout; set static_groups: true")
        schemes.add(_scheme_key(p.scheme))
    if caps.one_scheme and len(schemes) > 1:
        out.append(f"the recipe gives the layers {len(schemes)} different schemes "
                   f"({'; '.join(str(s) for s in sorted(schemes, key=str)[:3])}); a {layout} checkpoint holds one "
                   f"(no mixed precision)")
    if not quantized:
        out.append("no layer is quantized")
    return out


# ---- the documentation table ----------------------------------------------------------------------------
def markdown_table() -> str:
    """docs/EXPORT.md's table: which formats, transforms and features each layout holds."""
    from ..registry import get, names

    layouts = sorted(names("layout"), key=lambda n: (n != "native", n))
    caps = {n: get("layout", n).CAPS for n in layouts}
    rows = []

    def row(what: str, cell: Callable[[LayoutCaps], str]) -> None:
        rows.append(f"| {what} | " + " | ".join(cell(caps[n]) for n in layouts) + " |")

    for f in names("format"):
        row(f"format `{f}`", lambda c, f=f: "yes" if c.formats is None else (
            "no" if f not in c.formats else ("yes" if c.formats[f][1] == "" else c.formats[f][1])))
    for t in names("transform"):
        row(f"transform `{t}`", lambda c: "yes" if c.transforms else "no")
    for b in names("block_plugin"):
        row(f"block plugin `{b}` (changes float weights only)", lambda c: "yes")
    row("act-order group indices (`static_groups: false`)", lambda c: "yes" if c.act_order_g_idx else "no")
    row("mixed precision (several schemes)", lambda c: "no" if c.one_scheme else "yes")
    row("block linears left in float", lambda c: "yes" if c.float_block_linears else "no")
    row("quantized layers outside the blocks (`lm_head`)", lambda c: "yes" if c.outside_blocks else "no")
    row("GPT-2 `Conv1D` models", lambda c: "yes" if c.conv1d else "no")
    row("recipe `kv_cache` allocation", lambda c: "yes" if c.kv_cache else "no")
    row("layer shapes", lambda c: c.shape_rule or "any")
    row("export options (CLI)", lambda c: ", ".join(
        f"`{k}`: {'/'.join(v)}" for k, v in c.options.items()) or "none")
    head = "| | " + " | ".join(f"`{n}`" for n in layouts) + " |\n|---|" + "---|" * len(layouts)
    return head + "\n" + "\n".join(rows)
