"""Llama 4's expert container (issue 16): its forward takes the tokens laid out per expert ([E*T, H], each
pre-multiplied by its router score), found by its signature and run by quantkit.moe.dense; every expert is
quantized, counted, calibrated from routed or from all tokens, saved and reloaded."""

from __future__ import annotations

import copy

import pytest
import torch

import quantkit
from quantkit.accounting import account
from quantkit.moe import Experts, unfuse_experts
from quantkit.moe.dense import dense_forward, takes_expert_major_input
from quantkit.nn import QuantLinear

E, V = 4, 128


def tiny_llama4(seed: int = 0, top_k: int = 1):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("llama4_text", vocab_size=V, hidden_size=64, intermediate_size=96,
                               intermediate_size_mlp=128, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                               num_local_experts=E, num_experts_per_tok=top_k, interleave_moe_layer_step=1)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).eval()


def ids(n=8, L=32, seed=1):
    return torch.randint(0, V, (n, L), generator=torch.Generator().manual_seed(seed))


def recipe(fmt="int4", **kw):
    f = {"int4": {"type": "int", "bits": 4, "group_size": 32}, "fp8": {"type": "fp8"}}[fmt]
    return {"name": f"l4-{fmt}", "quantizer": {"type": "gptq"}, "format": f,
            "calibration": {"samples": 8, "seq_len": 32, "batch_size": 4}, **kw}


def test_found_by_signature_and_same_forward():
    m = tiny_llama4()
    host = m.model.layers[0].feed_forward.experts
    assert takes_expert_major_input(host)
    x = ids(2, 16)
    with torch.no_grad():
        ref = m(x).logits
    found = unfuse_experts(m)
    assert found == ["model.layers.0.feed_forward.experts", "model.layers.1.feed_forward.experts"]
    ex = m.get_submodule(found[0])
    assert isinstance(ex, Experts) and ex.expert_major
    assert getattr(m.model.layers[0].feed_forward.router, "_quantkit_router", False)
    with torch.no_grad():
        torch.testing.assert_close(m(x).logits, ref, rtol=1e-5, atol=1e-5)


def test_rows_of_other_shapes_are_an_error():
    m = tiny_llama4()
    unfuse_experts(m)
    ex = m.get_submodule("model.layers.0.feed_forward.experts")
    with pytest.raises(ValueError, match="not a multiple of 4 experts"):
        dense_forward(ex, torch.randn(6, 64))


@pytest.mark.parametrize("fmt", ["int4", "fp8"])
def test_every_expert_quantized_and_reload(fmt, tmp_path):
    m = tiny_llama4()
    ref = copy.deepcopy(m)
    qm = quantkit.quantize(m, recipe(fmt), calibration=ids(), progress=False, device="cpu")
    ql = qm.quantized_layers()
    assert len([n for n in ql if ".experts." in n]) == 2 * E * 3
    assert not any(p.dim() == 3 for p in qm.model.parameters())
    acc = account(qm.model)
    assert acc.blocks.quantized / acc.blocks.params > 0.97
    assert "router" in acc.kept_float
    counts = qm.report.experts  # top-1: every token counted once per block
    assert len(counts) == 2 and all(sum(c) == 8 * 32 for c in counts.values())
    stat = {n: v["expert_stat_tokens"] for n, v in qm.report.layers.items() if ".experts." in n}
    assert set(stat.values()) == {8 * 32}  # all-expert calibration (default): every token reaches every expert
    x = ids(2, 16, seed=5)
    with torch.no_grad():
        q_logits, f_logits = qm.model(x).logits, ref(x).logits
    rel = (q_logits - f_logits).norm() / f_logits.norm()
    assert 0 < rel < 0.5, rel
    back = quantkit.load(qm.save(str(tmp_path / "q")))
    assert isinstance(back.model.get_submodule("model.layers.1.feed_forward.experts.3.down_proj"), QuantLinear)
    with torch.no_grad():
        torch.testing.assert_close(back.model(x).logits, q_logits)


def test_routed_statistics_and_the_topk_fallback():
    qm = quantkit.quantize(tiny_llama4(), recipe(moe={"calibrate_all_experts": False, "min_tokens": 0}),
                           calibration=ids(), progress=False, device="cpu")
    counts = qm.report.experts["model.layers.0.feed_forward.experts"]
    for i in range(E):
        v = qm.report.layers[f"model.layers.0.feed_forward.experts.{i}.up_proj"]
        assert v["expert_routed_tokens"] == counts[i] == v["expert_stat_tokens"]
    # top-2: a token's rows over experts no longer sum to an input some expert saw: routed statistics, warned
    with pytest.warns(UserWarning, match="falls back to routed tokens"):
        qm2 = quantkit.quantize(tiny_llama4(top_k=2), recipe(moe={"min_tokens": 0}), calibration=ids(),
                                progress=False, device="cpu")
    stat = [v["expert_stat_tokens"] for n, v in qm2.report.layers.items()
            if n.startswith("model.layers.0.") and n.endswith("gate_proj") and ".experts." in n]
    assert sum(stat) == 8 * 32 * 2


def test_streamed_equals_whole_and_compressed_tensors_export(tmp_path):
    """transformers saves Llama 4's experts fused ([E, H, 2I], [E, I, H]): streamed and whole loads give the same
    checkpoint bit for bit; the compressed-tensors export stores the experts one by one, the router in
    ``ignore`` (it is an nn.Linear subclass: the "Linear" target would match it), and transformers'
    from_pretrained reads it (it swaps Llama4TextExperts for per-expert linears when loading compressed-tensors)."""
    import json
    import os
    import warnings

    pytest.importorskip("compressed_tensors")
    from _guards import load_tensors
    from transformers import AutoModelForCausalLM

    src = tmp_path / "src"
    tiny_llama4().save_pretrained(src, max_shard_size="100KB")
    assert any(k.endswith("feed_forward.experts.gate_up_proj") for k in load_tensors(src))
    r = {**recipe(), "format": {"type": "int", "bits": 4, "group_size": 32, "sym": True}}
    qs = quantkit.quantize(str(src), r, calibration=ids(), progress=False, device="cpu", load="stream",
                           save_to=str(tmp_path / "s"))
    qw = quantkit.quantize(str(src), r, calibration=ids(), progress=False, device="cpu", load="whole",
                           save_to=str(tmp_path / "w"))
    assert qs.meta["load"]["load"] == "stream"
    ta, tb = load_tensors(tmp_path / "s"), load_tensors(tmp_path / "w")
    assert set(ta) == set(tb)
    for k in ta:
        assert torch.equal(ta[k].view(torch.uint8), tb[k].view(torch.uint8)), k
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "transformers cannot read it" warning for Llama 4
        path = qw.save(str(tmp_path / "ct"), layout="compressed-tensors")
    cfg = json.load(open(os.path.join(path, "config.json")))
    assert "model.layers.0.feed_forward.router" in cfg["quantization_config"]["ignore"]
    x = ids(2, 16, seed=5)
    with torch.no_grad():
        ref = quantkit.load(str(tmp_path / "s")).model(x).logits
        assert torch.equal(qw.model(x).logits, ref)
        assert torch.equal(quantkit.load(path).model(x).logits, ref)
    hf, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        torch.testing.assert_close(hf.eval()(x).logits, ref, rtol=0, atol=2e-4)
