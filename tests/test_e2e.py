"""End-to-end scale tuning after the block pass (quantkit/transforms/e2e.py, recipe key ``finetune``): it
lowers the KL to the float model, keeps the codes, is deterministic for a seed, is stored and reloaded
with the same logits, never leaves the calibration loss worse, and refuses bad keys and streamed models
by name."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import quantkit
from quantkit.errors import QuantkitError, RecipeError
from quantkit.nn import QuantLinear
from quantkit.recipe import load_recipe
from quantkit.transforms.e2e import FinetuneConfig, capture_float, run_finetune

from conftest import tiny_model

IDS = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(1))


def _recipe(finetune=None, bits=3, sym=True, fmt=None, **kw):
    r = {"quantizer": "rtn",
         "format": fmt or {"type": "int", "bits": bits, "group_size": 32, "sym": sym,
                           **({"sym_range": "full"} if sym else {})},
         "calibration": {"samples": 8, "seq_len": 32, "batch_size": 4}, **kw}
    if finetune is not None:
        r["finetune"] = {"type": "e2e", **finetune}
    return r


def _kl(float_model, q_model, ids) -> float:
    with torch.no_grad():
        p = torch.log_softmax(float_model(ids).logits.float(), -1)
        q = torch.log_softmax(q_model(ids).logits.float(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def _codes(model) -> dict[str, torch.Tensor]:
    return {n: m.qweight.clone() for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def _scales(model) -> dict[str, torch.Tensor]:
    return {n: m.scales.clone() for n, m in model.named_modules() if isinstance(m, QuantLinear)}


FT = {"epochs": 6, "batch_size": 4, "lr": 0.02}


@pytest.mark.parametrize("sym", [True, False])
def test_e2e_lowers_kl_and_keeps_codes(sym):
    """Against the same quantization without the stage: lower KL to the float model on the calibration
    text (random model, random tokens: nothing to generalise to other text), the same integer codes (and
    zero points), changed scales."""
    ref = tiny_model("llama")
    base = quantkit.quantize(tiny_model("llama"), _recipe(sym=sym), calibration=IDS, progress=False)
    tuned = quantkit.quantize(tiny_model("llama"), _recipe(FT, sym=sym), calibration=IDS, progress=False)
    rec = tuned.meta["finetune"]
    assert rec["steps"] == 12 and rec["layers_trained"] == 14 and rec["kept"] != "start"
    assert rec["loss_kept"] < rec["loss_start"]
    k0, k1 = _kl(ref, base.model, IDS), _kl(ref, tuned.model, IDS)
    assert k1 < 0.9 * k0, (k0, k1)
    assert abs(k0 - rec["loss_start"]) < 1e-4 * max(k0, 1e-6) + 1e-6  # the stage's loss is this KL
    c0, c1 = _codes(base.model), _codes(tuned.model)
    assert all(torch.equal(c0[n], c1[n]) for n in c0)
    if not sym:
        z0 = {n: m.zeros for n, m in base.model.named_modules() if isinstance(m, QuantLinear)}
        z1 = {n: m.zeros for n, m in tuned.model.named_modules() if isinstance(m, QuantLinear)}
        assert all(torch.equal(z0[n], z1[n]) for n in z0)
    s0, s1 = _scales(base.model), _scales(tuned.model)
    assert any(not torch.equal(s0[n], s1[n]) for n in s0)
    assert all(s1[n].dtype == torch.float16 for n in s1)
    assert all(m.dense_weight is None for m in tuned.model.modules() if isinstance(m, QuantLinear))


def test_e2e_deterministic_for_a_seed_and_seed_matters():
    a = quantkit.quantize(tiny_model("llama"), _recipe(FT), calibration=IDS, progress=False)
    b = quantkit.quantize(tiny_model("llama"), _recipe(FT), calibration=IDS, progress=False)
    c = quantkit.quantize(tiny_model("llama"), _recipe({**FT, "seed": 5}), calibration=IDS, progress=False)
    sa, sb, sc = _scales(a.model), _scales(b.model), _scales(c.model)
    assert all(torch.equal(sa[n], sb[n]) for n in sa)
    assert any(not torch.equal(sa[n], sc[n]) for n in sa)  # another batch order
    assert a.meta["finetune"]["history"] == b.meta["finetune"]["history"]


@pytest.mark.parametrize("layout", ["native"])
def test_e2e_save_reload_same_logits(tmp_path, layout):
    qm = quantkit.quantize(tiny_model("llama"), _recipe(FT), calibration=IDS, progress=False)
    with torch.no_grad():
        before = qm.model(IDS).logits
    path = qm.save(str(tmp_path / "ck"), layout=layout)
    back = quantkit.load(path)
    with torch.no_grad():
        after = back.model(IDS).logits
    assert torch.equal(before, after)
    s0, s1 = _scales(qm.model), _scales(back.model)
    assert all(torch.equal(s0[n], s1[n]) for n in s0)
    assert back.meta["finetune"]["steps"] == 12  # the record travels with the checkpoint


def test_e2e_never_worse_than_start():
    """A step far too large: no trained iterate beats the start, so the start (the block pass's scales)
    is kept exactly."""
    base = quantkit.quantize(tiny_model("llama"), _recipe(), calibration=IDS, progress=False)
    qm = quantkit.quantize(tiny_model("llama"), _recipe({"epochs": 1, "lr": 0.9, "optimizer": "sign"}),
                           calibration=IDS, progress=False)
    rec = qm.meta["finetune"]
    assert rec["kept"] == "start" and rec["loss_kept"] == rec["loss_start"] < rec["loss_end"]
    s0, s1 = _scales(base.model), _scales(qm.model)
    assert all(torch.equal(s0[n], s1[n]) for n in s0)


def _norm_weights(model) -> dict[str, torch.Tensor]:
    from quantkit.transforms.norm_tweak import find_norms

    return {n: m.weight.detach().clone() for n, m in find_norms(model, ["Norm"]).items()}


def test_e2e_norms_trained_stored_and_reloaded(tmp_path):
    """``norms: true``: the normalization weights are trained with the scales (lower kept loss than scales
    alone from the same block pass), come back as Parameters of their dtype, and the checkpoint holds them."""
    alone = quantkit.quantize(tiny_model("llama"), _recipe(FT), calibration=IDS, progress=False)
    qm = quantkit.quantize(tiny_model("llama"), _recipe({**FT, "norms": True, "norms_lr": 0.05}), calibration=IDS,
                           progress=False)
    rec = qm.meta["finetune"]
    assert rec["norms_trained"] == 2 * 2 + 1 and rec["kept"] != "start"  # 2 blocks x 2 norms + the final one
    assert rec["loss_kept"] < alone.meta["finetune"]["loss_kept"]
    n0, n1 = _norm_weights(tiny_model("llama")), _norm_weights(qm.model)
    assert set(n0) == set(n1) and any(not torch.equal(n0[k], n1[k]) for k in n0)
    for m in qm.model.modules():
        if type(m).__name__.endswith("Norm"):
            assert isinstance(m._parameters["weight"], torch.nn.Parameter) and "weight" not in m.__dict__
            assert m.weight.dtype == torch.float32
    with torch.no_grad():
        before = qm.model(IDS).logits
    back = quantkit.load(qm.save(str(tmp_path / "ck")))
    with torch.no_grad():
        assert torch.equal(before, back.model(IDS).logits)


def test_e2e_norms_kept_at_start_when_nothing_beats_it():
    qm = quantkit.quantize(tiny_model("llama"), _recipe({"epochs": 1, "lr": 0.9, "optimizer": "sign",
                                                           "norms": True}), calibration=IDS, progress=False)
    assert qm.meta["finetune"]["kept"] == "start"
    n0, n1 = _norm_weights(tiny_model("llama")), _norm_weights(qm.model)
    assert all(torch.equal(n0[k], n1[k]) for k in n0)


def test_e2e_holdout_and_ce_loss():
    qm = quantkit.quantize(tiny_model("llama"), _recipe({**FT, "holdout": 2, "loss": "ce", "eval_every": 1}),
                           calibration=IDS, progress=False)
    rec = qm.meta["finetune"]
    assert rec["eval_on"] == "2 held-out sequences" and rec["steps"] == 12 and len(rec["history"]) == 13
    assert rec["loss_kept"] <= rec["loss_start"]


def test_e2e_lut_scales_and_tables():
    fmt = {"type": "lut", "table": "learned", "bits": 3, "group_size": 32}
    base = quantkit.quantize(tiny_model("llama"), _recipe(fmt=fmt), calibration=IDS, progress=False)
    qm = quantkit.quantize(tiny_model("llama"), _recipe({**FT, "tables": True}, fmt=fmt), calibration=IDS,
                           progress=False)
    ref = tiny_model("llama")
    assert _kl(ref, qm.model, IDS) < _kl(ref, base.model, IDS)
    lut0 = {n: m.lut for n, m in base.model.named_modules() if isinstance(m, QuantLinear)}
    lut1 = {n: m.lut for n, m in qm.model.named_modules() if isinstance(m, QuantLinear)}
    assert any(not torch.equal(lut0[n], lut1[n]) for n in lut0)


def test_e2e_function_on_its_own():
    """The stage as a function (what bench/recon_matrix.py calls): float states captured first."""
    model = tiny_model("llama")
    cfg = FinetuneConfig(**FT)
    target = capture_float(model, IDS, cfg, "cpu")
    assert target.hidden.shape == (8, 32, 64)
    qm = quantkit.quantize(model, _recipe(), calibration=IDS, progress=False)
    before = copy.deepcopy(qm.model)
    rec = run_finetune(qm.model, IDS, target, cfg, "cpu")
    ref = tiny_model("llama")
    assert rec["loss_kept"] < rec["loss_start"]
    assert _kl(ref, qm.model, IDS) < _kl(ref, before, IDS)


@pytest.mark.parametrize("key,value", [("epochs", 0), ("lr", -1.0), ("loss", "mse"), ("optimizer", "sgd"),
                                       ("nonsense", 1), ("type", "lora"), ("holdout", -1),
                                       ("norms_lr", 0.0)])
def test_e2e_bad_keys_name_the_key(key, value):
    with pytest.raises(RecipeError, match=rf"finetune\.{key}"):
        load_recipe(_recipe({key: value}))


def test_e2e_holdout_too_large_names_the_key():
    with pytest.raises(QuantkitError, match=r"finetune\.holdout"):
        quantkit.quantize(tiny_model("llama"), _recipe({"holdout": 8}), calibration=IDS, progress=False)


def test_e2e_refuses_a_streamed_model(tmp_path):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "m")
    with pytest.raises(QuantkitError, match=r"finetune.*streamed.*load='whole'"):
        quantkit.quantize(str(tmp_path / "m"), _recipe(FT), calibration=IDS, progress=False, device="cpu",
                          load="stream")
    # without load=, a finetune recipe loads the folder whole (a folder's default is stream) and runs the stage
    qm = quantkit.quantize(str(tmp_path / "m"), _recipe(FT), calibration=IDS, progress=False, device="cpu")
    assert qm.meta["finetune"]["steps"] == 12 and qm.meta["load"]["load"] == "whole"


@pytest.mark.parametrize("name", ["w3a16-recon-e2e", "w4a16-recon-e2e"])
def test_bundled_e2e_recipes_load(name):
    r = load_recipe(name)
    assert r.finetune is not None and r.block_plugins[0]["type"] == "recon"
