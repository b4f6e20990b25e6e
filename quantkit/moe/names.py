"""Checkpoint names of MoE experts where the hub's names differ from transformers 5's module names.

transformers 5 holds every MoE family's experts under ``...mlp.experts`` and, once quantkit has split them,
under ``...mlp.experts.{i}.gate_proj / up_proj / down_proj``. For most families these are also the names
on disk (Qwen2/3-MoE, OLMoE, DeepSeek-V3 store ``mlp.experts.{i}.gate_proj.weight``). Some families keep
older hub names that transformers renames on load (its ``conversion_mapping.py``) and back on
``save_pretrained``; vLLM's own loader for such a family reads only the hub names. ``HUB_NAMES`` lists
those families, keyed on ``config.model_type``; everything else keeps the module names.

* ``block``: the decoder layer's MoE child, (module name, checkpoint name).
* ``experts``: each expert projection, module name -> checkpoint name.

Mixtral (checked against transformers 5.25 and vLLM, docs/MOE.md): transformers' conversion mapping
``"mixtral"`` renames ``.block_sparse_moe.`` to ``.mlp.`` and merges ``experts.*.w1`` (gate) and ``w3``
(up) into ``experts.gate_up_proj``, ``experts.*.w2`` into ``experts.down_proj``; vLLM's
``vllm/model_executor/models/mixtral.py`` builds ``model.layers.N.block_sparse_moe.{gate,experts}`` and maps
expert tensors with ``FusedMoE.make_expert_params_mapping(ckpt_gate_proj_name="w1",
ckpt_down_proj_name="w2", ckpt_up_proj_name="w3")``.

Used by the export layouts (compressed-tensors, GPTQ: written under the checkpoint names, read back) and
by streaming (a float folder saved by transformers is read under its checkpoint names). quantkit's
native layout keeps the module names (docs/MOE.md says why).
"""

from __future__ import annotations

import re
from functools import cache

HUB_NAMES: dict[str, dict] = {
    "mixtral": {"block": ("mlp", "block_sparse_moe"),
                "experts": {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}},
}


@cache
def _rules(model_type: str, to_checkpoint: bool) -> tuple[tuple[re.Pattern, str], ...]:
    spec = HUB_NAMES.get(model_type)
    if spec is None:
        return ()
    pairs = [(a, b) if to_checkpoint else (b, a) for a, b in spec["experts"].items()]
    rules = [(re.compile(rf"\.experts\.(\d+)\.{re.escape(src)}(?=\.|$)"), rf".experts.\1.{dst}") for src, dst in pairs]
    mod, ckpt = spec["block"]
    src, dst = (mod, ckpt) if to_checkpoint else (ckpt, mod)
    rules.append((re.compile(rf"(^|\.)layers\.(\d+)\.{re.escape(src)}(?=\.|$)"), rf"\1layers.\2.{dst}"))
    return tuple(rules)


def _apply(name: str, rules) -> str:
    for pat, rep in rules:
        name = pat.sub(rep, name)
    return name


def to_checkpoint(name: str, model_type: str | None) -> str:
    """A module or tensor name of the (split) model -> its name in a checkpoint of ``model_type``."""
    return _apply(name, _rules(model_type or "", True))


def from_checkpoint(name: str, model_type: str | None) -> str:
    """A checkpoint tensor (or module) name -> the split model's name (inverse of :func:`to_checkpoint`)."""
    return _apply(name, _rules(model_type or "", False))


def renames(model_type: str | None) -> bool:
    """Whether checkpoints of ``model_type`` name experts differently from the modules."""
    return (model_type or "") in HUB_NAMES


def transformers_reads_split(model_type: str | None) -> bool | None:
    """Whether transformers' own conversion mapping for ``model_type`` merges per-expert tensors into its fused
    experts, i.e. whether ``from_pretrained`` can read a checkpoint that stores the experts one by one (it
    dequantizes a compressed-tensors one while loading). None when transformers has no such table."""
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:
        return None
    conv = get_checkpoint_conversion_mapping(model_type or "") or []
    if any("experts.gate_up_proj" in t or "experts.down_proj" in t
           for c in conv for t in (getattr(c, "_original_target_patterns", None) or [])):
        return True
    return _patched_for_compressed_tensors(model_type or "")


def _patched_for_compressed_tensors(model_type: str) -> bool:
    """transformers swaps some fused expert containers for per-expert ones when it loads a compressed-tensors
    checkpoint (``quantizers.base.MODULES_TO_PATCH_FOR_QUANTIZATION``, e.g. Llama 4's): whether one of those
    container classes lives in ``model_type``'s modeling module."""
    import importlib

    try:
        from transformers.models.auto.configuration_auto import model_type_to_module_name
        from transformers.quantizers.base import MODULES_TO_PATCH_FOR_QUANTIZATION as patched
        from transformers.utils.quantization_config import QuantizationMethod

        mod = importlib.import_module(f"transformers.models.{model_type_to_module_name(model_type)}."
                                      f"modeling_{model_type_to_module_name(model_type)}")
    except (ImportError, AttributeError, ValueError):
        return False
    return any(hasattr(mod, cls) and QuantizationMethod.COMPRESSED_TENSORS in v.get("quantization_methods", [])
               for cls, v in patched.items())
