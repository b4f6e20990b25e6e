"""compressed-tensors export/import, verified with the compressed-tensors package itself.

Install (CPU torch stays as it is): ``pip install --no-deps compressed-tensors==0.20.0 loguru``
(its other requirements — torch, transformers, pydantic, psutil — are already quantkit's).
"""

from __future__ import annotations

import json
import os

import pytest
import torch

ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors import BaseCompressor  # noqa: E402
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32  # noqa: E402
from compressed_tensors.quantization import QuantizationConfig  # noqa: E402
from compressed_tensors.utils.match import is_match  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import quantkit  # noqa: E402
from quantkit.checkpoint.hf import pack_words, unpack_words  # noqa: E402
from quantkit.errors import CheckpointError  # noqa: E402
from quantkit.formats.packing import unpack_codes  # noqa: E402


def tiny_model(seed=0, hidden=64, inter=192):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(cfg).eval()


_CACHE: dict = {}


def quantize(fmt, quantizer="rtn", seed=0, **kw):
    """Quantized tiny model, cached per arguments (tests only read it)."""
    key = json.dumps([fmt, quantizer, seed, kw], sort_keys=True)
    if key not in _CACHE:
        _CACHE[key] = _quantize(fmt, quantizer, seed, **kw)
    return _CACHE[key]


def _quantize(fmt, quantizer="rtn", seed=0, **kw):
    m = tiny_model(seed, **kw)
    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    return quantkit.quantize(m, {"quantizer": quantizer, "format": fmt}, calibration=calib, device="cpu",
                             progress=False)


def ct_reference_weights(path):
    """Dequantize every layer of a compressed-tensors checkpoint with compressed-tensors' own decompressor.
    Returns {layer: (weight in the scale dtype, weight with float32 scales)}."""
    cfg = json.load(open(os.path.join(path, "config.json")))
    qcfg = QuantizationConfig.model_validate(cfg["quantization_config"])  # validates every key
    tensors = load_file(os.path.join(path, "model.safetensors"))
    model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in cfg.items() if k != "quantization_config"}))
    out = {}
    for name, mod in model.named_modules():
        schemes = [s for s in qcfg.config_groups.values() if is_match(name, mod, s.targets, qcfg.ignore)]
        if not schemes:
            continue
        scheme = schemes[0]
        comp = BaseCompressor.get_value_from_registry(scheme.format or qcfg.format)
        sd = {k[len(name) + 1:]: v for k, v in tensors.items() if k.rpartition(".")[0] == name}
        w16 = comp.decompress(dict(sd), scheme)["weight"]
        sd32 = dict(sd)
        sd32["weight_scale"] = sd["weight_scale"].float()
        w32 = comp.decompress(sd32, scheme)["weight"]
        out[name] = (w16, w32)
    return out, cfg["quantization_config"], tensors


CASES = {
    # partial last group on the 192-column down_proj (192 % 128 = 64) and one group per row on the 64-col layers
    "int4-asym-g128": {"type": "int", "bits": 4, "group_size": 128, "sym": False},
    "int4-sym-g32": {"type": "int", "bits": 4, "group_size": 32, "sym": True},
    "int8-sym-channel": {"type": "int", "bits": 8, "group_size": None, "sym": True},
    "int3-asym-g32": {"type": "int", "bits": 3, "group_size": 32, "sym": False},
    "int2-sym-g64-bf16": {"type": "int", "bits": 2, "group_size": 64, "sym": True, "scale_dtype": "bfloat16"},
    "fp8-channel-dynamic": {"type": "fp8", "weight_scale": "channel", "activations": "dynamic"},
    "fp8-tensor-static": {"type": "fp8", "weight_scale": "tensor", "activations": "static"},
    "fp8-channel-w8a16": {"type": "fp8", "weight_scale": "channel", "activations": "none"},
    "int8a8-dynamic": {"type": "int8a8", "activations": "dynamic"},
    "int8a8-static": {"type": "int8a8", "activations": "static"},
}
FORMAT_OF = {"fp8-channel-dynamic": "float-quantized", "fp8-tensor-static": "float-quantized",
             "fp8-channel-w8a16": "naive-quantized", "int8a8-dynamic": "int-quantized",
             "int8a8-static": "int-quantized"}
ACTS = {"fp8-channel-dynamic": ("float", True, "token"), "fp8-tensor-static": ("float", False, "tensor"),
        "fp8-channel-w8a16": None, "int8a8-dynamic": ("int", True, "token"), "int8a8-static": ("int", False, "tensor")}


@pytest.mark.parametrize("case", list(FORMAT_OF))
def test_activation_schemes_and_roundtrip(case, tmp_path):
    qm = quantize(CASES[case])
    out = str(tmp_path / "ct")
    qm.save(out, layout="compressed-tensors")
    qc = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
    (g,) = qc["config_groups"].values()
    a = g["input_activations"]
    if ACTS[case] is None:
        assert a is None
    else:
        assert (a["type"], a["dynamic"], a["strategy"], a["num_bits"]) == (*ACTS[case], 8)
    t = load_file(os.path.join(out, "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj"
    assert (f"{name}.input_scale" in t) == case.endswith("static")
    if case.startswith("int8a8"):
        assert t[f"{name}.weight"].dtype == torch.int8
    else:
        assert t[f"{name}.weight"].dtype == torch.float8_e4m3fn
        assert tuple(t[f"{name}.weight_scale"].shape) == ((64, 1) if "channel" in case else (1,))
    back = quantkit.load(out)
    for n, ql in qm.quantized_layers().items():
        other = back.quantized_layers()[n]
        assert other.fmt.spec()["type"] == CASES[case]["type"]
        assert other.fmt.cfg.activations == CASES[case]["activations"]
        assert torch.equal(ql.dequantized_weight(), other.dequantized_weight()), n
    x = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        assert torch.equal(qm.model(x).logits, back.model(x).logits)


@pytest.mark.parametrize("case", list(CASES))
def test_decompressor_reads_our_export_bit_for_bit(case, tmp_path):
    qm = quantize(CASES[case])
    out = str(tmp_path / "ct")
    qm.save(out, layout="compressed-tensors")
    ref, qc, tensors = ct_reference_weights(out)
    ours = qm.quantized_layers()
    assert set(ref) == set(ours), "config groups must target exactly the quantized layers"
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == FORMAT_OF.get(case, "pack-quantized")
    assert qc["ignore"] == ["lm_head"]
    for name, ql in ours.items():
        w16, w32 = ref[name]
        mine = ql.dequantized_weight()  # float32, exact: (q - z) * s
        assert torch.equal(w32, mine), name
        assert torch.equal(w16, mine.to(w16.dtype)), name  # one correctly rounded product either way
        if case in FORMAT_OF:
            continue
        assert w16.dtype == ql.packed["scales"].dtype
        # packing equals compressed-tensors' own packer on the signed codes
        b = CASES[case]["bits"]
        codes = unpack_codes(ql.packed["qweight"], b, ql.in_features)
        assert torch.equal(tensors[f"{name}.weight_packed"], pack_to_int32((codes - (1 << (b - 1))).to(torch.int8), b))
        assert tensors[f"{name}.weight_shape"].tolist() == [ql.out_features, ql.in_features]


def test_partial_group_expands_to_gcd_and_config(tmp_path):
    qm = quantize(CASES["int4-asym-g128"])
    out = str(tmp_path / "ct")
    qm.save(out, layout="compressed-tensors")
    qc = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
    # asymmetric: one scheme for every layer (transformers' dequantize path applies the first group's scheme to
    # all layers), in groups of gcd(128, 192) = 64 = gcd(64 columns of q_proj, one group)
    (g,) = qc["config_groups"].values()
    assert g["targets"] == ["Linear"] and qc["dequantize"] is True
    assert g["weights"]["strategy"] == "group" and g["weights"]["group_size"] == 64
    assert g["weights"]["symmetric"] is False and g["weights"]["num_bits"] == 4
    # symmetric layers keep a scheme per shape (their compressed path in transformers matches the targets)
    qs = quantize({**CASES["int4-asym-g128"], "sym": True})
    qs.save(str(tmp_path / "sym"), layout="compressed-tensors")
    qc = json.load(open(tmp_path / "sym" / "config.json"))["quantization_config"]
    by_layer = {n: g["weights"] for g in qc["config_groups"].values() for n in g["targets"]}
    assert by_layer["model.layers.0.mlp.down_proj"]["group_size"] == 64  # gcd(128, 192)
    assert by_layer["model.layers.0.mlp.down_proj"]["strategy"] == "group"
    assert by_layer["model.layers.0.self_attn.q_proj"]["strategy"] == "channel"  # 64 columns: one group
    assert "dequantize" not in qc
    t = load_file(os.path.join(out, "model.safetensors"))
    z = t["model.layers.1.mlp.down_proj.weight_zero_point"]
    assert z.dtype == torch.int32 and tuple(z.shape) == (64 * 4 // 32, 3)
    ql = qm.quantized_layers()["model.layers.1.mlp.down_proj"]
    zeros = ql.packed["zeros"].to(torch.int32)  # [64, 2] native groups of 128 (second one 64 wide)
    assert torch.equal(z, pack_to_int32((zeros[:, [0, 0, 1]] - 8).to(torch.int8), 4, packed_dim=0))


def test_partial_groups_error_names_layer(tmp_path):
    from quantkit.checkpoint.compressed_tensors import save_compressed_tensors

    qm = quantize(CASES["int4-asym-g128"])
    with pytest.raises(CheckpointError, match=r"down_proj.*group_size 64"):
        save_compressed_tensors(qm.model, str(tmp_path), partial_groups="error")


def test_act_order_gidx_refused(tmp_path):
    qm = quantize({"type": "int", "bits": 4, "group_size": 32, "sym": True},
                  quantizer={"type": "gptq", "act_order": True, "static_groups": False})
    assert any("g_idx" in q.packed for q in qm.quantized_layers().values())
    with pytest.raises(CheckpointError, match="static_groups"):
        qm.save(str(tmp_path / "ct"), layout="compressed-tensors")
    assert not os.path.exists(tmp_path / "ct")  # nothing half-written


def test_transformers_loads_symmetric_export(tmp_path):
    from transformers import AutoModelForCausalLM

    qm = quantize(CASES["int4-sym-g32"])
    out = str(tmp_path / "ct")
    qm.save(out, layout="compressed-tensors")
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        y_hf = hf(x).logits  # the first forward decompresses through compressed-tensors
        y_qk = qm.model(x).logits
    for name, ql in qm.quantized_layers().items():
        assert torch.equal(hf.get_submodule(name).weight.float(), ql.dequantized_weight()), name
    torch.testing.assert_close(y_hf, y_qk, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", ["int4-asym-g128", "int8-sym-channel", "int3-asym-g32", "int2-sym-g64-bf16"])
def test_roundtrip_import(case, tmp_path):
    qm = quantize(CASES[case])
    out = str(tmp_path / "ct")
    qm.save(out, layout="compressed-tensors")
    back = quantkit.load(out)
    mine, theirs = qm.quantized_layers(), back.quantized_layers()
    assert set(mine) == set(theirs)
    for n in mine:
        assert torch.equal(mine[n].dequantized_weight(), theirs[n].dequantized_weight()), n
        assert theirs[n].fmt.cfg.bits == CASES[case]["bits"]
    x = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        assert torch.equal(qm.model(x).logits, back.model(x).logits)


def _write_foreign(path, tensors, cfg_model, qc):
    os.makedirs(path)
    save_file(tensors, os.path.join(path, "model.safetensors"))
    cfg = cfg_model.to_dict()
    cfg["quantization_config"] = qc
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)


@pytest.mark.parametrize("sym", [True, False])
def test_import_checkpoint_made_by_compressed_tensors(sym, tmp_path):
    """A checkpoint whose packed tensors come from compressed-tensors' own compressor (not ours)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    m = tiny_model(5)
    args = QuantizationArgs(num_bits=4, type="int", symmetric=sym, strategy="group", group_size=32)
    scheme = QuantizationScheme(targets=["Linear"], weights=args, format="pack-quantized")
    comp = BaseCompressor.get_value_from_registry("pack-quantized")
    tensors = {k: v.detach().clone() for k, v in m.state_dict().items()}
    expected = {}
    g = torch.Generator().manual_seed(7)
    for name, mod in m.named_modules():
        if not isinstance(mod, torch.nn.Linear) or name == "lm_head":
            continue
        w = mod.weight.detach().float()
        out, inn = w.shape
        wg = w.view(out, inn // 32, 32)
        if sym:
            scale = (wg.abs().amax(-1) / 7.5).half()
            zp = torch.zeros_like(scale, dtype=torch.int8)
        else:
            scale = ((wg.amax(-1) - wg.amin(-1)).clamp_min(1e-6) / 15).half()
            zp = torch.randint(-8, 8, scale.shape, generator=g, dtype=torch.int8)
        sd = {"weight": w.half(), "weight_scale": scale, "weight_zero_point": zp}
        packed = comp.compress(sd, scheme)
        expected[name] = comp.decompress(dict(packed), QuantizationScheme(targets=["Linear"], weights=args))["weight"]
        del tensors[f"{name}.weight"]
        tensors.update({f"{name}.{k}": v for k, v in packed.items()})
    qc = {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
          "config_groups": {"group_0": {"targets": ["Linear"], "weights": json.loads(args.model_dump_json())}},
          "ignore": ["lm_head"]}
    tensors["lm_head.weight"] = tensors["lm_head.weight"].clone()
    _write_foreign(str(tmp_path / "foreign"), tensors, m.config, qc)
    back = quantkit.load(str(tmp_path / "foreign"))
    layers = back.quantized_layers()
    assert set(layers) == set(expected)
    for n, ql in layers.items():
        assert ql.fmt.cfg.sym is sym and ql.fmt.cfg.group_size == 32
        assert torch.equal(ql.dequantized_weight().half(), expected[n]), n


def test_import_refuses_untargeted_quantized_layer(tmp_path):
    qm = quantize(CASES["int4-sym-g32"])
    out = str(tmp_path / "ct")
    qm.save(out, layout="compressed-tensors")
    cfg = json.load(open(os.path.join(out, "config.json")))
    cfg["quantization_config"]["ignore"].append("model.layers.0.mlp.up_proj")
    json.dump(cfg, open(os.path.join(out, "config.json"), "w"))
    with pytest.raises(CheckpointError, match="up_proj.*no config group"):
        quantkit.load(out)


def test_import_refuses_config_tensor_mismatch(tmp_path):
    qm = quantize(CASES["int4-sym-g32"])
    out = str(tmp_path / "ct")
    qm.save(out, layout="compressed-tensors")
    cfg = json.load(open(os.path.join(out, "config.json")))
    cfg["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] = 8
    json.dump(cfg, open(os.path.join(out, "config.json"), "w"))
    with pytest.raises(CheckpointError, match="weight_packed"):
        quantkit.load(out)


def test_word_packing_matches_reference():
    """Independent check of the 32-bit word packer against compressed-tensors for every width."""
    g = torch.Generator().manual_seed(0)
    for b in range(1, 9):
        for cols in (1, 31, 32, 33, 100):
            codes = torch.randint(0, 1 << b, (3, cols), generator=g, dtype=torch.int32)
            w = pack_words(codes, b)
            assert torch.equal(w, pack_to_int32((codes - (1 << (b - 1))).to(torch.int8), b)), (b, cols)
            assert torch.equal(unpack_words(w, b, cols), codes)
