"""The GPTQ layout (``quant_method: gptq``), what transformers (through optimum / GPTQModel), AutoGPTQ,
GPTQModel, vLLM and the exllama/Marlin kernels read. Export and import; docs/EXPORT.md has the details.

Each quantized linear ``L`` (weight ``[out, in]``, b in {2, 3, 4, 8} bits) stores:

* ``L.qweight`` int32 ``[in*b/32, out]``: column r holds output row r's codes as a dense little-endian
  bit stream along the input dimension — code of input j at bits ``[j*b, (j+1)*b)`` of the column's words
  (for b = 4: 8 nibbles per word, input 8k+i in nibble i of word k; for b = 3: 32 codes in 3 words, codes
  10 and 21 straddle words). This is quantkit's own ``qweight`` bit stream, read as 32-bit words and
  transposed. Codes are unsigned, q in ``[0, 2^b)``.
* ``L.qzeros`` int32 ``[n_groups, out*b/32]``: zero points, packed the same way along the *output*
  dimension. ``checkpoint_format: gptq`` (v1, what transformers/AutoGPTQ write) stores ``z - 1``;
  ``gptq_v2`` (GPTQModel) stores z.
* ``L.scales`` float16 ``[n_groups, out]``.
* ``L.g_idx`` int32 ``[in]``: the group of each input column (``j // group_size`` unless act-order
  without static groups).
* ``L.bias`` if the layer has one.

w[j, r] = (q[j, r] - z[g_idx[j], r]) * scales[g_idx[j], r]. GPTQ's groups may end in a shorter last
group (``n_groups = ceil(in / group_size)``), so quantkit's partial groups export as they are.

v1 cannot store z = 0 (it would be -1): loaders disagree on it (AutoGPTQ's torch path masks it back
to 0, GPTQModel's v1->v2 word addition carries into the next zero). The exporter rewrites a group with
z = 0 exactly as (q + 1, z = 1) when no code of that group is 2^b - 1, and otherwise refuses and names
the layer (export with checkpoint_format='gptq_v2' then).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError
from ..formats.base import column_groups
from ..formats.packing import packed_row_bytes, unpack_codes
from ..registry import register
from .caps import LayoutCaps
from .hf import (
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
    quant_layers,
    tensor_of,
    unpack_words,
    words_from_bytes,
    write_export,
)
from .io import write_json

QUANT_METHOD = "gptq"
BITS = (2, 3, 4, 8)
FORMATS = ("gptq", "gptq_v2")


def _layer_tensors(name: str, ql, checkpoint_format: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    cfg, packed = int_layer_parts(name, ql, "gptq")
    out, inn = ql.shape
    b = cfg.bits
    if b not in BITS:
        raise CheckpointError(f"layer {name!r} is {b}-bit; the GPTQ layout holds {', '.join(map(str, BITS))} bits; "
                              f"save it with layout='native' or 'compressed-tensors'")
    if (inn * b) % 32 or (out * b) % 32:
        raise CheckpointError(f"layer {name!r} ({out}x{inn}): GPTQ packs {32 // b if 32 % b == 0 else 32} values "
                              f"per word group; in*bits and out*bits must be multiples of 32")
    scales = packed["scales"]
    if scales.dtype != torch.float16:
        s16 = scales.to(torch.float16)
        if not torch.equal(s16.to(scales.dtype), scales):
            raise CheckpointError(f"layer {name!r} has {scales.dtype} scales that float16 cannot hold exactly; "
                                  f"GPTQ stores float16 scales: re-quantize with scale_dtype: float16")
        scales = s16
    ng = scales.shape[1]
    maxq = (1 << b) - 1
    g = cfg.group_size
    if "g_idx" in packed:
        g_idx = packed["g_idx"].to(torch.int32)
    else:
        g_idx = column_groups(inn, g).to(torch.int32)
    qweight = packed["qweight"]
    if cfg.sym:
        zeros = torch.full((out, ng), 1 << (b - 1), dtype=torch.int32)
    else:
        zeros = packed["zeros"].to(torch.int32)
        if checkpoint_format == "gptq" and bool((zeros == 0).any()):
            # rewrite (q, z=0) as (q+1, z=1): exact when no code of such a group is maxq
            codes = unpack_codes(qweight, b, inn)
            bump = (zeros == 0)[:, g_idx.long()]  # [out, in]
            if bool((codes[bump] == maxq).any()):
                rows = sorted({int(r) for r in torch.nonzero((zeros == 0), as_tuple=True)[0][:3]})
                raise CheckpointError(
                    f"layer {name!r}: zero point 0 with code {maxq} in the same group (rows {rows}); GPTQ v1 stores "
                    f"zero - 1 and cannot hold it. Export with checkpoint_format='gptq_v2' (CLI: --checkpoint-format "
                    f"gptq_v2) or use sym: true")
            codes = codes + bump.to(torch.int32)
            zeros = zeros + (zeros == 0).to(torch.int32)
            from ..formats.packing import pack_codes

            qweight = pack_codes(codes, b)
    stored = zeros - 1 if checkpoint_format == "gptq" else zeros
    t = {"qweight": words_from_bytes(qweight).t().contiguous(),
         "qzeros": pack_words(stored.t().contiguous(), b),
         "scales": scales.t().contiguous(),
         "g_idx": g_idx.contiguous()}
    desc = "g_idx" in packed
    return t, {"bits": b, "group_size": g if g else -1, "sym": cfg.sym, "desc_act": desc}


def gptq_config(model: nn.Module, checkpoint_format: str = "gptq"
                ) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    if checkpoint_format not in FORMATS:
        raise CheckpointError(f"checkpoint_format must be one of {FORMATS}, got {checkpoint_format!r}")
    check_no_conv1d(model, "gptq")
    layers = quant_layers(model)
    if not layers:
        raise CheckpointError("the model has no quantized layers; nothing to export")
    from ..models.discovery import find_blocks, is_linear

    blocks_name, _ = find_blocks(model)
    left = sorted(n for n, m in model.named_modules() if is_linear(m) and n.startswith(blocks_name + "."))
    if left:
        raise CheckpointError(
            f"{len(left)} linear layers inside the decoder blocks stay in float ({', '.join(left[:3])}"
            f"{' ...' if len(left) > 3 else ''}); GPTQ loaders quantize every block linear. Quantize all of them, "
            f"or save with layout='compressed-tensors' (it lists what is ignored)")
    per_layer, schemes = {}, {}
    for name, ql in layers.items():
        per_layer[name], schemes[name] = _layer_tensors(name, ql, checkpoint_format)
    first = next(iter(schemes.values()))
    common = {k: first[k] for k in ("bits", "group_size", "sym")}
    for name, s in schemes.items():
        if {k: s[k] for k in common} != common:
            raise CheckpointError(
                f"layer {name!r} is {s['bits']}-bit group {s['group_size']} sym={s['sym']} but others are "
                f"{common['bits']}-bit group {common['group_size']} sym={common['sym']}; a GPTQ checkpoint has one "
                f"scheme. Save mixed precision with layout='compressed-tensors' or 'native'")
    outside = sorted(n for n in layers if not n.startswith(blocks_name + "."))
    if outside:
        raise CheckpointError(f"quantized layers outside the decoder blocks ({', '.join(outside)}) have no place in "
                              f"the GPTQ layout; keep them in float (ignore: [lm_head])")
    qc = {"quant_method": QUANT_METHOD, **common, "desc_act": any(s["desc_act"] for s in schemes.values()),
          "static_groups": False, "true_sequential": True, "damp_percent": 0.01, "lm_head": False,
          "checkpoint_format": checkpoint_format, "block_name_to_quantize": blocks_name,
          "meta": {"quantizer": ["quantkit"]}}
    first_q = next(iter(layers.values())).spec.get("quantizer", {})
    if first_q.get("type") == "gptq":
        qc["damp_percent"] = first_q.get("damp", 0.01)
        qc["static_groups"] = bool(first_q.get("static_groups", False) and first_q.get("act_order", False))
    return qc, per_layer


def save_gptq(model: nn.Module, out_dir: str, meta: dict[str, Any] | None = None,
              checkpoint_format: str | None = None) -> None:
    meta = meta or {}
    checkpoint_format = checkpoint_format or (meta.get("export_options") or {}).get("checkpoint_format", "gptq")
    qc, per_layer = gptq_config(model, checkpoint_format)
    write_export(model, out_dir, qc, per_layer)
    write_json(os.path.join(out_dir, "quantize_config.json"), {k: v for k, v in qc.items() if k != "quant_method"})


def _int(qc: dict, key: str, path: str, default=None) -> Any:
    v = qc.get(key, default)
    if not isinstance(v, int) or isinstance(v, bool):
        raise CheckpointError(f"{path}/config.json: quantization_config.{key} must be an integer, got {v!r}")
    return v


def load_gptq(path: str, cfg: dict[str, Any]) -> nn.Module:
    qc = cfg.get("quantization_config")
    if not isinstance(qc, dict):
        raise CheckpointError(f"{path}/config.json: quantization_config is not a mapping")
    b = _int(qc, "bits", path)
    if b not in BITS:
        raise CheckpointError(f"{path}/config.json: quantization_config.bits is {b}; GPTQ has {BITS}")
    gs = _int(qc, "group_size", path, -1)
    if gs == 0 or gs < -1:
        raise CheckpointError(f"{path}/config.json: quantization_config.group_size must be positive or -1, got {gs}")
    fmt = qc.get("checkpoint_format", "gptq")
    if fmt not in FORMATS:
        raise CheckpointError(f"{path}/config.json: checkpoint_format {fmt!r} is not read (gptq, gptq_v2)")
    sym = qc.get("sym", True)
    if not isinstance(sym, bool):
        raise CheckpointError(f"{path}/config.json: quantization_config.sym must be true or false")
    if qc.get("dynamic"):
        raise CheckpointError(f"{path}/config.json: per-module 'dynamic' overrides are not read by quantkit")
    maxq = (1 << b) - 1

    model = build_skeleton(path, cfg)
    tensors = export_tensors(path, cfg)  # under the module names (MoE hub names: quantkit.moe.names)
    names = sorted(k[: -len(".qweight")] for k in tensors if k.endswith(".qweight"))
    if not names:
        raise CheckpointError(f"{path}: no '.qweight' tensors: not a GPTQ checkpoint")
    for name in names:
        out, inn, has_bias = linear_shape(model, name, path)
        if (inn * b) % 32 or (out * b) % 32:
            raise CheckpointError(f"{path}: layer {name!r} ({out}x{inn}) cannot be GPTQ-packed at {b} bits")
        qw = tensor_of(tensors, f"{name}.qweight", path, (torch.int32,), 2)
        expect_shape(qw, (inn * b // 32, out), f"{name}.qweight", path)
        sc = tensor_of(tensors, f"{name}.scales", path, (torch.float16, torch.bfloat16, torch.float32), 2)
        ng = sc.shape[0]
        expect_shape(sc, (ng, out), f"{name}.scales", path)
        if ng < 1:
            raise CheckpointError(f"{path}: {name}.scales has no groups")
        qz = tensor_of(tensors, f"{name}.qzeros", path, (torch.int32,), 2)
        expect_shape(qz, (ng, out * b // 32), f"{name}.qzeros", path)
        natural = column_groups(inn, gs)
        gk = f"{name}.g_idx"
        if gk in tensors:
            gi = tensor_of(tensors, gk, path, (torch.int32, torch.int64), 1)
            expect_shape(gi, (inn,), gk, path)
            gi = gi.long()
            if int(gi.min()) < 0 or int(gi.max()) >= ng:
                raise CheckpointError(f"{path}: {gk} holds group numbers outside [0, {ng})")
        else:
            gi = natural
        if int(natural.max()) + 1 != ng and torch.equal(gi, natural):
            raise CheckpointError(f"{path}: {name} has {ng} groups but group_size {gs} over {inn} columns makes "
                                  f"{int(natural.max()) + 1} (config/tensor mismatch)")
        stored = unpack_words(qz, b, out)  # [ng, out]
        z = ((stored + 1) & maxq) if fmt == "gptq" else stored  # v1: z - 1 stored (AutoGPTQ's masking)
        z = z.t().contiguous()  # [out, ng]
        scales = sc.t().contiguous()
        qweight = bytes_from_words(qw.t().contiguous())[:, :packed_row_bytes(inn, b)].contiguous()
        bias = tensors.pop(f"{name}.bias", None)
        if has_bias != (bias is not None):
            raise CheckpointError(f"{path}: layer {name!r} bias {'missing' if has_bias else 'unexpected'}")
        for k in ("qweight", "qzeros", "scales", "g_idx"):
            tensors.pop(f"{name}.{k}", None)
        is_natural = torch.equal(gi, natural)
        used = ng if is_natural else int(gi.max()) + 1
        packed = {"qweight": qweight, "scales": scales[:, :used].contiguous()}
        layer_sym = sym and bool((z == (1 << (b - 1))).all())
        if not layer_sym:
            packed["zeros"] = z[:, :used].to(torch.uint8).contiguous()
        if not is_natural:
            packed["g_idx"] = gi.to(torch.int32).contiguous()
        group_size = gs if gs > 0 and ng > 1 else None
        ql = int_quantlinear(name, path, (out, inn), b, group_size, layer_sym, packed, bias,
                             {"layout": "gptq", "checkpoint_format": fmt, "desc_act": bool(qc.get("desc_act"))})
        from ..models.discovery import set_module

        set_module(model, name, ql)
    return finish_load(model, tensors, path)


def _gptq_int(fmt) -> str | None:
    c = fmt.cfg
    if c.bits not in BITS:
        return f"GPTQ holds {', '.join(map(str, BITS))}-bit weights, not {c.bits}-bit"
    if c.scale_dtype == "float32":
        return "GPTQ stores float16 scales; float32 scales would be rounded: use scale_dtype: float16"
    return None


def _gptq_shape(fmt, shape: tuple[int, int]) -> str | None:
    b = getattr(fmt.cfg, "bits", None)
    if b and ((shape[1] * b) % 32 or (shape[0] * b) % 32):
        return f"GPTQ packs whole 32-bit words: in*bits and out*bits must be multiples of 32 ({b}-bit)"
    return None


@register("layout", "gptq")
class GPTQLayout:
    """``QuantizedModel.save(path, layout="gptq")``; ``quantkit.load`` reads GPTQ checkpoints."""

    QUANT_METHOD = QUANT_METHOD
    CAPS = LayoutCaps(formats={"int": (_gptq_int, "2, 3, 4, 8 bit; float16/bfloat16 scales")},
                      one_scheme=True, float_block_linears=False, outside_blocks=False, conv1d=False,
                      shape=_gptq_shape, shape_rule="in·bits and out·bits multiples of 32",
                      options={"checkpoint_format": FORMATS})

    @staticmethod
    def save(model: nn.Module, out_dir: str, meta: dict[str, Any]) -> None:
        save_gptq(model, out_dir, meta)

    @staticmethod
    def load(path: str, cfg: dict[str, Any]) -> nn.Module:
        return load_gptq(path, cfg)
