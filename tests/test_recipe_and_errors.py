import pytest
import torch

import quantkit
from quantkit.errors import ModelSourceError, NumericalError, QuantkitError, RecipeError
from quantkit.recipe import builtin_recipes, load_recipe, matches

from conftest import tiny_model


def test_builtin_recipes_all_load():
    names = builtin_recipes()
    assert {"w4a16-gptq", "w4a16-rtn"} <= set(names)
    for n in names:
        assert load_recipe(n).name


@pytest.mark.parametrize("bad,key", [
    ({"quantizer": {"type": "gptq", "dampp": 0.1}}, "quantizer.dampp"),
    ({"quantizer": {"type": "gptq", "damp": -1}}, "quantizer.damp"),
    ({"format": {"type": "int", "bits": "four"}}, "format.bits"),
    ({"format": {"type": "nosuch"}}, "unknown format 'nosuch'"),
    ({"quantizer": "nosuch"}, "unknown quantizer 'nosuch'"),
    ({"calibration": {"samples": 0}}, "calibration.samples"),
    ({"rules": [{"match": "*", "format": {"type": "int", "bits": 99}}]}, "rules[0].format.bits"),
    ({"ignored": ["lm_head"]}, "ignored"),
])
def test_bad_recipe_names_the_key(bad, key):
    with pytest.raises(QuantkitError) as e:
        load_recipe(bad)
    assert key in str(e.value)


def test_bad_recipe_file(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("quantizer: [unclosed")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(str(p))
    p.write_text("- a\n- b\n")
    with pytest.raises(RecipeError, match="mapping"):
        load_recipe(str(p))
    p.write_text("format: {type: int, bits: 4, group_size: 128, sim: true}\n")
    with pytest.raises(RecipeError, match=r"r\.yaml.*format\.sim"):
        load_recipe(str(p))
    with pytest.raises(RecipeError, match="neither a file nor a built-in"):
        load_recipe("no-such-recipe")


def test_patterns():
    assert matches(["lm_head"], "lm_head")
    assert matches(["q_proj"], "model.layers.0.self_attn.q_proj")
    assert not matches(["q_proj"], "model.layers.0.self_attn.q_proj2")
    assert matches(["*.mlp.*"], "model.layers.3.mlp.up_proj")
    assert matches(["re:.*layers\\.[0-4]\\..*"], "model.layers.3.mlp.up_proj")


def test_unknown_model_name():
    with pytest.raises(ModelSourceError, match="unknown model 'no-such-model'"):
        quantkit.quantize("no-such-model", "w4a16-rtn")


def test_nan_weights_rejected(calib_ids):
    m = tiny_model("llama")
    with torch.no_grad():
        m.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(NumericalError, match="up_proj"):
        quantkit.quantize(m, "w4a16-gptq", calibration=calib_ids, device="cpu", progress=False)


def test_nan_activations_rejected(calib_ids):
    m = tiny_model("llama")
    with torch.no_grad():
        m.model.embed_tokens.weight[calib_ids[0, 0]] = float("inf")
    with pytest.raises(NumericalError, match="NaN/inf"):
        quantkit.quantize(m, "w4a16-gptq", calibration=calib_ids, device="cpu", progress=False)


def test_unsupported_architecture():
    class NoBlocks(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)
            self.config = type("C", (), {"_name_or_path": "x"})()

    with pytest.raises(ModelSourceError, match="not supported"):
        quantkit.quantize(NoBlocks(), "w4a16-gptq", calibration=torch.zeros(1, 4, dtype=torch.long), device="cpu")


def test_bad_calibration_tensor():
    with pytest.raises(QuantkitError, match="token ids of shape"):
        quantkit.quantize(tiny_model("llama"), "w4a16-gptq", calibration=torch.zeros(3))
