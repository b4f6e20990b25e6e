"""What the layouts share: Hugging Face ``config.json`` + safetensors checkpoints.

Model skeletons built from a config on the meta device (:func:`build_skeleton`), the float tensors
around the quantized layers (:func:`float_state_dict`, :func:`load_float_tensors`), checked tensor
reads, 32-bit word packing of code streams (compressed-tensors and GPTQ store words) and the ``int``
format's layers as the external layouts see them. native.py, compressed_tensors.py and gptq.py import
from here and from nowhere else in this folder but io.py.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError
from ..formats.packing import pack_codes, packed_row_bytes, unpack_codes
from ..moe.experts import unfuse_experts
from ..moe.names import from_checkpoint, to_checkpoint
from ..nn import QuantLinear, make_quantlinear
from .io import safe_load_tensors, safetensors_files, write_json

SCALE_DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}
_INT_KEYS = {"qweight", "scales", "zeros", "g_idx"}


def words_from_bytes(b: torch.Tensor) -> torch.Tensor:
    """uint8 ``[R, n]`` -> int32 ``[R, ceil(n/4)]``, little-endian (byte 0 = bits 0..7 of word 0)."""
    rows, n = b.shape
    pad = (-n) % 4
    if pad:
        b = torch.nn.functional.pad(b, (0, pad))
    if sys.byteorder == "little":  # the bytes of little-endian int32 words are exactly this stream
        return b.contiguous().view(torch.int32).clone()
    x = b.to(torch.int64).view(rows, -1, 4)
    w = x[..., 0] | (x[..., 1] << 8) | (x[..., 2] << 16) | (x[..., 3] << 24)
    w = torch.where(w >= 2 ** 31, w - 2 ** 32, w)  # two's complement, explicitly
    return w.to(torch.int32).contiguous()


def bytes_from_words(w: torch.Tensor) -> torch.Tensor:
    """int32 ``[R, m]`` -> uint8 ``[R, 4m]`` (inverse of :func:`words_from_bytes`)."""
    if sys.byteorder == "little":
        return w.to(torch.int32).contiguous().view(torch.uint8).clone()
    x = w.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.tensor([0, 8, 16, 24], dtype=torch.int64)
    return ((x.unsqueeze(-1) >> shifts) & 0xFF).to(torch.uint8).reshape(w.shape[0], -1)


def pack_words(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes ``[R, C]`` in ``[0, 2^bits)`` -> int32 ``[R, ceil(C*bits/32)]``, a dense LSB-first bit stream."""
    return words_from_bytes(pack_codes(codes.contiguous(), bits))


def unpack_words(words: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """int32 ``[R, ceil(cols*bits/32)]`` -> int32 codes ``[R, cols]`` (inverse of :func:`pack_words`)."""
    return unpack_codes(bytes_from_words(words)[:, :packed_row_bytes(cols, bits)].contiguous(), bits, cols)


def quant_layers(model: nn.Module) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def float_state_dict(model: nn.Module, skip: set[str]) -> dict[str, torch.Tensor]:
    """The state dict without the tensors of the modules in ``skip`` (tied weights stored once)."""
    sd = {k: v for k, v in model.state_dict().items() if k.rpartition(".")[0] not in skip}
    return dedupe_tied(sd)


def build_skeleton(path: str, cfg: dict[str, Any]) -> nn.Module:
    """The float model of ``config.json`` on the meta device (weights come from the checkpoint)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    base = {k: v for k, v in cfg.items() if k != "quantization_config"}
    mt = base.pop("model_type", None)
    if not isinstance(mt, str):
        raise CheckpointError(f"{path}/config.json: model_type is missing")
    _check_layer_count(path, base)
    try:
        hf_cfg = AutoConfig.for_model(mt, **base)
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(hf_cfg)
    except Exception as e:  # noqa: BLE001 - whatever a bad config makes transformers raise
        raise CheckpointError(f"{path}/config.json: cannot build a {mt!r} model from this config "
                              f"({type(e).__name__}: {str(e)[:300]})") from None
    # MoE: fused expert containers become per-expert linears, as quantize() made them, unless the
    # checkpoint stores one fused (kept float by the recipe's ignore)
    keys = {from_checkpoint(k, mt) for k in _stored_keys(path)}
    unfuse_experts(model, verify=False, skip=lambda n: f"{n}.down_proj" in keys)
    return model


def export_tensors(path: str, cfg: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of an export layout's checkpoint under the model's module names (MoE experts are stored
    under their hub names for some families: quantkit.moe.names)."""
    mt = cfg.get("model_type")
    return {from_checkpoint(k, mt): v for k, v in safe_load_tensors(path).items()}


def _stored_keys(path: str) -> set[str]:
    keys: set[str] = set()
    for fp in safetensors_files(path):
        keys.update(_header(fp))
    return keys


def _check_layer_count(path: str, cfg: dict[str, Any]) -> None:
    """A layer count beyond the number of stored tensors is a lie (and would take forever to build)."""
    n_tensors = 0
    for fp in safetensors_files(path):
        n_tensors += _header_tensor_count(fp)
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        v = cfg.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1 or v > n_tensors):
            raise CheckpointError(f"{path}/config.json: {key} = {v!r} does not fit a checkpoint of {n_tensors} "
                                  f"tensors")


def _header_tensor_count(fp: str) -> int:
    return len(_header(fp))


def _header(fp: str) -> list[str]:
    """The tensor names of a safetensors file's header."""
    import struct

    try:
        with open(fp, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{fp}: truncated ({len(head)} bytes); re-create the checkpoint")
            n = struct.unpack("<Q", head)[0]
            if n > 100_000_000 or n > os.path.getsize(fp) - 8:
                raise CheckpointError(f"{fp}: corrupt safetensors header (length {n}); re-create the checkpoint")
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{fp}: corrupt safetensors header ({e}); re-create the checkpoint") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{fp}: corrupt safetensors header (not a JSON object)")
    return [k for k in header if k != "__metadata__"]


def finish_load(model: nn.Module, tensors: dict[str, torch.Tensor], path: str) -> nn.Module:
    load_float_tensors(model, tensors, path)
    return model


def linear_shape(model: nn.Module, name: str, path: str) -> tuple[int, int, bool]:
    """(out, in, has_bias) of the float linear ``name`` of a skeleton model."""
    try:
        mod = model.get_submodule(name)
    except AttributeError:
        raise CheckpointError(f"{path}: quantized layer {name!r} does not exist in this model") from None
    if not isinstance(mod, nn.Linear):
        raise CheckpointError(f"{path}: {name!r} is a {type(mod).__name__}, not a linear layer; only nn.Linear "
                              f"layers are read from this layout")
    return mod.out_features, mod.in_features, mod.bias is not None


def int_quantlinear(name: str, path: str, shape: tuple[int, int], bits: int, group_size: int | None, sym: bool,
                    packed: dict[str, torch.Tensor], bias: torch.Tensor | None, source: dict[str, Any]
                    ) -> QuantLinear:
    """A QuantLinear of quantkit's ``int`` format from native tensors (validated by the format)."""
    sdt = packed["scales"].dtype
    if sdt not in SCALE_DTYPES:
        raise CheckpointError(f"{path}: layer {name!r}: scales have dtype {sdt}; expected float16, bfloat16 or "
                              f"float32")
    spec = {"quantizer": {"type": "imported", **source},
            "format": {"type": "int", "bits": bits, "group_size": group_size, "sym": sym,
                       "scale_dtype": SCALE_DTYPES[sdt]},
            "transforms": []}
    return make_quantlinear(shape, spec, packed, bias, checkpoint=path, name=name)


def plain_parts(name: str, ql: QuantLinear, keys: set[str], layout: str) -> dict[str, torch.Tensor]:
    """The packed tensors of a QuantLinear that an external layout exports; refuses run-time transforms
    and any tensor outside ``keys``, which the layout cannot express."""
    spec = ql.spec
    if spec.get("transforms"):
        kinds = ", ".join(t.get("type", "?") for t in spec["transforms"])
        raise CheckpointError(
            f"layer {name!r} has run-time transforms ({kinds}) that the {layout} layout cannot express; save it "
            f"with layout='native' or quantize without transforms")
    packed = ql.packed
    extra = set(packed) - keys
    if extra:
        raise CheckpointError(f"layer {name!r} holds tensors {sorted(extra)} the {layout} layout cannot express; "
                              f"save it with layout='native'")
    return packed


def int_layer_parts(name: str, ql: QuantLinear, layout: str) -> tuple[Any, dict[str, torch.Tensor]]:
    """(IntConfig, packed) of a QuantLinear exported by an external layout; refuses what it cannot hold."""
    if ql.spec["format"].get("type") != "int":
        raise CheckpointError(
            f"layer {name!r} uses format {ql.fmt.describe()!r}; the {layout} layout holds only the 'int' format "
            f"here; save it with layout='native'")
    return ql.fmt.cfg, plain_parts(name, ql, _INT_KEYS, layout)


def check_no_conv1d(model: nn.Module, layout: str) -> None:
    if any(type(m).__name__ == "Conv1D" for m in model.modules()) or getattr(model.config, "model_type", "") == "gpt2":
        raise CheckpointError(f"this architecture ({type(model).__name__}) stores linear weights transposed "
                              f"(GPT-2 Conv1D); the {layout} layout expects nn.Linear; save it with layout='native'")


def tensor_of(tensors: dict[str, torch.Tensor], key: str, path: str, dtypes: tuple, ndim: int | None = None
              ) -> torch.Tensor:
    t = tensors.get(key)
    if t is None:
        raise CheckpointError(f"{path}: tensor {key!r} is missing")
    if t.dtype not in dtypes or (ndim is not None and t.dim() != ndim):
        raise CheckpointError(f"{path}: tensor {key!r} has dtype {t.dtype} and {t.dim()} dims; expected "
                              f"{' or '.join(str(d) for d in dtypes)}{'' if ndim is None else f' with {ndim} dims'}")
    return t


def expect_shape(t: torch.Tensor, shape: tuple[int, ...], key: str, path: str) -> None:
    if tuple(t.shape) != tuple(shape):
        raise CheckpointError(f"{path}: tensor {key!r} has shape {tuple(t.shape)}, expected {tuple(shape)} "
                              f"(config/tensor mismatch)")


def dedupe_tied(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached CPU copies of ``sd``, a tensor shared by several names (tied weights) kept once."""
    seen: dict[tuple, str] = {}
    out = {}
    for k, v in sd.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), v.dtype)
        if v.numel() and key in seen:
            continue
        seen[key] = k
        out[k] = v.detach().contiguous().cpu()
    return out


def load_float_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], path: str) -> None:
    """Load the float (not quantized) tensors into a skeleton model, checking names, shapes and dtypes;
    every tensor left on the meta device is named."""
    expected = dict(model.named_parameters())
    expected.update({k: v for k, v in model.named_buffers() if k in model.state_dict()})
    for k, t in tensors.items():
        ref = expected.get(k)
        if ref is None:
            raise CheckpointError(f"{path}: tensor {k!r} does not belong to this model (config/tensor mismatch)")
        if tuple(ref.shape) != tuple(t.shape):
            raise CheckpointError(f"{path}: tensor {k!r} has shape {tuple(t.shape)}, the model expects "
                                  f"{tuple(ref.shape)}")
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


def write_export(model: nn.Module, out_dir: str, qc: dict[str, Any], per_layer: dict[str, dict]) -> None:
    """Write ``model.safetensors`` (float tensors + each quantized layer's exported tensors and bias)
    and ``config.json`` with ``qc`` as its quantization_config. Shared by the export layouts. Tensor names are
    the checkpoint names of the model type (MoE experts: quantkit.moe.names; ``qc`` is the caller's to name)."""
    from safetensors.torch import save_file

    sd = float_state_dict(model, set(per_layer))
    for name, ql in quant_layers(model).items():
        for k, v in per_layer[name].items():
            sd[f"{name}.{k}"] = v
        if ql.bias is not None:
            sd[f"{name}.bias"] = ql.bias.detach().contiguous().cpu()
    mt = getattr(model.config, "model_type", None)
    sd = {to_checkpoint(k, mt): v for k, v in sd.items()}
    save_file(sd, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    cfg = model.config.to_dict()
    cfg["quantization_config"] = qc
    write_json(os.path.join(out_dir, "config.json"), cfg)
