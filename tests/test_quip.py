"""QuIP incoherence processing: rotated quantization, run-time inverse, checkpoint round trip."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open

import quantkit
from quantkit.errors import CheckpointError
from quantkit.nn import QuantLinear
from quantkit.quantizers.base import LayerStats
from quantkit.recipe import builtin_recipes, load_recipe
from quantkit.solve import quantize_linear
from quantkit.transforms.hadamard import dense_matrix, plan, random_signs, unpack_signs
from quantkit.transforms.quip import rotate_diag, rotate_hessian

from conftest import tiny_model

NAME = "model.layers.0.mlp.up_proj"


def _layer(out_f, in_f, seed=0, outliers=True):
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(in_f, out_f)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_f, in_f, generator=g) * 0.05)
        if outliers:
            lin.weight[:, 3] *= 25
            lin.weight[7, :] *= 10
    x = torch.randn(2048, in_f, generator=g)
    if outliers:
        x[:, 5] *= 8
    h = x.t() @ x
    return lin, x, LayerStats(x.shape[0], h, torch.diagonal(h).clone(), x.abs().amax(0))


def _scheme(quantizer, bits, quip=True, group=64):
    r = load_recipe({"quantizer": quantizer, "format": {"type": "int", "bits": bits, "group_size": group},
                     "transforms": [{"type": "quip"}] if quip else []})
    return r.scheme_for(NAME)


def _rel(y, ref):
    return float((y - ref).pow(2).sum() / ref.pow(2).sum())


@pytest.mark.parametrize("quantizer", ["rtn", "gptq"])
@pytest.mark.parametrize("shape", [(192, 576), (160, 64), (40, 92)])
def test_runtime_matches_dense_reference(quantizer, shape):
    """forward = Uᵀ Q' V x + b, Q' the stored (rotated) weight, U, V dense float64 references."""
    lin, x, st = _layer(*shape)
    ql, info = quantize_linear(NAME, lin, _scheme(quantizer, 4), st)
    spec = info["transforms"][0]
    assert spec["type"] == "quip" and spec["in"]["n"] == shape[1] and spec["out"]["n"] == shape[0]
    sv = unpack_signs(ql.packed["quip.sv"], shape[1]).double()
    su = unpack_signs(ql.packed["quip.su"], shape[0]).double()
    u = dense_matrix(shape[0]) * su.view(1, -1)
    v = dense_matrix(shape[1]) * sv.view(1, -1)
    q_orig = u.t() @ ql.dequantized_weight().double() @ v  # the weight the layer computes with
    xs = x[:64]
    with torch.no_grad():
        y = ql(xs)
    ref = xs.double() @ q_orig.t() + lin.bias.double()
    assert (y.double() - ref).abs().max() < 1e-4 * ref.abs().max()
    # and that weight approximates the float weight (int4): the inverse rotation is the right one
    with torch.no_grad():
        assert _rel(y, lin(xs)) < 0.05


def test_8bit_quip_layer_is_near_float():
    lin, x, st = _layer(192, 576)
    ql, _ = quantize_linear(NAME, lin, _scheme("rtn", 8), st)
    with torch.no_grad():
        assert _rel(ql(x[:128]), lin(x[:128])) < 1e-4


@pytest.mark.parametrize("quantizer", ["rtn", "gptq"])
def test_quip_lowers_error_at_low_bits(quantizer):
    lin, x, st = _layer(192, 576)
    errs = {}
    for quip in (False, True):
        ql, info = quantize_linear(NAME, lin, _scheme(quantizer, 3, quip), st)
        with torch.no_grad():
            errs[quip] = _rel(ql(x[:512]), lin(x[:512]))
        # the reported error (in the rotated basis) is the true output error
        assert info["rel_err"] == pytest.approx(errs[quip], rel=0.2)
    assert errs[True] < 0.5 * errs[False]


def test_hessian_rotation_matches_dense():
    n = 192
    x = torch.randn(300, n, dtype=torch.float64)
    h = x.t() @ x
    sv = random_signs(n, 3)
    v = dense_matrix(n) * sv.double().view(1, -1)
    assert torch.allclose(rotate_hessian(h, sv, plan(n)), v @ h @ v.t(), atol=1e-9)
    d = torch.rand(n, dtype=torch.float64)
    assert torch.allclose(rotate_diag(d, plan(n)), torch.diagonal(v @ torch.diag(d) @ v.t()), atol=1e-12)
    # the shared stats object of q/k/v is not rotated in place
    st = LayerStats(300, h.float().clone(), torch.diagonal(h).float().clone(), x.abs().amax(0).float())
    lin = torch.nn.Linear(n, 64)
    quantize_linear(NAME, lin, _scheme("gptq", 4), st)
    assert torch.equal(st.hessian, h.float())


def test_linears_sharing_an_input_get_their_own_rotated_factor():
    """q/k/v share one LayerStats with a cache (one GPTQ factor for all three); each QuIP rotation is the
    linear's own, so with QuIP each must equal the same linear quantized with statistics of its own."""
    n = 128
    lin_q, x, st = _layer(64, n, seed=4)
    lin_k, _, _ = _layer(64, n, seed=5)
    shared = LayerStats(st.nsamples, st.hessian.clone(), st.act_sqsum.clone(), st.act_absmax.clone(), cache={})
    names = ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj")
    r = load_recipe({"quantizer": "gptq", "format": {"type": "int", "bits": 3, "group_size": 64},
                     "transforms": [{"type": "quip"}]})
    got = [quantize_linear(nm, lin, r.scheme_for(nm), shared) for nm, lin in zip(names, (lin_q, lin_k))]
    for nm, lin, res in zip(names, (lin_q, lin_k), got):
        own = LayerStats(st.nsamples, st.hessian.clone(), st.act_sqsum.clone(), st.act_absmax.clone())
        alone = quantize_linear(nm, lin, r.scheme_for(nm), own)[0]
        assert torch.equal(res[0].dense_weight, alone.dense_weight), nm


def test_rotated_stats_are_consistent():
    """QuIP hands the quantizer the statistics of the rotated inputs V x."""
    from quantkit.transforms.base import LayerContext, transform_from_spec

    n = 160
    x = torch.randn(500, n, dtype=torch.float64)
    x[:, 3] *= 30
    h = x.t() @ x
    for with_h in (True, False):
        st = LayerStats(500, h.float().clone() if with_h else None, torch.diagonal(h).float().clone(),
                        x.abs().amax(0).float())
        ctx = LayerContext(NAME, torch.randn(64, n), st, seed=2)
        transform_from_spec({"type": "quip", "rotate_out": False}).before(ctx)
        sv = unpack_signs(ctx.tensors["quip.sv"], n).double()
        xr = x @ (dense_matrix(n) * sv.view(1, -1)).t()  # V x for every token
        assert (ctx.stats.act_absmax.double() >= xr.abs().amax(0) * (1 - 1e-6)).all()
        if with_h:  # exact
            assert torch.allclose(ctx.stats.hessian.double(), xr.t() @ xr, rtol=1e-4, atol=1e-2)
            assert torch.allclose(ctx.stats.act_sqsum.double(), xr.pow(2).sum(0), rtol=1e-4)
        else:  # without the Hessian: the diagonal-H approximation, which keeps the total energy
            assert torch.allclose(ctx.stats.act_sqsum.double(), rotate_diag(torch.diagonal(h), plan(n)), rtol=1e-5)
            assert ctx.stats.act_sqsum.sum().item() == pytest.approx(xr.pow(2).sum().item(), rel=1e-5)
        assert "quip.su" not in ctx.tensors and "out" not in ctx.runtime[0]


@pytest.mark.parametrize("arch,quantizer", [("llama", "rtn"), ("llama", "gptq"), ("gemma3", "rtn")])
def test_checkpoint_round_trip(tmp_path, calib_ids, arch, quantizer):
    model = tiny_model(arch)
    x = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(5))
    recipe = {"name": "q", "quantizer": quantizer, "format": {"type": "int", "bits": 3, "group_size": 32},
              "transforms": [{"type": "quip", "seed": 7}]}
    qm = quantkit.quantize(model, recipe, calibration=calib_ids, device="cpu", progress=False)
    layers = qm.quantized_layers()
    assert len(layers) == 14
    with torch.no_grad():
        y = qm.model(x).logits
        mids = {n: torch.randn(3, m.in_features) for n, m in layers.items()}
        outs = {n: m(mids[n]) for n, m in layers.items()}
    path = qm.save(str(tmp_path / "ck"))
    with open(os.path.join(path, "config.json")) as f:
        spec = json.load(f)["quantization_config"]["layers"]["model.layers.1.mlp.down_proj"]
    assert spec["transforms"][0] == {"type": "quip", "in": {"n": 160, "m": 20, "kind": "hadamard"},
                                     "out": {"n": 64, "m": 1, "kind": "hadamard"}}
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.layers.1.mlp.down_proj.quip.sv").dtype == torch.uint8
    assert "model.layers.0.self_attn.k_proj.quip.su" in keys
    q2 = quantkit.load(path)
    with torch.no_grad():
        assert torch.equal(q2.model(x).logits, y)
        for n, m in q2.quantized_layers().items():
            assert torch.equal(m(mids[n]), outs[n]), n


def test_corrupt_sign_vector_is_a_checkpoint_error(tmp_path, calib_ids):
    lin, x, st = _layer(64, 160)
    ql, info = quantize_linear(NAME, lin, _scheme("rtn", 4), st)
    packed = dict(ql.packed)
    packed["quip.sv"] = packed["quip.sv"][:-1]
    with pytest.raises(CheckpointError):
        QuantLinear(160, 64, {k: v for k, v in info.items() if k in ("quantizer", "format", "transforms")},
                    packed, lin.bias.detach())


@pytest.mark.parametrize("name", ["w2-quip", "w3-quip", "w4-quip", "w3-gptq-normtweak", "w3-quip-normtweak",
                                  "w2-quip-normtweak"])
def test_builtin_recipes_load(name):
    assert name in builtin_recipes()
    r = load_recipe(name)
    assert r.name == name
