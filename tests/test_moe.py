"""Mixture-of-experts (issue 16): transformers 5 fused expert containers are found, split into per-expert
linears with the same forward, every expert quantized (GPTQ W4A16, FP8), calibrated from its routed
tokens or from all tokens, counted honestly, saved and reloaded."""

from __future__ import annotations

import copy

import pytest
import torch

import quantkit
from quantkit.accounting import account
from quantkit.errors import QuantkitError
from quantkit.moe import Experts, unfuse_experts
from quantkit.nn import QuantLinear

BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128)
FAMILIES = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, head_dim=16),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                      shared_expert_intermediate_size=64),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2),
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2, head_dim=16, layer_types=["full_attention"] * 2),
    "deepseek_v3": dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, first_k_dense_replace=0,
                        n_group=1, topk_group=1, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
                        qk_nope_head_dim=8, v_head_dim=16, n_shared_experts=1),
}
E = 4


def tiny_moe(mt: str, seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(mt, **BASE, **FAMILIES[mt])
    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # biases are created empty/zero: give them values so the layout is exercised
        for n, p in m.named_parameters():
            if n.endswith("_bias") or "router.bias" in n:
                p.normal_(0, 0.02)
    return m


def ids(n=8, L=32, seed=1):
    return torch.randint(0, BASE["vocab_size"], (n, L), generator=torch.Generator().manual_seed(seed))


def recipe(fmt="int4", **kw):
    f = {"int4": {"type": "int", "bits": 4, "group_size": 32},
         "fp8": {"type": "fp8"}}[fmt]
    q = "gptq"  # FP8 through GPTQ too: calibrated, so routed-token counts exist
    return {"name": f"moe-{fmt}", "quantizer": {"type": q} if q == "gptq" else "rtn", "format": f,
            "calibration": {"samples": 8, "seq_len": 32, "batch_size": 4}, **kw}


@pytest.mark.parametrize("mt", list(FAMILIES))
def test_unfused_forward_is_the_original(mt):
    m = tiny_moe(mt)
    x = ids(2, 16)
    with torch.no_grad():
        ref = m(x).logits
    found = unfuse_experts(m)
    assert len(found) == 2 and all(isinstance(m.get_submodule(n), Experts) for n in found)
    with torch.no_grad():
        got = m(x).logits
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mt", ["mixtral", "qwen3_moe", "gpt_oss"])
@pytest.mark.parametrize("fmt", ["int4", "fp8"])
def test_every_expert_quantized_and_reload(mt, fmt, tmp_path):
    m = tiny_moe(mt)
    ref = copy.deepcopy(m)
    qm = quantkit.quantize(m, recipe(fmt), calibration=ids(), progress=False, device="cpu")
    ql = qm.quantized_layers()
    experts = [n for n in ql if ".experts." in n]
    assert len(experts) == 2 * E * 3, sorted(ql)  # 2 blocks x 4 experts x gate/up/down
    assert not any(p.dim() == 3 for p in qm.model.parameters())
    acc = account(qm.model)
    assert acc.blocks.quantized / acc.blocks.params > 0.97
    assert qm.bits_per_weight() < (5.5 if fmt == "int4" else 9.5)  # w4 g32: 4.75 + float norms, biases
    assert "router" in acc.kept_float
    # every expert has routed-token counts (all-expert calibration: statistics from every token)
    counts = qm.report.experts
    assert len(counts) == 2 and all(sum(c) == 8 * 32 * 2 for c in counts.values())
    x = ids(2, 16, seed=5)
    with torch.no_grad():
        q_logits, f_logits = qm.model(x).logits, ref(x).logits
    rel = (q_logits - f_logits).norm() / f_logits.norm()
    assert 0 < rel < 0.5, rel  # quantized, and still close to the float model
    path = qm.save(str(tmp_path / "q"))
    back = quantkit.load(path)
    assert isinstance(back.model.get_submodule("model.layers.0.mlp.experts.3.down_proj"), QuantLinear)
    with torch.no_grad():
        torch.testing.assert_close(back.model(x).logits, q_logits)
    assert back.bits_per_weight() == pytest.approx(qm.bits_per_weight())


def test_unquantized_large_tensor_is_an_error(monkeypatch):
    import quantkit.api as api

    monkeypatch.setattr(api, "prepare_moe", lambda model, ignore: [])  # as before MoE support
    with pytest.raises(QuantkitError, match=r"mlp\.experts\.gate_up_proj.*stay float|stay float.*gate_up_proj"):
        quantkit.quantize(tiny_moe("mixtral"), recipe(), calibration=ids(), progress=False, device="cpu")
    with pytest.warns(UserWarning, match="UNQUANTIZED"):
        qm = quantkit.quantize(tiny_moe("mixtral"), recipe(), calibration=ids(), progress=False, device="cpu",
                               allow_unquantized=True)
    # honest label: the float experts dominate the block
    assert qm.bits_per_weight() > 25
    # fused gate_up + down of 2 blocks, and the (unflagged) routers
    assert account(qm.model).kept_float["other"]["params"] == 2 * (4 * 2 * 96 * 64 + 4 * 64 * 96 + 4 * 64)


def test_ignored_experts_stay_fused_and_float():
    r = recipe(ignore=["lm_head", "*.experts"])
    qm = quantkit.quantize(tiny_moe("qwen3_moe"), r, calibration=ids(), progress=False, device="cpu")
    assert not any(".experts." in n for n in qm.quantized_layers())
    assert qm.bits_per_weight() > 25


def test_routed_statistics_and_fallback():
    # routed-only statistics, a min_tokens above what some experts get: those fall back, reported
    r = recipe(moe={"calibrate_all_experts": False, "min_tokens": 10_000})
    qm = quantkit.quantize(tiny_moe("mixtral"), r, calibration=ids(), progress=False, device="cpu")
    layers = qm.report.layers
    ex = {n: v for n, v in layers.items() if ".experts." in n}
    assert len(ex) == 2 * E * 3
    assert all("fallback" in v and v["quantizer"]["type"] == "rtn" and v["format"]["clip"] == "mse"
               for v in ex.values())
    counts = qm.report.experts["model.layers.0.mlp.experts"]
    for i in range(E):
        v = ex[f"model.layers.0.mlp.experts.{i}.gate_proj"]
        assert v["expert_routed_tokens"] == counts[i] == v["expert_stat_tokens"]
    assert sum(counts) == 8 * 32 * 2
    # attention is untouched by the fallback
    assert layers["model.layers.0.self_attn.q_proj"]["quantizer"]["type"] == "gptq"


def test_all_expert_statistics_differ_from_routed():
    """The all-expert option changes the Hessians (and so GPTQ's result), the block outputs do not."""
    outs = {}
    for flag in (True, False):
        qm = quantkit.quantize(tiny_moe("mixtral"), recipe(moe={"calibrate_all_experts": flag, "min_tokens": 0}),
                               calibration=ids(), progress=False, device="cpu")
        outs[flag] = qm
        stat = {n: v["expert_stat_tokens"] for n, v in qm.report.layers.items() if ".experts." in n}
        if flag:
            assert set(stat.values()) == {8 * 32}
        else:
            assert sum(v for n, v in stat.items() if n.startswith("model.layers.0.") and "gate_proj" in n) == 8 * 32 * 2
    a = outs[True].quantized_layers()["model.layers.0.mlp.experts.0.gate_proj"].qweight
    b = outs[False].quantized_layers()["model.layers.0.mlp.experts.0.gate_proj"].qweight
    assert not torch.equal(a, b)


def vllm_mixtral_expert_param(key: str) -> str | None:
    """What vLLM's Mixtral loader (vllm/model_executor/models/mixtral.py, ``load_weights``) makes of a checkpoint
    key: ``FusedMoE.make_expert_params_mapping(ckpt_gate_proj_name="w1", ckpt_down_proj_name="w2",
    ckpt_up_proj_name="w3")`` maps ``experts.{i}.w1.`` / ``w3.`` to ``experts.w13_`` and ``experts.{i}.w2.`` to
    ``experts.w2_`` (expert i, shard w1/w3/w2). None: the key is not an expert tensor."""
    for i in range(E):
        for ckpt in ("w1", "w2", "w3"):
            wn = f"experts.{i}.{ckpt}."
            if wn in key:
                return key.replace(wn, "experts.w13_" if ckpt in ("w1", "w3") else "experts.w2_")
    return None


def test_checkpoint_names_are_what_transformers_saves():
    """quantkit.moe.names (the rename table) reproduces the names transformers 5's own save_pretrained writes for
    the split experts of every family that stores them one by one (Mixtral's hub names; the others: as is)."""
    import tempfile

    from safetensors import safe_open

    from quantkit.moe.names import to_checkpoint

    for mt in ("mixtral", "qwen3_moe", "qwen2_moe", "olmoe", "deepseek_v3"):
        m = tiny_moe(mt)
        with tempfile.TemporaryDirectory() as d:
            m.save_pretrained(d)
            with safe_open(f"{d}/model.safetensors", "pt") as f:
                saved = set(f.keys())
        unfuse_experts(m)
        ours = {to_checkpoint(k, mt) for k in m.state_dict()}
        assert ours == saved, (mt, sorted(ours ^ saved)[:6])


@pytest.mark.parametrize("mt", ["qwen3_moe", "mixtral", "gpt_oss"])
def test_compressed_tensors_export_per_expert_names(mt, tmp_path):
    """Per-expert names as vLLM reads them: ``...mlp.experts.{i}.gate_proj.weight_packed`` (Qwen3-MoE: vLLM's
    ``make_expert_params_mapping(ckpt_gate_proj_name="gate_proj", ...)``), Mixtral's hub names
    ``...block_sparse_moe.experts.{i}.w1/w3/w2.weight_packed`` and ``block_sparse_moe.gate.weight``; every expert
    matrix decompressed by the compressed-tensors package equal to ours; quantkit's reload gives identical
    logits, transformers' from_pretrained (experts dequantized while loading) the same up to float rounding.
    gpt-oss: exported per expert with a warning (transformers and vLLM do not map its per-expert experts)."""
    import json
    import os
    import warnings

    ct = pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.utils.match import is_match
    from safetensors.torch import load_file

    from quantkit.moe.names import to_checkpoint

    r = {**recipe(), "format": {"type": "int", "bits": 4, "group_size": 32, "sym": True}}
    qm = quantkit.quantize(tiny_moe(mt), r, calibration=ids(), progress=False, device="cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = qm.save(str(tmp_path / "ct"), layout="compressed-tensors")
    warned = [w for w in caught if "stored one by one" in str(w.message)]
    assert bool(warned) == (mt == "gpt_oss"), [str(w.message) for w in caught]
    cfg = json.load(open(os.path.join(path, "config.json")))
    qcfg = QuantizationConfig.model_validate(cfg["quantization_config"])
    tensors = load_file(os.path.join(path, "model.safetensors"))
    if mt == "mixtral":
        assert not any(".mlp." in k for k in tensors), sorted(k for k in tensors if ".mlp." in k)[:3]
        for layer in range(2):
            assert f"model.layers.{layer}.block_sparse_moe.gate.weight" in tensors  # the router, float
            mapped = {vllm_mixtral_expert_param(k) for k in tensors if k.startswith(f"model.layers.{layer}.")}
            mapped.discard(None)
            p = f"model.layers.{layer}.block_sparse_moe.experts."
            assert mapped == {p + f"{w}_{s}" for w in ("w13", "w2") for s in ("weight_packed", "weight_scale",
                                                                                  "weight_shape")}
        n_expert_keys = sum(vllm_mixtral_expert_param(k) is not None for k in tensors)
        assert n_expert_keys == 2 * E * 3 * 3  # layers x experts x w1/w2/w3 x packed/scale/shape
        gp = qm.save(str(tmp_path / "gptq"), layout="gptq")  # the GPTQ export writes the same names
        gt = load_file(os.path.join(gp, "model.safetensors"))
        assert "model.layers.1.block_sparse_moe.experts.3.w2.qweight" in gt and not any(".mlp." in k for k in gt)
        with torch.no_grad():
            assert torch.equal(quantkit.load(gp).model(ids(2, 16, seed=5)).logits, qm.model(ids(2, 16, seed=5)).logits)
    else:
        for i in range(E):
            for p in ("gate_proj", "up_proj", "down_proj"):
                assert f"model.layers.1.mlp.experts.{i}.{p}.weight_packed" in tensors
    skeleton = tiny_moe(mt)
    unfuse_experts(skeleton)
    ours = qm.quantized_layers()
    checked = 0
    for name, ql in ours.items():
        mod = skeleton.get_submodule(name)
        stored = to_checkpoint(name, mt)
        scheme = [s for s in qcfg.config_groups.values() if is_match(stored, mod, s.targets, qcfg.ignore)][0]
        comp = BaseCompressor.get_value_from_registry(scheme.format or qcfg.format)
        sd = {k[len(stored) + 1:]: v for k, v in tensors.items() if k.rpartition(".")[0] == stored and
              not k.endswith(".bias")}
        sd["weight_scale"] = sd["weight_scale"].float()
        w = comp.decompress(sd, scheme)["weight"]
        assert torch.equal(w, ql.dequantized_weight()), name
        checked += ".experts." in name
    assert checked == 2 * E * 3 and ct is not None
    back = quantkit.load(path)
    x = ids(2, 16, seed=5)
    with torch.no_grad():
        ref = qm.model(x).logits
        assert torch.equal(back.model(x).logits, ref)
    if mt == "gpt_oss":
        return
    from transformers import AutoModelForCausalLM

    hf, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        torch.testing.assert_close(hf.eval()(x).logits, ref, rtol=0, atol=2e-4)


@pytest.mark.parametrize("mt", ["qwen3_moe", "gpt_oss", "mixtral"])
def test_streamed_moe_equals_whole(mt, tmp_path):
    """A MoE folder streams block by block (issue 17 with issue 16): experts stored one by one under the
    split names (Qwen3-MoE), fused (gpt-oss) or under the hub names transformers' save_pretrained writes
    (Mixtral: ``block_sparse_moe.experts.{i}.w1/w2/w3``, mapped by quantkit.moe.names) give the same
    checkpoint as the whole load, bit for bit."""
    from _guards import load_tensors

    src = tmp_path / "src"
    tiny_moe(mt).save_pretrained(src, max_shard_size="100KB")
    r = recipe("int4")
    qs = quantkit.quantize(str(src), r, calibration=ids(), progress=False, device="cpu", load="stream",
                           save_to=str(tmp_path / "s"))
    qw = quantkit.quantize(str(src), r, calibration=ids(), progress=False, device="cpu", load="whole",
                           save_to=str(tmp_path / "w"))
    assert qw.meta["load"]["load"] == "whole"
    if mt == "mixtral":  # the folder really holds the hub names
        from _guards import load_tensors as stored

        assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in stored(src)
    assert qs.meta["load"]["load"] == "stream" and "why_not_streamed" not in qs.meta["load"]
    assert len(qs.meta["moe_experts"]) == 2
    assert all(p.device.type == "meta" for p in qs.model.model.layers.parameters())  # blocks released
    ta, tb = load_tensors(tmp_path / "s"), load_tensors(tmp_path / "w")
    assert set(ta) == set(tb) and sum(".experts.3.down_proj." in k for k in ta) >= 2
    for k in ta:
        assert torch.equal(ta[k].view(torch.uint8), tb[k].view(torch.uint8)), k
    a, b = quantkit.load(str(tmp_path / "s")), quantkit.load(str(tmp_path / "w"))
    x = ids(2, 16, seed=5)
    with torch.no_grad():
        assert torch.equal(a.model(x).logits, b.model(x).logits)
