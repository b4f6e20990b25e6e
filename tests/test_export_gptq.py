"""GPTQ layout export/import, checked against an independent reference packer written from the format's
documented bit order (AutoGPTQ's packing procedure: 32/bits codes per int32 word along the input dimension,
code i of a word at bits [i*bits, (i+1)*bits); 3-bit: 32 codes in 3 words with codes 10 and 21 split across
word boundaries; v1 stores zero - 1)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

import quantkit
from quantkit.errors import CheckpointError
from quantkit.nn import QuantLinear


# ---- reference (plain Python integers, written from the spec) ---------------------------------------
def _signed(w: int) -> int:
    return w - (1 << 32) if w >= (1 << 31) else w


def ref_pack(vals: list[list[int]], bits: int) -> list[list[int]]:
    """AutoGPTQ-style packing of ``vals`` [K][N] (unsigned codes) along K into words [K*bits/32][N]."""
    K, N = len(vals), len(vals[0])
    out = [[0] * N for _ in range(K * bits // 32)]
    for n in range(N):
        col = [vals[k][n] for k in range(K)]
        words = out
        row, i = 0, 0
        while row < K * bits // 32:
            if bits in (2, 4, 8):
                for j in range(i, i + 32 // bits):
                    words[row][n] |= col[j] << (bits * (j - i))
                i += 32 // bits
                row += 1
            else:  # 3 bits: the 10 / straddle / 10 / straddle / 10 procedure
                for j in range(i, i + 10):
                    words[row][n] |= col[j] << (3 * (j - i))
                i += 10
                words[row][n] |= (col[i] << 30) & 0xFFFFFFFF
                row += 1
                words[row][n] |= (col[i] >> 2) & 1
                i += 1
                for j in range(i, i + 10):
                    words[row][n] |= col[j] << (3 * (j - i) + 1)
                i += 10
                words[row][n] |= (col[i] << 31) & 0xFFFFFFFF
                row += 1
                words[row][n] |= (col[i] >> 1) & 3
                i += 1
                for j in range(i, i + 10):
                    words[row][n] |= col[j] << (3 * (j - i) + 2)
                i += 10
                row += 1
    return [[_signed(w) for w in r] for r in out]


def ref_unpack(words: torch.Tensor, bits: int, K: int) -> list[list[int]]:
    """Inverse: words [K*bits/32, N] -> codes [K][N], reading each column as one bit stream."""
    W, N = words.shape
    out = [[0] * N for _ in range(K)]
    for n in range(N):
        stream = 0
        for r in range(W):
            stream |= (int(words[r, n]) & 0xFFFFFFFF) << (32 * r)
        for k in range(K):
            out[k][n] = (stream >> (k * bits)) & ((1 << bits) - 1)
    return out


def ref_dequant(t: dict, name: str, bits: int, v1: bool = True) -> torch.Tensor:
    """w [out, in] from the stored GPTQ tensors, by the spec: (q - z[g]) * s[g]."""
    qw, qz, sc, gi = (t[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx"))
    K = qw.shape[0] * 32 // bits
    N = qw.shape[1]
    q = ref_unpack(qw, bits, K)  # [K][N]
    zt = ref_unpack(qz.t().contiguous(), bits, N)  # [N][G]: zeros packed along the output dim
    w = torch.empty(N, K, dtype=torch.float32)
    for k in range(K):
        g = int(gi[k])
        for n in range(N):
            z = zt[n][g] + (1 if v1 else 0)
            w[n, k] = float(q[k][n] - z) * float(sc[g, n])
    return w


# ---- fixtures -------------------------------------------------------------------------------------------
def tiny(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=192, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(cfg).eval()


_CACHE: dict = {}


def quantize(fmt, quantizer="rtn"):
    key = json.dumps([fmt, quantizer], sort_keys=True)
    if key not in _CACHE:
        calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
        _CACHE[key] = quantkit.quantize(tiny(), {"quantizer": quantizer, "format": fmt}, calibration=calib,
                                        device="cpu", progress=False)
    return _CACHE[key]


CASES = {
    "int4-asym-g128": ({"type": "int", "bits": 4, "group_size": 128, "sym": False}, "rtn"),  # partial group
    "int4-sym-g32": ({"type": "int", "bits": 4, "group_size": 32, "sym": True}, "rtn"),
    "int3-asym-g32": ({"type": "int", "bits": 3, "group_size": 32, "sym": False}, "rtn"),
    "int2-asym-g64": ({"type": "int", "bits": 2, "group_size": 64, "sym": False}, "rtn"),
    "int8-sym-channel": ({"type": "int", "bits": 8, "group_size": None, "sym": True}, "rtn"),
    "int4-actorder-gidx": ({"type": "int", "bits": 4, "group_size": 32, "sym": False},
                           {"type": "gptq", "act_order": True, "static_groups": False}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_export_matches_reference_and_reimports(case, tmp_path):
    fmt, quantizer = CASES[case]
    qm = quantize(fmt, quantizer)
    out = str(tmp_path / "gptq")
    qm.save(out, layout="gptq")
    cfg = json.load(open(os.path.join(out, "config.json")))
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["checkpoint_format"] == "gptq"
    assert qc["bits"] == fmt["bits"] and qc["sym"] == fmt["sym"]
    assert qc["group_size"] == (fmt["group_size"] or -1)
    assert qc["desc_act"] == (case == "int4-actorder-gidx")
    assert json.load(open(os.path.join(out, "quantize_config.json")))["bits"] == fmt["bits"]
    t = load_file(os.path.join(out, "model.safetensors"))
    layers = qm.quantized_layers()
    # the reference is slow (pure Python): check a few layers of every shape
    for name in ("model.layers.0.self_attn.k_proj", "model.layers.0.mlp.down_proj", "model.layers.0.mlp.up_proj"):
        ql = layers[name]
        b = fmt["bits"]
        assert t[f"{name}.qweight"].dtype == torch.int32 and t[f"{name}.scales"].dtype == torch.float16
        assert tuple(t[f"{name}.qweight"].shape) == (ql.in_features * b // 32, ql.out_features)
        assert torch.equal(ref_dequant(t, name, b), ql.dequantized_weight()), name
        # and the reference packer gives the stored words bit for bit
        codes = ref_unpack(t[f"{name}.qweight"], b, ql.in_features)
        assert torch.equal(torch.tensor(ref_pack(codes, b), dtype=torch.int32), t[f"{name}.qweight"])
    if case == "int4-asym-g128":
        assert tuple(t["model.layers.0.mlp.down_proj.scales"].shape) == (2, 64)  # 192 = 128 + 64
    back = quantkit.load(out)
    for n, ql in layers.items():
        assert torch.equal(back.quantized_layers()[n].dequantized_weight(), ql.dequantized_weight()), n
    x = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        assert torch.equal(qm.model(x).logits, back.model(x).logits)


def _one_layer_model(codes, zeros, scales, bits, g):
    """A tiny model whose q_proj is a hand-made int QuantLinear (for zero-point edge cases)."""
    m = tiny(3)
    out, inn = codes.shape
    from quantkit.formats.packing import pack_codes

    spec = {"quantizer": {"type": "rtn"}, "format": {"type": "int", "bits": bits, "group_size": g, "sym": False},
            "transforms": []}
    ql = QuantLinear(inn, out, spec, {"qweight": pack_codes(codes, bits), "scales": scales,
                                      "zeros": zeros.to(torch.uint8)})
    qm = quantize(CASES["int4-asym-g128"][0])
    m.load_state_dict(qm.model.state_dict(), strict=False)
    for n, q in qm.quantized_layers().items():
        m.set_submodule(n, q)
    m.model.layers[0].self_attn.q_proj = ql
    return quantkit.QuantizedModel(m, None, {"name": "t"}, None, {})


def test_zero_point_zero_is_rewritten_exactly(tmp_path):
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 15, (64, 64), generator=g, dtype=torch.int32)  # never 15
    zeros = torch.randint(0, 16, (64, 1), generator=g, dtype=torch.int32)
    zeros[:5] = 0
    scales = torch.rand(64, 1, generator=g).half() + 0.01
    qm = _one_layer_model(codes, zeros, scales, 4, 128)
    qm.save(str(tmp_path / "v1"), layout="gptq")
    t = load_file(str(tmp_path / "v1" / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj"
    want = qm.model.model.layers[0].self_attn.q_proj.dequantized_weight()
    assert torch.equal(ref_dequant(t, name, 4), want)
    stored = ref_unpack(t[f"{name}.qzeros"].t().contiguous(), 4, 64)
    assert min(r[0] for r in stored) >= 0 and max(r[0] for r in stored) <= 14  # no -1 nibble in v1
    assert torch.equal(quantkit.load(str(tmp_path / "v1")).model.model.layers[0].self_attn.q_proj
                       .dequantized_weight(), want)


def test_zero_point_zero_with_top_code_refused_in_v1_and_written_in_v2(tmp_path):
    from quantkit.checkpoint.gptq import save_gptq

    codes = torch.zeros(64, 64, dtype=torch.int32)
    codes[0, 0] = 15
    zeros = torch.zeros(64, 1, dtype=torch.int32)
    scales = torch.ones(64, 1).half()
    qm = _one_layer_model(codes, zeros, scales, 4, 128)
    with pytest.raises(CheckpointError, match=r"q_proj.*gptq_v2"):
        qm.save(str(tmp_path / "v1"), layout="gptq")
    assert not os.path.exists(tmp_path / "v1")
    os.makedirs(tmp_path / "v2")
    save_gptq(qm.model, str(tmp_path / "v2"), checkpoint_format="gptq_v2")
    t = load_file(str(tmp_path / "v2" / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj"
    want = qm.model.model.layers[0].self_attn.q_proj.dequantized_weight()
    assert torch.equal(ref_dequant(t, name, 4, v1=False), want)
    back = quantkit.load(str(tmp_path / "v2"))
    assert torch.equal(back.model.model.layers[0].self_attn.q_proj.dequantized_weight(), want)


@pytest.mark.parametrize("bits,v1,desc", [(4, True, False), (3, True, True), (2, False, False), (8, True, True)])
def test_import_hand_made_checkpoint(bits, v1, desc, tmp_path):
    """A checkpoint written by the reference packer alone, as another GPTQ tool would."""
    m = tiny(1)
    sd = {k: v.detach().clone() for k, v in m.state_dict().items()}
    gsz = 32
    gen = torch.Generator().manual_seed(bits)
    expected = {}
    for name, mod in m.named_modules():
        if not isinstance(mod, torch.nn.Linear) or name == "lm_head":
            continue
        out, inn = mod.weight.shape
        ng = (inn + gsz - 1) // gsz
        q = torch.randint(0, 1 << bits, (inn, out), generator=gen)
        z = torch.randint(1, 1 << bits, (ng, out), generator=gen)  # v1 needs z >= 1
        s = (torch.rand(ng, out, generator=gen) * 0.1 + 0.001).half()
        gi = torch.arange(inn) // gsz
        if desc:
            gi = gi[torch.randperm(inn, generator=gen)]
        del sd[f"{name}.weight"]
        sd[f"{name}.qweight"] = torch.tensor(ref_pack(q.tolist(), bits), dtype=torch.int32)
        zs = (z - 1) if v1 else z
        sd[f"{name}.qzeros"] = torch.tensor(ref_pack(zs.t().tolist(), bits), dtype=torch.int32).t().contiguous()
        sd[f"{name}.scales"] = s
        sd[f"{name}.g_idx"] = gi.to(torch.int32)
        expected[name] = ((q - z[gi]).float() * s[gi].float()).t()
    os.makedirs(tmp_path / "ck")
    save_file(sd, str(tmp_path / "ck" / "model.safetensors"))
    cfg = m.config.to_dict()
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": bits, "group_size": gsz, "desc_act": desc,
                                  "sym": False, "checkpoint_format": "gptq" if v1 else "gptq_v2"}
    json.dump(cfg, open(tmp_path / "ck" / "config.json", "w"))
    back = quantkit.load(str(tmp_path / "ck"))
    layers = back.quantized_layers()
    assert set(layers) == set(expected)
    for n, ql in layers.items():
        assert torch.equal(ql.dequantized_weight(), expected[n]), n
        assert ("g_idx" in ql.packed) == desc


def test_mixed_precision_refused(tmp_path):
    calib = torch.randint(0, 256, (2, 16))
    qm = quantkit.quantize(tiny(), {"quantizer": "rtn", "format": {"type": "int", "bits": 4, "group_size": 32},
                                    "rules": [{"match": "*.down_proj", "format": {"type": "int", "bits": 8,
                                                                                  "group_size": None,
                                                                                  "sym": True}}]},
                           calibration=calib, device="cpu", progress=False)
    with pytest.raises(CheckpointError, match="one\nscheme|one scheme"):
        qm.save(str(tmp_path / "g"), layout="gptq")
    assert not os.path.exists(tmp_path / "g")


def test_gptq_config_mismatch_is_clear(tmp_path):
    qm = quantize(*CASES["int4-sym-g32"])
    out = str(tmp_path / "g")
    qm.save(out, layout="gptq")
    cfg = json.load(open(os.path.join(out, "config.json")))
    cfg["quantization_config"]["bits"] = 8
    json.dump(cfg, open(os.path.join(out, "config.json"), "w"))
    with pytest.raises(CheckpointError, match="qweight"):
        quantkit.load(out)
