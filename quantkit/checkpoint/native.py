"""quantkit's own layout (docs/FORMAT.md): HF config.json + one model.safetensors.

Each quantized linear ``L`` stores its format's tensors under ``L.<key>`` (e.g. ``L.qweight``,
``L.scales``, ``L.zeros``, ``L.g_idx``; LUT formats ``L.lut``), its bias as ``L.bias``, and its
scheme in ``config.json["quantization_config"]["layers"][L]``. Everything else is the float
state dict. Tied weights are stored once.
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from ..errors import CheckpointError
from ..models.discovery import set_module
from ..nn import QuantLinear, make_quantlinear
from ..registry import register
from .caps import LayoutCaps
from .hf import build_skeleton, dedupe_tied, load_float_tensors
from .io import safe_load_tensors, write_json

QUANT_METHOD = "quantkit"
FORMAT_VERSION = 1


def native_config(model: nn.Module, meta: dict[str, Any], layers: dict[str, Any]) -> dict[str, Any]:
    """config.json of a native checkpoint (also written by quantkit.stream's streaming save)."""
    cfg = model.config.to_dict()
    cfg["quantization_config"] = {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        **{k: v for k, v in meta.items() if k != "layers"},
        "layers": layers,
    }
    return cfg


@register("layout", "native")
class NativeLayout:
    QUANT_METHOD = QUANT_METHOD
    CAPS = LayoutCaps(formats=None, transforms=True, kv_cache=True)  # holds whatever quantkit makes

    @staticmethod
    def save(model: nn.Module, out_dir: str, meta: dict[str, Any]) -> None:
        from safetensors.torch import save_file

        layers = {n: {**m.spec, "shape": list(m.shape)} for n, m in model.named_modules()
                  if isinstance(m, QuantLinear)}
        sd = {}
        for k, v in model.state_dict().items():
            # buffer names use "__" where a transform's key had "."; restore the dotted key on disk
            mod, _, leaf = k.rpartition(".")
            sd[f"{mod}.{leaf.replace('__', '.')}" if mod in layers else k] = v
        sd = dedupe_tied(sd)
        save_file(sd, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt", "quantkit": "1"})
        write_json(os.path.join(out_dir, "config.json"), native_config(model, meta, layers))

    @staticmethod
    def load(path: str, cfg: dict[str, Any]) -> nn.Module:
        qc = cfg.get("quantization_config") or {}
        layers = qc.get("layers")
        if not isinstance(layers, dict):
            raise CheckpointError(f"{path}/config.json: quantization_config.layers is missing or not a mapping")
        model = build_skeleton(path, cfg)
        mt = cfg["model_type"]
        tensors = safe_load_tensors(path)
        for name, spec in layers.items():
            where = f"{path}/config.json: quantization_config.layers[{name!r}]"
            if not isinstance(spec, dict):
                raise CheckpointError(f"{where} must be a mapping, got {type(spec).__name__}")
            tr = spec.get("transforms", [])
            if not isinstance(tr, list) or not all(isinstance(t, dict) and isinstance(t.get("type"), str) for t in tr):
                raise CheckpointError(f"{where}.transforms must be a list of mappings with a 'type'")
            try:
                old = model.get_submodule(name)
            except AttributeError:
                raise CheckpointError(f"{path}: quantized layer {name!r} does not exist in a {mt} model") from None
            shape = spec.get("shape")
            if not (isinstance(shape, list) and len(shape) == 2
                    and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in shape)):
                raise CheckpointError(f"{where}.shape must be [out, in] (two positive integers), got {shape!r}")
            prefix = name + "."
            # a QuantLinear has no submodules: every key under its prefix but the bias is its own
            packed = {k[len(prefix):]: tensors.pop(k) for k in list(tensors)
                      if k.startswith(prefix) and k != prefix + "bias"}
            if not packed:
                raise CheckpointError(f"{path}: no tensors stored for quantized layer {name!r}")
            bias = tensors.pop(prefix + "bias", None)
            had_bias = getattr(old, "bias", None) is not None
            if had_bias != (bias is not None):
                raise CheckpointError(f"{path}: layer {name!r} bias {'missing' if had_bias else 'unexpected'}")
            set_module(model, name, make_quantlinear((shape[0], shape[1]), spec, packed, bias, checkpoint=path,
                                                     name=name))
        load_float_tensors(model, tensors, path)
        return model
