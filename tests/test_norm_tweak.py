"""Norm tweaking: lowers the quantized block's output error; tweaked norms live in the checkpoint."""

from __future__ import annotations

import copy

import pytest
import torch

import quantkit
from quantkit.capture import capture_block_inputs, run_block
from quantkit.models.discovery import find_blocks, find_linears, set_module
from quantkit.quantizers.base import LayerStats
from quantkit.recipe import load_recipe
from quantkit.solve import quantize_linear
from quantkit.transforms.base import block_plugin_from_spec
from quantkit.transforms.norm_tweak import dist_loss, find_norms

from conftest import tiny_model


def _block_err(block, inputs, kwargs, refs) -> float:
    num = den = 0.0
    with torch.no_grad():
        for h, kw, r in zip(inputs, kwargs, refs):
            out = run_block(block, h, kw).double()
            num += float((out - r.double()).pow(2).sum())
            den += float(r.double().pow(2).sum())
    return num / den


def _quantized_block(arch="llama", bits=2):
    model = tiny_model(arch)
    g = torch.Generator().manual_seed(3)
    batches = list(torch.randint(0, 256, (8, 32), generator=g).split(4))
    name, blocks = find_blocks(model)
    inputs, kwargs = capture_block_inputs(model, blocks, batches, "cpu", "cpu")
    block = blocks[0]
    with torch.no_grad():
        refs = [run_block(block, h, kw) for h, kw in zip(inputs, kwargs)]
    float_block = copy.deepcopy(block)
    scheme = load_recipe({"quantizer": "rtn", "format": {"type": "int", "bits": bits, "group_size": 32}}
                         ).scheme_for(f"{name}.0.x")
    for n, mod in find_linears(block).items():
        ql, _ = quantize_linear(n, mod, scheme, LayerStats())
        set_module(block, n, ql)
    return block, float_block, inputs, kwargs, refs


@pytest.mark.parametrize("arch,loss", [("llama", "dist"), ("llama", "mse"), ("gemma3", "dist")])
def test_norm_tweak_lowers_block_error(arch, loss):
    block, float_block, inputs, kwargs, refs = _quantized_block(arch)
    norms = find_norms(block, ["Norm"])
    assert len(norms) >= 2  # llama: input/post-attention; gemma3 also q/k and the feed-forward norms
    before = _block_err(block, inputs, kwargs, refs)
    w0 = {n: m.weight.detach().clone() for n, m in norms.items()}
    plugin = block_plugin_from_spec({"type": "norm_tweak", "lrs": [1e-3, 1e-2], "epochs": 2,
                                     "micro_batch": 2, "loss": loss})
    info = plugin.after_block(block, inputs, kwargs, refs, run_block)
    after = _block_err(block, inputs, kwargs, refs)
    assert after < 0.97 * before, (before, after)
    assert info["norm_tweak_err_after"] == pytest.approx(after, rel=1e-4)
    assert info["norm_tweak_err_before"] == pytest.approx(before, rel=1e-4)
    assert any(not torch.equal(m.weight, w0[n]) for n, m in norms.items())
    # only norm weights moved; nothing needs gradients afterwards
    float_params = dict(float_block.named_parameters())
    for n, p in block.named_parameters():
        assert not p.requires_grad or n in float_params
        if n in float_params and not any(n.startswith(k + ".") for k in norms):
            assert torch.equal(p, float_params[n]), n


def test_norm_tweak_never_worse():
    """With a learning rate far too large, the untweaked weights are kept."""
    block, _, inputs, kwargs, refs = _quantized_block()
    before = _block_err(block, inputs, kwargs, refs)
    norms = find_norms(block, ["Norm"])
    w0 = {n: m.weight.detach().clone() for n, m in norms.items()}
    info = block_plugin_from_spec({"type": "norm_tweak", "lrs": [10.0], "loss": "mse", "epochs": 1}).after_block(
        block, inputs, kwargs, refs, run_block)
    assert _block_err(block, inputs, kwargs, refs) <= before * (1 + 1e-6)
    if info["norm_tweak_lr"] == 0.0:
        assert all(torch.equal(m.weight, w0[n]) for n, m in norms.items())


def test_dist_loss():
    f = torch.randn(2, 16, 8)
    assert float(dist_loss(f, f)) == 0.0
    q = f * 1.5 + 0.2
    ref = ((q.reshape(-1, 8).mean(0) - f.reshape(-1, 8).mean(0)).abs()
           + (q.reshape(-1, 8).var(0, unbiased=False) - f.reshape(-1, 8).var(0, unbiased=False)).abs()).mean()
    assert torch.allclose(dist_loss(q, f), ref)


def test_pipeline_quip_norm_tweak_save_reload(tmp_path, calib_ids):
    """The built-in GPTQ + QuIP + norm-tweak recipe (made cheap for a tiny model) runs, saves, reloads."""
    float_model = tiny_model("llama")
    w_float = {n: p.detach().clone() for n, p in float_model.named_parameters() if "layernorm" in n}
    r = load_recipe("w2-quip-normtweak")
    assert r.transforms[0]["type"] == "quip" and r.block_plugins[0]["type"] == "norm_tweak"
    recipe = r.model_copy(update={"block_plugins": [{**r.block_plugins[0], "lrs": [1e-2], "epochs": 1,
                                                     "micro_batch": 4}]})
    qm = quantkit.quantize(float_model, recipe, calibration=calib_ids, device="cpu", progress=False)
    tweaked = {n: p.detach().clone() for n, p in qm.model.named_parameters() if "layernorm" in n}
    assert any(b.get("norm_tweak_lr", 0) > 0 for b in qm.report.blocks)
    changed = [n for n in tweaked if not torch.equal(tweaked[n], w_float[n])]
    assert changed  # norm tweaking moved some norm weights
    for b in qm.report.blocks:
        assert b["norm_tweak_err_after"] <= b["norm_tweak_err_before"]
    x = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        y = qm.model(x).logits
    path = qm.save(str(tmp_path / "ck"))
    q2 = quantkit.load(path)
    for n, p in q2.model.named_parameters():
        if n in tweaked:
            assert torch.equal(p, tweaked[n]), n
    with torch.no_grad():
        assert torch.equal(q2.model(x).logits, y)
