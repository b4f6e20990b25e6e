"""The compressed-tensors layout (``quant_method: compressed-tensors``), what vLLM, llm-compressor and
transformers read. Export and import; docs/EXPORT.md describes the mapping.

Layout (as compressed-tensors 0.20.0 reads it; its source, Apache-2.0, was read to write this — no code
was copied). Each quantized linear ``L`` stores:

``pack-quantized`` (INT2–INT8 weight-only):
  * ``L.weight_packed`` int32 ``[out, ceil(in*b/32)]``: the b-bit codes of one output row as a dense
    little-endian bit stream along the input dimension, code j at bits ``[j*b, (j+1)*b)`` of the row's
    words (bit 0 = LSB of word 0; for b = 4: 8 nibbles per word, column 8k+i in nibble i of word k).
    Codes are stored offset by ``+2^(b-1)``: the signed value v in ``[-2^(b-1), 2^(b-1))`` is stored as
    ``v + 2^(b-1)`` — which is exactly quantkit's unsigned code q, so the bit stream is quantkit's
    ``qweight`` bit stream padded to whole 32-bit words.
  * ``L.weight_scale`` ``[out, n_groups]`` (group), ``[out, 1]`` (channel), float16/bfloat16/float32.
  * ``L.weight_zero_point`` (asymmetric only) int32 ``[ceil(out*b/32), n_groups]``: zero points, offset by
    ``+2^(b-1)`` like the codes (so again quantkit's unsigned z), packed the same way but along the
    *output* dimension (``packed_dim=0``).
  * ``L.weight_shape`` int64 ``[2]`` = ``[out, in]``.
  Dequantization: ``w = (v - zp) * s`` with v, zp signed, i.e. ``(q - z) * s`` in quantkit's terms.
``int-quantized`` / ``naive-quantized`` (INT8 weights): ``L.weight`` int8 (signed codes), ``L.weight_scale``.
``float-quantized`` (FP8): ``L.weight`` float8, ``L.weight_scale`` float32, optional ``L.input_scale``.

compressed-tensors' ``group`` strategy needs ``in % group_size == 0``. quantkit's shorter last group (576
columns in groups of 128) is exported exactly by splitting every group into groups of
``gcd(group_size, in)`` columns that repeat the group's scale and zero point (``partial_groups="expand"``,
the default: 576/128 -> groups of 64); ``partial_groups="error"`` refuses instead.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError
from ..formats.base import column_groups
from ..formats.packing import pack_codes, packed_row_bytes, unpack_codes
from ..models.discovery import is_linear, set_module
from ..moe.names import to_checkpoint, transformers_reads_split
from ..nn import QuantLinear, make_quantlinear
from ..registry import register
from .caps import LayoutCaps, any_config
from .hf import (
    SCALE_DTYPES,
    build_skeleton,
    bytes_from_words,
    check_no_conv1d,
    expect_shape,
    export_tensors,
    finish_load,
    int_layer_parts,
    int_quantlinear,
    linear_shape,
    pack_words,
    plain_parts,
    quant_layers,
    tensor_of,
    unpack_words,
    words_from_bytes,
    write_export,
)

QUANT_METHOD = "compressed-tensors"
CT_VERSION = "0.20.0"  # the compressed-tensors release this layout was verified against


# ================================================================================================
# export
# ================================================================================================
def _int_scheme(name: str, ql: QuantLinear, partial_groups: str, common: int | None = None
                ) -> tuple[dict, dict[str, torch.Tensor]]:
    cfg, packed = int_layer_parts(name, ql, "compressed-tensors")
    out, inn = ql.shape
    b = cfg.bits
    if "g_idx" in packed:
        raise CheckpointError(
            f"layer {name!r} uses act-order group indices (g_idx); compressed-tensors (>= 0.1x) removed "
            f"actorder 'group'. Re-quantize with quantizer static_groups: true (the default), or export with "
            f"layout='gptq'")
    scales = packed["scales"]
    zeros = None if cfg.sym else packed["zeros"]
    ng = scales.shape[1]
    if common is not None:  # every layer in groups of ``common`` columns (one scheme: see _common_group)
        idx = (torch.arange(inn // common) * common) // (cfg.group_size if ng > 1 else inn)
        scales = scales[:, idx]
        zeros = None if zeros is None else zeros[:, idx]
        args = {"num_bits": b, "type": "int", "symmetric": cfg.sym, "strategy": "group", "group_size": common,
                "dynamic": False}
    elif ng == 1:
        args = {"num_bits": b, "type": "int", "symmetric": cfg.sym, "strategy": "channel", "group_size": None,
                "dynamic": False}
    else:
        g = cfg.group_size
        if inn % g:
            g2 = math.gcd(g, inn)
            if partial_groups == "error":
                divs = [d for d in (128, 64, 32, 16) if inn % d == 0]
                raise CheckpointError(
                    f"layer {name!r}: {inn} input columns are not a multiple of group_size {g} (the last group "
                    f"holds {inn % g}); compressed-tensors' group strategy needs whole groups. Re-quantize with "
                    f"group_size {' or '.join(map(str, divs[:2])) or g2}, or export with partial_groups='expand' "
                    f"(exact: groups of {g2} that repeat each scale)")
            if partial_groups != "expand":
                raise CheckpointError(f"partial_groups must be 'expand' or 'error', got {partial_groups!r}")
            idx = (torch.arange(inn // g2) * g2) // g
            scales = scales[:, idx]
            zeros = None if zeros is None else zeros[:, idx]
            g = g2
        args = {"num_bits": b, "type": "int", "symmetric": cfg.sym, "strategy": "group", "group_size": g,
                "dynamic": False}
    t = {"weight_packed": words_from_bytes(packed["qweight"]),
         "weight_scale": scales.contiguous(),
         "weight_shape": torch.tensor([out, inn], dtype=torch.int64)}
    if zeros is not None:
        t["weight_zero_point"] = pack_words(zeros.t().contiguous().to(torch.int32), b).t().contiguous()
    return {"weights": args, "input_activations": None, "format": "pack-quantized"}, t


def _common_group(layers: dict[str, QuantLinear], partial_groups: str) -> int | None:
    """One group size for every layer of an all-``int`` asymmetric model, or None.

    transformers loads an asymmetric pack-quantized checkpoint only with ``dequantize`` (see ct_config),
    and that path decompresses every layer with the *first* config group's scheme. So such a checkpoint
    must have a single scheme: each layer's groups (and a one-group layer's row) are split into groups of
    the gcd of all of them, repeating scales and zero points (exact, as for a shorter last group)."""
    if partial_groups != "expand" or not layers:
        return None
    cfgs = [ql.fmt.cfg for ql in layers.values()]
    if any(ql.spec["format"].get("type") != "int" or "g_idx" in ql.packed for ql in layers.values()):
        return None
    if len({(c.bits, c.sym) for c in cfgs}) != 1 or cfgs[0].sym:
        return None
    sizes = [math.gcd(c.group_size, ql.in_features) if ql.packed["scales"].shape[1] > 1 else ql.in_features
             for c, ql in zip(cfgs, layers.values())]
    if all(ql.packed["scales"].shape[1] == 1 for ql in layers.values()):
        return None  # all per channel: one scheme already
    return math.gcd(*sizes)


def _act_args(act: str, type_: str) -> dict | None:
    """compressed-tensors input_activations for quantkit's ``activations`` (none / dynamic / static)."""
    if act == "none":
        return None
    dynamic = act == "dynamic"
    return {"num_bits": 8, "type": type_, "symmetric": True, "strategy": "token" if dynamic else "tensor",
            "dynamic": dynamic, "group_size": None}


def _fp8_scheme(name: str, ql: QuantLinear, partial_groups: str, common: int | None = None
                ) -> tuple[dict, dict[str, torch.Tensor]]:
    """quantkit ``fp8`` -> ``float-quantized`` (W8A8) or ``naive-quantized`` (W8A16): weight, weight_scale,
    input_scale (static activations only)."""
    cfg = ql.fmt.cfg
    if cfg.dtype != "e4m3" or cfg.act_kind != "e4m3":
        raise CheckpointError(f"layer {name!r} uses FP8 {cfg.dtype}/{cfg.act_kind}; compressed-tensors holds "
                              f"E4M3 only; re-quantize with dtype: e4m3 or save with layout='native'")
    packed = plain_parts(name, ql, {"weight", "weight_scale", "input_scale"}, QUANT_METHOD)
    strategy = cfg.weight_scale  # "channel" [out, 1] or "tensor" [1]
    args = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": strategy, "group_size": None,
            "dynamic": False}
    s = packed["weight_scale"].float()
    t = {"weight": packed["weight"].contiguous(),
         "weight_scale": (s.reshape(-1, 1) if strategy == "channel" else s.reshape(1)).contiguous()}
    act = _act_args(cfg.activations, "float")
    if cfg.activations == "static":
        t["input_scale"] = packed["input_scale"].float().reshape(1).contiguous()
    return {"weights": args, "input_activations": act,
            "format": "naive-quantized" if act is None else "float-quantized"}, t


def _int8a8_scheme(name: str, ql: QuantLinear, partial_groups: str, common: int | None = None
                   ) -> tuple[dict, dict[str, torch.Tensor]]:
    """quantkit ``int8a8`` -> ``int-quantized``: weight int8 = q - 128, weight_scale [out, 1], input_scale."""
    cfg = ql.fmt.cfg
    packed = plain_parts(name, ql, {"qweight", "scales", "input_scale"}, QUANT_METHOD)
    codes = unpack_codes(packed["qweight"], 8, ql.in_features)
    t = {"weight": (codes - 128).to(torch.int8).contiguous(), "weight_scale": packed["scales"].contiguous()}
    if cfg.activations == "static":
        t["input_scale"] = packed["input_scale"].float().reshape(1).contiguous()
    args = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "group_size": None,
            "dynamic": False}
    return {"weights": args, "input_activations": _act_args(cfg.activations, "int"), "format": "int-quantized"}, t


# quantkit format (registry name) -> its exporter:
# (layer name, layer, partial_groups, common group size or None) -> (scheme, tensors)
EXPORTERS = {"int": _int_scheme, "fp8": _fp8_scheme, "int8a8": _int8a8_scheme}


def ct_config(model: nn.Module, partial_groups: str = "expand"
              ) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    """(quantization_config, per-layer tensors) of a quantized model in compressed-tensors terms."""
    check_no_conv1d(model, "compressed-tensors")
    mt = getattr(model.config, "model_type", None)  # names as the checkpoint stores them (MoE: moe.names)
    layers = quant_layers(model)
    if not layers:
        raise CheckpointError("the model has no quantized layers; nothing to export")
    per_layer: dict[str, dict[str, torch.Tensor]] = {}
    groups: dict[str, tuple[dict, list[str]]] = {}
    common = _common_group(layers, partial_groups)
    for name, ql in layers.items():
        export = EXPORTERS.get(ql.spec["format"].get("type"))
        if export is None:
            raise CheckpointError(f"layer {name!r} uses format {ql.fmt.describe()!r}, which compressed-tensors "
                                  f"cannot hold (it holds {', '.join(sorted(EXPORTERS))}; fp8 as e4m3); save it "
                                  f"with layout='native'")
        scheme, t = export(name, ql, partial_groups, common)
        per_layer[name] = t
        key = json.dumps(scheme, sort_keys=True)
        groups.setdefault(key, (scheme, []))[1].append(name)
    _warn_split_experts(layers, mt)
    # kept-float linears, MoE routers included when they are nn.Linear subclasses (Llama 4's router):
    # compressed-tensors' "Linear" target would match them
    ignore = sorted(to_checkpoint(n, mt) for n, m in model.named_modules()
                    if n and (is_linear(m) or isinstance(m, torch.nn.Linear)))
    single = len(groups) == 1
    config_groups = {}
    for i, (scheme, names) in enumerate(groups.values()):
        config_groups[f"group_{i}"] = {
            "targets": ["Linear"] if single else sorted(to_checkpoint(n, mt) for n in names),
            "weights": scheme["weights"], "input_activations": scheme["input_activations"],
            "output_activations": None, "format": scheme["format"]}
    formats = {s["format"] for s, _ in groups.values()}
    qc = {
        "quant_method": QUANT_METHOD,
        "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed",
        "config_groups": config_groups,
        "ignore": ignore,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
        "version": CT_VERSION,
    }
    if len(groups) == 1 and any(s["format"] == "pack-quantized" and not s["weights"]["symmetric"]
                                for s, _ in groups.values()):
        # transformers + compressed-tensors (0.20.0) build the compressed layers for loading with an
        # *unpacked* zero point [out, n_groups] (the meta-device branch of the pack-quantized compressor
        # does not pack it), so the packed zero point written here (as llm-compressor and vLLM store it)
        # fails with a size mismatch (llm-compressor issue #1618). ``dequantize`` is transformers' load
        # option for this config: it decompresses each layer while loading, through compressed-tensors'
        # own decompressor, which reads the packed zero point. vLLM and compressed-tensors ignore the key.
        # That path applies the first config group's scheme to every layer, hence one group only
        # (_common_group); asymmetric mixed precision keeps several groups and does not load in transformers.
        qc["dequantize"] = True
    return qc, per_layer


def _warn_split_experts(layers: dict[str, QuantLinear], mt: str | None) -> None:
    """Per-expert tensors of a family whose transformers model reads its experts fused only (gpt-oss): say so."""
    if any(re.search(r"\.experts\.\d+\.", n) for n in layers) and transformers_reads_split(mt) is False:
        warnings.warn(
            f"compressed-tensors export of {mt!r}: the experts are stored one by one (experts.{{i}}.gate_proj, ...); "
            f"quantkit.load reads them back, but transformers has no per-expert mapping for {mt!r} (from_pretrained "
            f"leaves its fused experts uninitialised) and vLLM's gpt-oss loader does not map them either "
            f"(docs/MOE.md)", stacklevel=3)


def save_compressed_tensors(model: nn.Module, out_dir: str, meta: dict[str, Any] | None = None,
                            partial_groups: str | None = None) -> None:
    """Write ``config.json`` and ``model.safetensors`` of ``model`` into ``out_dir`` (a fresh folder)."""
    meta = meta or {}
    partial_groups = partial_groups or (meta.get("export_options") or {}).get("partial_groups", "expand")
    qc, per_layer = ct_config(model, partial_groups)
    write_export(model, out_dir, qc, per_layer)


# ================================================================================================
# import
# ================================================================================================
def _match(name: str, module: nn.Module, targets: list[str]) -> bool:
    for t in targets:
        if not isinstance(t, str):
            continue
        if t.startswith("re:"):
            try:
                if re.match(t[3:], name):
                    return True
            except re.error:
                raise CheckpointError(f"quantization_config: bad regular expression {t!r}") from None
        elif t == name or any(c.__name__ == t for c in type(module).__mro__):
            return True
    return False


def _args(d: Any, where: str) -> dict[str, Any]:
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise CheckpointError(f"{where}: expected a mapping, got {type(d).__name__}")
    a = {"num_bits": d.get("num_bits", 8), "type": d.get("type", "int"), "symmetric": d.get("symmetric", True),
         "group_size": d.get("group_size"), "strategy": d.get("strategy"), "dynamic": d.get("dynamic", False),
         "actorder": d.get("actorder")}
    if not isinstance(a["num_bits"], int) or isinstance(a["num_bits"], bool) or not 1 <= a["num_bits"] <= 8:
        raise CheckpointError(f"{where}.num_bits: expected an integer 1..8, got {a['num_bits']!r}")
    gs = a["group_size"]
    if gs is not None and (not isinstance(gs, int) or isinstance(gs, bool) or gs < -1 or gs == 0):
        raise CheckpointError(f"{where}.group_size: expected a positive integer, -1 or null, got {gs!r}")
    if a["strategy"] is None:
        a["strategy"] = "tensor" if gs is None else ("channel" if gs == -1 else "group")
    if a["strategy"] not in ("tensor", "channel", "group", "token", "block", "tensor_group", "attn_head"):
        raise CheckpointError(f"{where}.strategy: unknown strategy {a['strategy']!r}")
    if a["type"] not in ("int", "float"):
        raise CheckpointError(f"{where}.type: expected 'int' or 'float', got {a['type']!r}")
    if not isinstance(a["symmetric"], bool):
        raise CheckpointError(f"{where}.symmetric: expected true/false, got {a['symmetric']!r}")
    return a


def _import_packed(name: str, t: dict[str, torch.Tensor], w: dict, shape: tuple[int, int], bias, path: str,
                   where: str) -> QuantLinear:
    out, inn = shape
    b = w["num_bits"]
    if w["type"] != "int":
        raise CheckpointError(f"{where}: pack-quantized needs integer weights, the config says {w['type']!r}")
    ws = tensor_of(t, f"{name}.weight_shape", path, (torch.int64, torch.int32), 1)
    if ws.numel() != 2 or tuple(int(x) for x in ws) != (out, inn):
        raise CheckpointError(f"{path}: {name}.weight_shape is {ws.tolist()}, the model's layer is [{out}, {inn}]")
    wp = tensor_of(t, f"{name}.weight_packed", path, (torch.int32,), 2)
    expect_shape(wp, (out, math.ceil(inn * b / 32)), f"{name}.weight_packed", path)
    scale = tensor_of(t, f"{name}.weight_scale", path, tuple(SCALE_DTYPES), None)
    strat = w["strategy"]
    if strat == "group":
        g = w["group_size"]
        if g is None or g <= 0 or inn % g:
            raise CheckpointError(f"{where}: group_size {g} does not divide the {inn} input columns of {name!r}")
        ng = inn // g
        group_size = g if ng > 1 else None
    elif strat in ("channel", "tensor"):
        ng, group_size = 1, None
    else:
        raise CheckpointError(f"{where}: weight strategy {strat!r} is not read by quantkit (group, channel, tensor)")
    if strat == "tensor":
        if scale.numel() != 1:
            raise CheckpointError(f"{path}: {name}.weight_scale has {scale.numel()} values; the tensor strategy has 1")
        scale = scale.reshape(1, 1).expand(out, 1)
    expect_shape(scale, (out, ng), f"{name}.weight_scale", path)
    packed = {"qweight": bytes_from_words(wp)[:, :packed_row_bytes(inn, b)].contiguous(),
              "scales": scale.contiguous()}
    if not w["symmetric"]:
        zk = f"{name}.weight_zero_point"
        if strat == "tensor":
            zp = tensor_of(t, zk, path, (torch.int8, torch.int32), None)
            if zp.numel() != 1:
                raise CheckpointError(f"{path}: {zk} has {zp.numel()} values; the tensor strategy has 1")
            z = (zp.reshape(1, 1).to(torch.int32) + (1 << (b - 1))).expand(out, 1)
        else:
            zp = tensor_of(t, zk, path, (torch.int32,), 2)
            expect_shape(zp, (math.ceil(out * b / 32), ng), zk, path)
            z = unpack_words(zp.t().contiguous(), b, out).t()
        if int(z.min()) < 0 or int(z.max()) >= (1 << b):
            raise CheckpointError(f"{path}: {zk} holds values outside the {b}-bit range")
        packed["zeros"] = z.to(torch.uint8).contiguous()
    gk = f"{name}.weight_g_idx"
    if gk in t:
        gi = tensor_of(t, gk, path, (torch.int32, torch.int64), 1)
        expect_shape(gi, (inn,), gk, path)
        natural = column_groups(inn, group_size)
        if not torch.equal(gi.long(), natural):
            packed["g_idx"] = gi.to(torch.int32).contiguous()
    return int_quantlinear(name, path, shape, b, group_size, w["symmetric"], packed, bias,
                           {"layout": "compressed-tensors", "format": "pack-quantized"})


def _activations_of(act: dict, name: str, t: dict, path: str, where: str) -> tuple[str, torch.Tensor | None]:
    """quantkit's ``activations`` (none / dynamic / static) and the static input scale [1, 1]."""
    if not act:
        return "none", None
    if act["num_bits"] != 8:
        raise CheckpointError(f"{where}.input_activations: {act['num_bits']}-bit activations are not supported "
                              f"(8-bit are)")
    if act["dynamic"] is True and act["strategy"] == "token":
        return "dynamic", None
    if act["dynamic"] is False and act["strategy"] == "tensor" and act["symmetric"]:
        xs = tensor_of(t, f"{name}.input_scale", path, (torch.float32, torch.float16, torch.bfloat16), None)
        if xs.numel() != 1:
            raise CheckpointError(f"{path}: {name}.input_scale has {xs.numel()} values; expected 1")
        return "static", xs.float().reshape(1, 1).contiguous()
    raise CheckpointError(f"{where}.input_activations: strategy {act['strategy']!r} dynamic={act['dynamic']} "
                          f"is not supported (dynamic per token, or static symmetric per tensor)")


def _import_int8(name: str, t: dict[str, torch.Tensor], w: dict, act: dict, shape, bias, path: str, where: str
                 ) -> QuantLinear:
    """``int-quantized`` / ``naive-quantized`` integer weights -> ``int8a8`` (with activations) or ``int``."""
    out, inn = shape
    b = w["num_bits"]
    wt = tensor_of(t, f"{name}.weight", path, (torch.int8,), 2)
    expect_shape(wt, (out, inn), f"{name}.weight", path)
    if w["strategy"] not in ("channel", "tensor") or not w["symmetric"]:
        raise CheckpointError(f"{where}: quantkit reads int-quantized weights only symmetric per channel or "
                              f"per tensor, got {w['strategy']} symmetric={w['symmetric']}")
    scale = tensor_of(t, f"{name}.weight_scale", path, tuple(SCALE_DTYPES), None)
    if scale.numel() == 1 and w["strategy"] == "tensor":
        scale = scale.reshape(1, 1).expand(out, 1)
    expect_shape(scale, (out, 1), f"{name}.weight_scale", path)
    off = 1 << (b - 1)
    codes = wt.to(torch.int32) + off
    if int(codes.min()) < 0 or int(codes.max()) >= (1 << b):
        raise CheckpointError(f"{path}: {name}.weight holds values outside the {b}-bit range")
    packed = {"qweight": pack_codes(codes, b), "scales": scale.contiguous()}
    activations, xs = _activations_of(act, name, t, path, where)
    src = {"layout": "compressed-tensors", "format": "int-quantized"}
    if activations == "none":
        return int_quantlinear(name, path, shape, b, None, True, packed, bias, src)
    if b != 8 or act["type"] != "int":
        raise CheckpointError(f"{where}: int{b} weights with {act['type']} activations are not supported "
                              f"(INT8 W8A8 is)")
    if xs is not None:
        packed["input_scale"] = xs
    spec = {"quantizer": {"type": "imported", **src},
            "format": {"type": "int8a8", "activations": activations,
                       "scale_dtype": SCALE_DTYPES[scale.dtype]}, "transforms": []}
    return make_quantlinear((out, inn), spec, packed, bias, checkpoint=path, name=name)


def _import_fp8(name: str, t, w: dict, act: dict, shape, bias, path: str, where: str) -> QuantLinear:
    """``float-quantized`` / ``naive-quantized`` FP8 E4M3 weights -> quantkit ``fp8``."""
    out, inn = shape
    wt = tensor_of(t, f"{name}.weight", path, (torch.float8_e4m3fn,), 2)
    expect_shape(wt, (out, inn), f"{name}.weight", path)
    scale = tensor_of(t, f"{name}.weight_scale", path, (torch.float32, torch.float16, torch.bfloat16), None)
    if w["strategy"] == "channel":
        expect_shape(scale.reshape(-1), (out,), f"{name}.weight_scale", path)
        scale = scale.reshape(out, 1)
    elif w["strategy"] == "tensor":
        if scale.numel() != 1:
            raise CheckpointError(f"{path}: {name}.weight_scale has {scale.numel()} values; the tensor strategy has 1")
        scale = scale.reshape(1, 1)
    else:
        raise CheckpointError(f"{where}: FP8 weight strategy {w['strategy']!r} is not read (channel or tensor)")
    packed = {"weight": wt.contiguous(), "weight_scale": scale.float().contiguous()}  # widening: exact
    activations, xs = _activations_of(act, name, t, path, where)
    if act and act["type"] != "float":
        raise CheckpointError(f"{where}: FP8 weights with {act['type']} activations are not supported")
    if xs is not None:
        packed["input_scale"] = xs
    spec = {"quantizer": {"type": "imported", "layout": "compressed-tensors", "format": "float-quantized"},
            "format": {"type": "fp8", "dtype": "e4m3", "weight_scale": w["strategy"], "activations": activations},
            "transforms": []}
    return make_quantlinear((out, inn), spec, packed, bias, checkpoint=path, name=name)


class _Seen(dict):
    """The tensors of one layer, remembering which keys the reader looked at."""

    def __init__(self, d):
        super().__init__(d)
        self.read: set[str] = set()

    def get(self, k, default=None):
        self.read.add(k)
        return super().get(k, default)

    def __contains__(self, k):
        self.read.add(k)
        return super().__contains__(k)


def load_compressed_tensors(path: str, cfg: dict[str, Any]) -> nn.Module:
    qc = cfg.get("quantization_config")
    if not isinstance(qc, dict):
        raise CheckpointError(f"{path}/config.json: quantization_config is not a mapping")
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise CheckpointError(f"{path}/config.json: quantization_config.config_groups is missing or empty")
    ignore = qc.get("ignore") or []
    if not isinstance(ignore, list):
        raise CheckpointError(f"{path}/config.json: quantization_config.ignore must be a list")
    top_format = qc.get("format", "dense")
    parsed = []
    for gname, g in groups.items():
        where = f"{path}/config.json: quantization_config.config_groups.{gname}"
        if not isinstance(g, dict):
            raise CheckpointError(f"{where}: expected a scheme mapping (preset names are not read)")
        targets = g.get("targets")
        if not isinstance(targets, list) or not targets:
            raise CheckpointError(f"{where}.targets: expected a non-empty list")
        if g.get("output_activations"):
            raise CheckpointError(f"{where}: output activation quantization is not supported")
        parsed.append((gname, targets, _args(g.get("weights"), f"{where}.weights"),
                       _args(g.get("input_activations"), f"{where}.input_activations"),
                       g.get("format") or top_format, where))
    if qc.get("kv_cache_scheme"):
        raise CheckpointError(f"{path}/config.json: kv_cache_scheme is not supported by quantkit's loader")

    model = build_skeleton(path, cfg)
    tensors = export_tensors(path, cfg)  # under the module names
    mt = cfg.get("model_type")
    prefixes = sorted({k.rpartition(".")[0] for k in tensors
                       if k.endswith((".weight_packed", ".weight_scale"))})
    for name in prefixes:
        out, inn, has_bias = linear_shape(model, name, path)
        module = model.get_submodule(name)
        names = (name, to_checkpoint(name, mt))  # targets may name either (MoE hub names: moe.names)
        hit = None
        if not any(_match(n, module, ignore) for n in names):
            hit = next((p for p in parsed if any(_match(n, module, p[1]) for n in names)), None)
        if hit is None:
            raise CheckpointError(f"{path}: layer {name!r} holds quantized tensors but no config group targets it "
                                  f"(or it is in ignore): config and tensors do not match")
        _, _, w, act, fmt, where = hit
        if not w:
            raise CheckpointError(f"{where}: no weights scheme, but layer {name!r} holds quantized weights")
        bias = tensors.pop(f"{name}.bias", None)
        if has_bias != (bias is not None):
            raise CheckpointError(f"{path}: layer {name!r} bias {'missing' if has_bias else 'unexpected'}")
        mine = {k: tensors.pop(k) for k in list(tensors) if k.rpartition(".")[0] == name}
        seen = _Seen(mine)
        if fmt == "pack-quantized":
            ql = _import_packed(name, seen, w, (out, inn), bias, path, where)
        elif fmt in ("int-quantized", "naive-quantized") and w["type"] == "int":
            ql = _import_int8(name, seen, w, act, (out, inn), bias, path, where)
        elif fmt in ("float-quantized", "naive-quantized") and w["type"] == "float" and w["num_bits"] == 8:
            ql = _import_fp8(name, seen, w, act, (out, inn), bias, path, where)
        else:
            raise CheckpointError(f"{where}: compressed-tensors format {fmt!r} with {w['type']}{w['num_bits']} "
                                  f"weights is not read by quantkit (pack-quantized, int-quantized, "
                                  f"float-quantized are)")
        unused = sorted(set(mine) - seen.read)
        if unused:
            raise CheckpointError(f"{path}: tensor {unused[0]!r} has no place in a {fmt} layer with this config "
                                  f"({where}); config and tensors do not match")
        set_module(model, name, ql)
    if not prefixes:
        raise CheckpointError(f"{path}: no quantized tensors (weight_packed / weight_scale) in the checkpoint")
    return finish_load(model, tensors, path)


def _ct_fp8(fmt) -> str | None:
    c = fmt.cfg
    if c.dtype != "e4m3" or (c.activations != "none" and c.act_kind != "e4m3"):
        return (f"compressed-tensors holds FP8 E4M3 only (got {c.dtype} weights, {c.act_kind} activations); use "
                f"dtype: e4m3")
    return None


@register("layout", "compressed-tensors")
class CompressedTensorsLayout:
    """``QuantizedModel.save(path, layout="compressed-tensors")``; ``quantkit.load`` reads it back."""

    QUANT_METHOD = QUANT_METHOD
    CAPS = LayoutCaps(
        formats={"int": (any_config, "yes (2-8 bit, sym/asym, groups or channel)"),
                 "int8a8": (any_config, "yes"),
                 "fp8": (_ct_fp8, "E4M3 only")},
        act_order_g_idx=False, conv1d=False, options={"partial_groups": ("expand", "error")})

    @staticmethod
    def save(model: nn.Module, out_dir: str, meta: dict[str, Any]) -> None:
        save_compressed_tensors(model, out_dir, meta)

    @staticmethod
    def load(path: str, cfg: dict[str, Any]) -> nn.Module:
        return load_compressed_tensors(path, cfg)
