"""The allocation dict of a quantized KV cache: parsing ``k4v2``-style specs, validation, bits and bytes.

An allocation is JSON-able (quantkit.kv.allocation computes one under a budget; quantkit.kv.cache
builds the cache from one)::

    {"format": "quantkit-kv", "version": 1, "policy": "norm", "budget_bits": 3.0,
     "key_bits": 4, "value_bits": 2,            # defaults for layers not in "layers"
     "layers": [{"key_bits": 4, "value_bits": 2}, ...] or null,
     "key_group_size": 32, "value_group_size": 32, "residual": 32, "scale_dtype": "float16",
     "avg_bits": 3.0, "stats": {...}}
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from ..errors import QuantkitError

FORMAT = "quantkit-kv"
DEFAULTS: dict[str, Any] = {"key_group_size": 32, "value_group_size": 32, "residual": 32, "scale_dtype": "float16"}
_SPEC = re.compile(r"^k(\d+)v(\d+)((?:[-_,:](?:r|gk|gv)\d+)*)$")
_FLOAT = {"float", "fp16", "bf16", "fp32", "none", "k16v16"}


def parse_spec(spec: str) -> dict[str, Any]:
    """``k4v2`` (optionally ``k4v2-r64-gk32-gv64``: residual, key/value group sizes) or ``float``."""
    s = spec.strip().lower()
    if s in _FLOAT:
        return {**DEFAULTS, "format": FORMAT, "version": 1, "policy": "float", "key_bits": 16, "value_bits": 16,
                "layers": None}
    m = _SPEC.match(s)
    if not m:
        raise QuantkitError(f"kv spec {spec!r} not understood: write k<key bits>v<value bits>, e.g. k4v2 (1..8 bits, "
                            f"16 = full precision), optionally with -r<residual>-gk<key group>-gv<value group>, "
                            f"or 'float', or a path to an allocation JSON file")
    out = {**DEFAULTS, "format": FORMAT, "version": 1, "policy": "uniform", "key_bits": int(m.group(1)),
           "value_bits": int(m.group(2)), "layers": None}
    for part in re.findall(r"(r|gk|gv)(\d+)", m.group(3)):
        key = {"r": "residual", "gk": "key_group_size", "gv": "value_group_size"}[part[0]]
        out[key] = int(part[1])
    return normalize_allocation(out)


def _check_bits(b, where: str) -> int:
    if not isinstance(b, int) or isinstance(b, bool) or not (1 <= b <= 8 or b == 16):
        raise QuantkitError(f"kv allocation {where}: {b!r} is not a bit width; use an integer 1..8 or 16 "
                            f"(full precision)")
    return b


def normalize_allocation(a: dict[str, Any] | str) -> dict[str, Any]:
    """Validate an allocation (dict, spec string or JSON path) and fill in defaults."""
    if isinstance(a, str):
        if os.path.isfile(a):
            with open(a) as f:
                try:
                    a = json.load(f)
                except json.JSONDecodeError as e:
                    raise QuantkitError(f"{a}: not valid JSON ({e}); an allocation file is written by "
                                        f"quantkit.kv.allocate(...) / save_allocation") from None
        else:
            return parse_spec(a)
    if not isinstance(a, dict):
        raise QuantkitError(f"kv allocation must be a dict, a spec string like 'k4v2' or a JSON path, got "
                            f"{type(a).__name__}")
    out = {**DEFAULTS, "format": FORMAT, "version": 1, "policy": "custom", **a}
    if out.get("format") != FORMAT:
        raise QuantkitError(f"kv allocation: format {out.get('format')!r} is not {FORMAT!r}")
    for k in ("key_group_size", "value_group_size"):
        if not isinstance(out[k], int) or out[k] < 1:
            raise QuantkitError(f"kv allocation {k}: {out[k]!r} must be a positive integer")
    if not isinstance(out["residual"], int) or out["residual"] < 0:
        raise QuantkitError(f"kv allocation residual: {out['residual']!r} must be an integer >= 0")
    if out["scale_dtype"] not in ("float16", "bfloat16", "float32"):
        raise QuantkitError(f"kv allocation scale_dtype: {out['scale_dtype']!r}; use float16, bfloat16 or float32")
    layers = out.get("layers")
    if layers is None:
        out["key_bits"] = _check_bits(out.get("key_bits", 4), "key_bits")
        out["value_bits"] = _check_bits(out.get("value_bits", 4), "value_bits")
    else:
        if not isinstance(layers, list) or not layers:
            raise QuantkitError("kv allocation layers: must be a non-empty list of {key_bits, value_bits} or null")
        fixed = []
        for i, L in enumerate(layers):
            if not isinstance(L, dict) or "key_bits" not in L or "value_bits" not in L:
                raise QuantkitError(f"kv allocation layers[{i}]: needs key_bits and value_bits, got {L!r}")
            fixed.append({"key_bits": _check_bits(L["key_bits"], f"layers[{i}].key_bits"),
                          "value_bits": _check_bits(L["value_bits"], f"layers[{i}].value_bits")})
        out["layers"] = fixed
        out.setdefault("key_bits", fixed[0]["key_bits"])
        out.setdefault("value_bits", fixed[0]["value_bits"])
    return out


def layer_bits(alloc: dict[str, Any], n_layers: int) -> list[tuple[int, int]]:
    alloc = normalize_allocation(alloc)
    if alloc["layers"] is not None:
        return [(L["key_bits"], L["value_bits"]) for L in alloc["layers"]]
    return [(alloc["key_bits"], alloc["value_bits"])] * n_layers


def average_bits(alloc: dict[str, Any], n_layers: int | None = None) -> float:
    """Mean code bits per cached K/V element (every layer has the same K and V sizes)."""
    alloc = normalize_allocation(alloc)
    n = n_layers or (len(alloc["layers"]) if alloc["layers"] else 1)
    bits = layer_bits(alloc, n)
    return sum(k + v for k, v in bits) / (2 * len(bits))


def save_allocation(alloc: dict[str, Any], path: str) -> None:
    with open(path, "w") as f:
        json.dump(normalize_allocation(alloc), f, indent=1)


def _kv_shape(config) -> tuple[int, int, int]:
    cfg = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return int(cfg.num_hidden_layers), int(heads), int(head_dim)


def kv_bytes_per_token(alloc: dict[str, Any] | str, config, context: int | None = None,
                       fp_bytes: int = 2) -> dict[str, float]:
    """KV-cache bytes per token of the whole model, computed from the layout: packed codes,
    ``scale_dtype`` scales and minima, and the full-precision residual window amortised over
    ``context`` tokens (``None``: the long-context limit, residual amortised to 0). Mirrors the
    flush rule of ``QuantKVLayer`` exactly (``tests/test_kv.py`` checks it against a live cache)."""
    alloc = normalize_allocation(alloc)
    n_layers, H, D = _kv_shape(config)
    G, g, R = alloc["key_group_size"], alloc["value_group_size"], alloc["residual"]
    sbytes = 4 if alloc["scale_dtype"] == "float32" else 2
    tot = {"codes": 0.0, "scales": 0.0, "zeros": 0.0, "residual": 0.0}
    for kb, vb in layer_bits(alloc, n_layers):
        for side, b in (("k", kb), ("v", vb)):
            if b >= 16:
                tot["residual"] += H * D * fp_bytes
                continue
            if context is None:
                n_q, n_fp = 1.0, 0.0
            else:
                n_fp = context if context - R < G else R + (context - R) % G
                n_q = context - n_fp
                n_q, n_fp = n_q / context, n_fp / context
            tot["codes"] += H * ((D * b + 7) // 8) * n_q
            per_tok_groups = D / G if side == "k" else D // min(g, D)
            tot["scales"] += H * per_tok_groups * sbytes * n_q
            tot["zeros"] += H * per_tok_groups * sbytes * n_q
            tot["residual"] += H * D * fp_bytes * n_fp
    tot["total"] = sum(tot.values())
    tot["float16_total"] = n_layers * 2 * H * D * 2
    return tot
