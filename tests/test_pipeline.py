"""The block-by-block pipeline on tiny random models of each supported architecture family."""

import pytest
import torch

import quantkit
from quantkit.capture import capture_block_inputs, run_block
from quantkit.models.discovery import find_blocks
from quantkit.nn import QuantLinear

from conftest import ARCHS, tiny_model

W4G16 = {"name": "t", "quantizer": {"type": "gptq"}, "format": {"type": "int", "bits": 4, "group_size": 16}}


@pytest.mark.parametrize("arch", ARCHS)
def test_pipeline_quantizes_every_block_linear(arch, calib_ids, tmp_path):
    m = tiny_model(arch)
    with torch.no_grad():
        ref = m(calib_ids).logits
    qm = quantkit.quantize(m, W4G16, calibration=calib_ids, device="cpu", progress=False)
    name, blocks = find_blocks(qm.model)
    qlayers = qm.quantized_layers()
    assert qlayers and all(n.startswith(name + ".") for n in qlayers)
    n_lin = sum(1 for b in blocks for mod in b.modules() if isinstance(mod, QuantLinear))
    assert n_lin == len(qlayers) >= 4 * len(blocks)
    assert not any("lm_head" in n for n in qlayers)
    with torch.no_grad():
        out = qm(calib_ids).logits
    rel = (out - ref).norm() / ref.norm()
    assert 0 < rel < 0.25, rel
    assert len(qm.report.blocks) == len(blocks)
    # reload from disk: identical outputs
    qm.save(tmp_path / "ck")
    back = quantkit.load(str(tmp_path / "ck"))
    with torch.no_grad():
        out2 = back(calib_ids).logits
    assert torch.equal(out, out2)


def test_pipeline_feeds_quantized_outputs_forward(calib_ids):
    """Block i+1's Hessian comes from block i's *quantized* outputs, not the float ones."""
    m = tiny_model("llama")
    seen = {}
    import quantkit.pipeline as P

    orig = P._StatsCollector._add

    def spy(self, name, x):
        if name.endswith("layers.1.self_attn.q_proj") and name not in seen:
            seen[name] = x.detach().clone()
        return orig(self, name, x)

    P._StatsCollector._add = spy
    try:
        quantkit.quantize(m, {"quantizer": "gptq", "format": {"type": "int", "bits": 2, "group_size": 16}},
                          calibration=calib_ids, device="cpu", batch_size=8, progress=False)
    finally:
        P._StatsCollector._add = orig
    fm = tiny_model("llama")
    _, blocks = find_blocks(fm)
    hs, kws = capture_block_inputs(fm, blocks, [calib_ids], "cpu", "cpu")
    with torch.no_grad():
        h1 = run_block(blocks[0], hs[0], kws[0])
        x_float = blocks[1].input_layernorm(h1)
    got = list(seen.values())[0]
    assert got.shape == x_float.shape
    assert not torch.allclose(got, x_float, atol=1e-4), "block 1 saw float inputs"
    assert (got - x_float).norm() / x_float.norm() < 0.5


def test_shared_inputs_share_one_hessian(calib_ids):
    m = tiny_model("llama")
    import quantkit.pipeline as P

    captured = {}
    orig = P._StatsCollector.get

    def spy(self, name):
        s = orig(self, name)
        captured[name] = s
        return s

    P._StatsCollector.get = spy
    try:
        quantkit.quantize(m, W4G16, calibration=calib_ids, device="cpu", progress=False)
    finally:
        P._StatsCollector.get = orig
    q = captured["model.layers.0.self_attn.q_proj"]
    k = captured["model.layers.0.self_attn.k_proj"]
    o = captured["model.layers.0.self_attn.o_proj"]
    assert q is k and q is not o
    assert q.nsamples == calib_ids.numel()


def test_only_current_block_on_device_is_respected_on_cpu(calib_ids):
    m = tiny_model("llama")
    qm = quantkit.quantize(m, "w4a16-rtn", calibration=calib_ids, device="cpu", progress=False)
    assert all(p.device.type == "cpu" for p in qm.model.parameters())


def test_ignore_and_rules(calib_ids):
    m = tiny_model("llama")
    recipe = {"quantizer": "rtn", "format": {"type": "int", "bits": 4, "group_size": 16},
              "ignore": ["lm_head", "re:.*layers\\.0\\..*"],
              "rules": [{"match": "*.down_proj",
                         "format": {"type": "int", "bits": 8, "group_size": None, "sym": True}}]}
    qm = quantkit.quantize(m, recipe, calibration=calib_ids, device="cpu", progress=False)
    q = qm.quantized_layers()
    assert not any(".layers.0." in n for n in q)
    assert q["model.layers.1.mlp.down_proj"].fmt.cfg.bits == 8
    assert q["model.layers.1.mlp.up_proj"].fmt.cfg.bits == 4
