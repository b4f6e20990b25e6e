"""Mixed precision by recipe rules: every layer's scheme is recorded in the checkpoint and reloads."""

from __future__ import annotations

import json
import os

import pytest
import torch

import quantkit
from quantkit.recipe import builtin_recipes, load_recipe

MY_RECIPES = ["any4-rtn", "any4-gptq", "any3-gptq", "nf4-rtn", "fp4-rtn", "fp8-e4m3-w8a8", "fp8-e5m2-w8a8",
              "int8-w8a8", "int8-w8a8-smooth", "mixed-w8-down-w4"]


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()


def test_format_recipes_are_built_in_and_valid():
    names = builtin_recipes()
    for n in MY_RECIPES:
        assert n in names
        load_recipe(n)  # builds every quantizer / format / transform


def _quantize_save_load(recipe, tmp_path):
    m = _tiny_llama()
    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    qm = quantkit.quantize(m, recipe, calibration=calib, progress=False, device="cpu")
    x = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = qm(x).logits
    path = qm.save(str(tmp_path / "ck"))
    with open(os.path.join(path, "config.json")) as f:
        layers = json.load(f)["quantization_config"]["layers"]
    lm = quantkit.load(path)
    with torch.no_grad():
        y2 = lm(x).logits
    assert torch.equal(y, y2)
    return qm, lm, layers


def test_mixed_w8_down_w4_recipe(tmp_path):
    recipe = load_recipe("mixed-w8-down-w4")
    qm, lm, layers = _quantize_save_load(recipe, tmp_path)
    assert len(layers) == 14
    for name, spec in layers.items():
        f = spec["format"]
        if name.endswith("down_proj"):
            assert (f["type"], f["bits"], f["group_size"], f["sym"]) == ("int", 8, None, True), name
        else:
            assert (f["type"], f["bits"], f["group_size"], f["sym"]) == ("int", 4, 128, False), name
        assert spec["quantizer"]["type"] == "gptq"
    ql = lm.quantized_layers()
    down, q = ql["model.layers.0.mlp.down_proj"], ql["model.layers.0.self_attn.q_proj"]
    assert set(down.packed) == {"qweight", "scales"} and down.fmt.cfg.bits == 8
    assert set(q.packed) == {"qweight", "scales", "zeros"} and q.fmt.cfg.bits == 4
    # storage cost: int8 per channel = 8 + 16/in; int4 asym, one group of 64 = 4 + (16 + 8)/64
    assert down.bits_per_weight() == pytest.approx(8 + 16 / 160)
    assert q.bits_per_weight() == pytest.approx(4 + 24 / 64)
    n = {k: v.in_features * v.out_features for k, v in ql.items()}
    # every decoder-block parameter counts (quantkit.accounting): the float norms at their dtype's bits
    fl = [p for name, p in lm.model.named_parameters() if name.startswith("model.layers.")]
    expect = (sum(ql[k].bits_per_weight() * n[k] for k in ql) + sum(p.numel() * p.element_size() * 8 for p in fl)) \
        / (sum(n.values()) + sum(p.numel() for p in fl))
    assert lm.bits_per_weight() == pytest.approx(expect)
    assert 4 < lm.bits_per_weight() < 8


def test_mixed_formats_by_rules(tmp_path):
    # any4 attention, NF4 gate/up, FP8 W8A8 for v_proj, INT8 W8A8 + SmoothQuant for down_proj, o_proj float
    recipe = {
        "name": "mixed-formats",
        "quantizer": {"type": "gptq"},
        "format": {"type": "lut", "bits": 4, "group_size": 32},
        "rules": [
            {"match": ["*.o_proj"], "skip": True},
            {"match": ["*.v_proj"], "quantizer": "rtn", "format": {"type": "fp8", "activations": "dynamic"}},
            {"match": ["re:.*\\.(gate|up)_proj"], "format": {"type": "lut", "table": "nf4", "group_size": 32}},
            {"match": ["*.down_proj"], "quantizer": "rtn", "format": {"type": "int8a8"},
             "transforms": [{"type": "smoothquant", "alpha": 0.5}]},
        ],
    }
    qm, lm, layers = _quantize_save_load(recipe, tmp_path)
    assert len(layers) == 12  # o_proj stays float in both blocks
    kinds = {n.rsplit(".", 1)[1]: (s["format"]["type"], s["format"].get("table"), s["quantizer"]["type"],
                                   [t["type"] for t in s["transforms"]]) for n, s in layers.items()}
    assert kinds == {
        "q_proj": ("lut", "learned", "gptq", []), "k_proj": ("lut", "learned", "gptq", []),
        "v_proj": ("fp8", None, "rtn", []), "gate_proj": ("lut", "nf4", "gptq", []),
        "up_proj": ("lut", "nf4", "gptq", []), "down_proj": ("int8a8", None, "rtn", ["smoothquant"]),
    }
    assert isinstance(lm.model.model.layers[0].self_attn.o_proj, torch.nn.Linear)
