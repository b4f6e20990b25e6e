"""Mixture-of-experts models through the other run modes (issue 16): QuIP rotations on every expert matrix,
a killed and resumed run, and torchrun with 2 gloo ranks against one process. The MoE folder is a tiny
Mixtral saved by transformers (hub names ``block_sparse_moe.experts.{i}.w1/w2/w3``), so these runs stream it."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
import yaml
from _guards import load_tensors
from test_distributed import as_bytes, codes_and_stats, single, torchrun
from test_distributed import recipe as dist_recipe
from test_moe import BASE, FAMILIES, E, ids, tiny_moe
from test_resume import run_worker, same_tensors

import quantkit
from quantkit import resume
from quantkit.nn import QuantLinear
from quantkit.recipe import builtin_recipes


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    """A tiny Mixtral folder with the 256-token vocabulary the test workers draw ids from."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("mixtral", **{**BASE, "vocab_size": 256}, **FAMILIES["mixtral"])
    torch.manual_seed(0)
    d = str(tmp_path_factory.mktemp("moe") / "mixtral")
    AutoModelForCausalLM.from_config(cfg).save_pretrained(d)
    return d


def quip_recipe(name="w3-quip-normtweak", **kw):
    r = yaml.safe_load(open(builtin_recipes()[name]))
    r["calibration"] = {"samples": 8, "seq_len": 32, "batch_size": 4}
    return {**r, **kw}


@pytest.mark.parametrize("name", ["w3-quip-normtweak", "w2a16-quip-recon"])
def test_quip_rotates_every_expert_and_reloads(name, tmp_path):
    """QuIP recipes on a Qwen3-MoE: every expert matrix is rotated (QuIP's sign vectors stored with it, the
    rotation undone at run time) and rounded by GPTQ (LDLQ); the block plugin runs on the MoE block (norm
    tweaking trains its norms; reconstruction learns the rounding of every linear, the experts' included);
    the native checkpoint reloads to identical logits."""
    m = tiny_moe("qwen3_moe")
    ref = copy.deepcopy(m)
    qm = quantkit.quantize(m, quip_recipe(name), calibration=ids(), progress=False, device="cpu")
    experts = {n: ql for n, ql in qm.quantized_layers().items() if ".experts." in n}
    assert len(experts) == 2 * E * 3
    for n, ql in experts.items():
        assert [t["type"] for t in ql.spec["transforms"]] == ["quip"], n
        assert qm.report.layers[n]["quantizer"]["type"] == "gptq" and "fallback" not in qm.report.layers[n]
    if name.endswith("recon"):  # 4 attention projections + every expert matrix of the block
        assert all(b["recon_layers"] == 4 + 3 * E and b["recon_skipped"] == 0 for b in qm.report.blocks)
    else:
        assert all(any(k.startswith("norm_tweak") for k in b) for b in qm.report.blocks), qm.report.blocks[0]
    x = ids(2, 16, seed=5)
    with torch.no_grad():
        q, f = qm.model(x).logits, ref(x).logits
    assert 0 < float((q - f).norm() / f.norm()) < 0.6
    back = quantkit.load(qm.save(str(tmp_path / "q")))
    assert isinstance(back.model.get_submodule("model.layers.1.mlp.experts.2.up_proj"), QuantLinear)
    with torch.no_grad():
        assert torch.equal(back.model(x).logits, q)


def test_quip_fallback_keeps_the_rotation_and_says_so():
    """An expert matrix with too few tokens falls back to RTN (MSE ranges); QuIP's rotation needs no statistics,
    so it is kept (RTN rounds in the rotated basis) and the report names what was kept."""
    r = quip_recipe("w3-quip", moe={"calibrate_all_experts": False, "min_tokens": 10_000})
    qm = quantkit.quantize(tiny_moe("qwen3_moe"), r, calibration=ids(), progress=False, device="cpu")
    for n, ql in qm.quantized_layers().items():
        assert [t["type"] for t in ql.spec["transforms"]] == ["quip"], n
        if ".experts." in n:
            note = qm.report.layers[n]["fallback"]
            assert "transforms kept: quip" in note and "DROPPED" not in note, note
            assert qm.report.layers[n]["quantizer"]["type"] == "rtn"
        else:
            assert qm.report.layers[n]["quantizer"]["type"] == "gptq"


RECIPE = {"quantizer": {"type": "gptq", "act_order": True, "static_groups": True},
          "format": {"type": "int", "bits": 4, "group_size": 16, "sym": False}, "calibration": {"batch_size": 2}}


def test_killed_moe_run_resumes_bit_identical(moe_dir, tmp_path):
    """A streamed Mixtral run killed after block 0 resumes from block 1: the checkpoint (every expert's packed
    tensors) and the routed-token counts equal an uninterrupted run's."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = quantkit.quantize(moe_dir, RECIPE, calibration=torch.randint(
            0, 256, (6, 32), generator=torch.Generator().manual_seed(1)), device="cpu", progress=False,
            resume_dir=str(tmp_path / "w_ref"))
    finally:
        torch.set_num_threads(n)
    assert ref.meta["load"]["load"] == "stream" and ref.meta["resume"]["resumed_from_block"] is None
    ref.save(str(tmp_path / "ref"))
    work, out = tmp_path / "w", tmp_path / "out"
    p = run_worker(moe_dir, work, out, recipe=RECIPE, env={"QK_KILL_AFTER_BLOCK": "0"})
    assert p.returncode == -9, p.stderr[-3000:]
    assert resume.read_state(str(work))["next_block"] == 1
    p = run_worker(moe_dir, work, out, recipe=RECIPE)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resuming from block 1 of 2" in p.stderr
    same_tensors(str(tmp_path / "ref"), str(out))
    ta = load_tensors(out)
    assert sum(k.endswith("experts.3.down_proj.qweight") for k in ta) == 2
    ra = json.load(open(tmp_path / "ref" / "quantkit_run.json"))["report"]
    rb = json.load(open(out / "quantkit_run.json"))["report"]
    assert ra["experts"] == rb["experts"] and len(rb["experts"]) == 2
    for name, v in ra["layers"].items():
        if ".experts." in name:
            assert {k: rb["layers"][name][k] for k in ("expert_routed_tokens", "expert_stat_tokens")} == \
                {k: v[k] for k in ("expert_routed_tokens", "expert_stat_tokens")}, name


def test_two_ranks_moe_bit_identical_to_one_process(moe_dir, tmp_path):
    """torchrun, 2 gloo ranks, float64 statistics: each rank calibrates half the batches (all-expert
    statistics, routed-token counts summed over the ranks), the solves are split among the ranks (row ranges
    too); statistics, codes, layer specs and expert counts equal one process's, bit for bit."""
    rec = dist_recipe("float64")
    one = single(moe_dir, tmp_path / "one", rec)
    two = json.loads(torchrun(moe_dir, tmp_path / "two", rec).stdout.strip().splitlines()[-1])
    assert one["world"] == 1 and two["world"] == 2
    (ta, sa), (tb, sb) = codes_and_stats(tmp_path / "one"), codes_and_stats(tmp_path / "two")
    assert sorted(sa) == sorted(sb) and sorted(ta) == sorted(tb)
    # all-expert statistics: the gate/up projections of every expert see the same input (one shared record),
    # each down projection its own
    assert sum(".experts." in k and k.endswith(".nsamples") for k in sa) == 2 * (1 + E)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    for k in ta:
        assert torch.equal(as_bytes(ta[k]), as_bytes(tb[k])), k
    ca = json.load(open(tmp_path / "one" / "config.json"))["quantization_config"]
    cb = json.load(open(tmp_path / "two" / "config.json"))["quantization_config"]
    assert ca["layers"] == cb["layers"]
    ra = json.load(open(os.path.join(tmp_path / "one", "quantkit_run.json")))["report"]
    rb = json.load(open(os.path.join(tmp_path / "two", "quantkit_run.json")))["report"]
    assert ra["experts"] == rb["experts"] and sum(ra["experts"]["model.layers.0.mlp.experts"]) == 12 * 32 * 2
