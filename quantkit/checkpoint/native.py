"""quantkit's own layout (docs/FORMAT.md): HF config.json + one model.safetensors.

Each quantized linear ``L`` stores its format's tensors under ``L.<key>`` (e.g. ``L.qweight``,
``L.scales``, ``L.zeros``, ``L.g_idx``; LUT formats ``L.lut``), its bias as ``L.bias``, and its
scheme in ``config.json["quantization_config"]["layers"][L]``. Everything else is the float
state dict. Tied weights are stored once.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, QuantkitError
from ..models.discovery import set_module
from ..nn import QuantLinear
from ..registry import register
from .caps import LayoutCaps
from .io import safe_load_tensors, write_json

QUANT_METHOD = "quantkit"
FORMAT_VERSION = 1


def _dedupe_tied(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    seen: dict[tuple, str] = {}
    out = {}
    for k, v in sd.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), v.dtype)
        if v.numel() and key in seen:
            continue
        seen[key] = k
        out[k] = v.detach().contiguous().cpu()
    return out


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
        sd = _dedupe_tied(sd)
        save_file(sd, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt", "quantkit": "1"})
        cfg = model.config.to_dict()
        cfg["quantization_config"] = {
            "quant_method": QUANT_METHOD,
            "format_version": FORMAT_VERSION,
            **{k: v for k, v in meta.items() if k != "layers"},
            "layers": layers,
        }
        write_json(os.path.join(out_dir, "config.json"), cfg)

    @staticmethod
    def load(path: str, cfg: dict[str, Any]) -> nn.Module:
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        qc = cfg.get("quantization_config") or {}
        layers = qc.get("layers")
        if not isinstance(layers, dict):
            raise CheckpointError(f"{path}/config.json: quantization_config.layers is missing or not a mapping")
        base = {k: v for k, v in cfg.items() if k != "quantization_config"}
        mt = base.pop("model_type", None)
        if mt is None:
            raise CheckpointError(f"{path}/config.json: model_type is missing")
        n_layers = base.get("num_hidden_layers", base.get("n_layer"))
        if n_layers is not None and (not isinstance(n_layers, int) or isinstance(n_layers, bool)
                                     or not 0 < n_layers <= 100_000):
            raise CheckpointError(f"{path}/config.json: num_hidden_layers = {n_layers!r} is not a layer count")
        try:
            hf_cfg = AutoConfig.for_model(mt, **base)
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{path}/config.json: unsupported model_type {mt!r} ({e})") from None
        except Exception as e:  # noqa: BLE001 - transformers' config validation raises its own types
            raise CheckpointError(f"{path}/config.json: invalid {mt} config ({type(e).__name__}: {e})") from None
        try:
            with init_empty_weights(include_buffers=False):
                model = AutoModelForCausalLM.from_config(hf_cfg)
        except Exception as e:  # noqa: BLE001 - e.g. ZeroDivisionError for 0 attention heads
            raise CheckpointError(f"{path}/config.json: cannot build a {mt} model from this config "
                                  f"({type(e).__name__}: {e})") from None
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
            try:
                ql = QuantLinear(shape[1], shape[0], spec, packed, bias)
            except QuantkitError as e:
                raise CheckpointError(f"{path}: layer {name!r}: {e}") from None
            set_module(model, name, ql)
        _load_float_tensors(model, tensors, path)
        return model


def _load_float_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], path: str) -> None:
    expected = dict(model.named_parameters())
    expected.update({k: v for k, v in model.named_buffers() if k in model.state_dict()})
    for k, t in tensors.items():
        ref = expected.get(k)
        if ref is None:
            raise CheckpointError(f"{path}: tensor {k!r} does not belong to this model (config/tensor mismatch)")
        if tuple(ref.shape) != tuple(t.shape):
            raise CheckpointError(f"{path}: tensor {k!r} has shape {tuple(t.shape)}, the model expects {tuple(ref.shape)}")
        if not t.dtype.is_floating_point and ref.dtype.is_floating_point:
            raise CheckpointError(f"{path}: tensor {k!r} has dtype {t.dtype}, expected a float tensor")
    missing = model.load_state_dict(tensors, strict=False, assign=True).missing_keys
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    still_meta = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.device.type == "meta"]
    if still_meta:
        raise CheckpointError(f"{path}: tensors missing from the checkpoint: {', '.join(still_meta[:5])}"
                              f"{' ...' if len(still_meta) > 5 else ''}")
    del missing
