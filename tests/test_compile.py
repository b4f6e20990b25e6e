"""torch.compile over quantized models: a QuantLinear is one opaque operator (``quantkit::qlinear``)
under tracing, so a whole model compiles without graph breaks and gives the eager outputs.

CPU: the ``aot_eager`` backend (tracing, the operator's fake implementation, functionalization; no
code generation). On a GPU (QUANTKIT_TEST_CUDA=1) the same with inductor and CUDA graphs
(mode="reduce-overhead"), where the operator runs the Triton kernels.
"""

from __future__ import annotations

import copy
import gc
import os

import pytest
import torch

import quantkit
from quantkit import nn as qnn
from quantkit.nn import QuantLinear

from conftest import tiny_model

CUDA = os.environ.get("QUANTKIT_TEST_CUDA") == "1" and torch.cuda.is_available()


@pytest.mark.parametrize("recipe", [
    {"name": "int4", "quantizer": "rtn", "format": {"type": "int", "bits": 4, "group_size": 32}},
    {"name": "any4", "quantizer": "rtn", "format": {"type": "lut", "bits": 4, "group_size": 32, "table": "learned"}},
    {"name": "quip3", "quantizer": "rtn", "format": {"type": "int", "bits": 3, "group_size": 32},
     "transforms": [{"type": "quip", "seed": 7}]},  # run-time rotations around the matmul
])
def test_quantized_model_compiles_without_graph_breaks(calib_ids, recipe):
    torch._dynamo.reset()
    qm = quantkit.quantize(tiny_model("llama"), recipe, calibration=calib_ids, device="cpu", progress=False)
    x = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = qm.model(x).logits
        # fullgraph=True: any graph break (e.g. tracing into the layer's kernel plumbing) is an error
        got = torch.compile(qm.model, fullgraph=True, backend="aot_eager")(x).logits
    assert torch.equal(got, ref)

    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(qm.model, fullgraph=True, backend=record)(x)
    ops = [n for g in graphs for n in g.graph.nodes if "qlinear" in str(n.target)]
    assert len(graphs) == 1 and len(ops) == len(qm.quantized_layers())  # every layer is the one operator


def test_operator_shape_dtype_and_registry_lifetime():
    from test_kernels import make_int

    spec, p, _ = make_int(40, 96, 4, 32, False, seed=2)
    layer = QuantLinear(96, 40, {"format": spec}, p, bias=torch.randn(40))
    x = torch.randn(2, 3, 96, dtype=torch.bfloat16)
    y = torch.ops.quantkit.qlinear(x, layer._handle, 40)
    assert y.shape == (2, 3, 40) and y.dtype == x.dtype and torch.equal(y, layer(x))
    with torch._subclasses.fake_tensor.FakeTensorMode():  # the fake implementation agrees
        fy = torch.ops.quantkit.qlinear(torch.empty(2, 3, 96, dtype=torch.bfloat16), layer._handle, 40)
        assert fy.shape == y.shape and fy.dtype == y.dtype
    twin = copy.deepcopy(layer)  # a copy is its own operator target, not an alias of the original
    assert twin._handle != layer._handle
    with torch.no_grad():
        twin.bias.add_(1.0)
    assert torch.equal(torch.ops.quantkit.qlinear(x, twin._handle, 40), twin(x))
    assert not torch.equal(twin(x), layer(x))
    h = layer._handle
    del layer
    gc.collect()
    assert h not in qnn._LAYERS  # no registry entry outlives its layer


@pytest.mark.skipif(not CUDA, reason="needs CUDA (QUANTKIT_TEST_CUDA=1)")
def test_cuda_graphs_capture_the_kernels(calib_ids):
    torch._dynamo.reset()
    recipe = {"name": "int4", "quantizer": "rtn", "format": {"type": "int", "bits": 4, "group_size": 32}}
    qm = quantkit.quantize(tiny_model("llama"), recipe, calibration=calib_ids, device="cpu", progress=False)
    model = qm.model.to("cuda", torch.bfloat16)
    x = torch.randint(0, 256, (1, 16), device="cuda")
    with torch.no_grad():
        ref = model(x).logits.float()
        cm = torch.compile(model, fullgraph=True, mode="reduce-overhead")
        for _ in range(3):  # warm-up, record, replay
            got = cm(x).logits.float()
    assert any(m._kernel is not None for m in qm.quantized_layers().values())  # the kernels ran
    assert (got - ref).abs().max() <= 2e-2 * ref.abs().max()


def _quip_layer():
    from quantkit.quantizers.base import LayerStats
    from quantkit.recipe import load_recipe
    from quantkit.solve import quantize_linear

    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(96, 40)
    x = torch.randn(256, 96, generator=g)
    h = x.t() @ x
    st = LayerStats(x.shape[0], h, torch.diagonal(h).clone(), x.abs().amax(0))
    scheme = load_recipe({"quantizer": "rtn", "format": {"type": "int", "bits": 4, "group_size": 32},
                          "transforms": [{"type": "quip", "seed": 3}]}).scheme_for("model.layers.0.mlp.up_proj")
    layer = quantize_linear("model.layers.0.mlp.up_proj", lin, scheme, st)[0]
    layer.dense_weight = None  # as after calibration (the pipeline clears it once a block is done)
    return layer


def test_gradient_flows_to_x_even_where_a_kernel_serves_the_layer():
    """The Triton kernels have no backward: the kernel still computes the forward, the gradient comes
    from the layer's plain-PyTorch path (same function); a stand-in kernel on CPU shows which ran."""
    from test_kernels import make_int

    spec, p, _ = make_int(40, 96, 4, 32, False, seed=4)
    layer = QuantLinear(96, 40, {"format": spec}, p)
    calls = []

    def stand_in(x):  # what a kernel returns: the right values, no autograd history
        calls.append(1)
        with torch.no_grad():
            return layer.fmt.linear(x, layer.packed, layer.shape)
    layer._kernel, layer._kernel_device = stand_in, torch.device("cpu")
    x = torch.randn(5, 96, requires_grad=True)
    y = layer(x)
    assert calls == [1] and y.requires_grad  # the kernel ran, and the output has a gradient
    g = torch.randn(5, 40)
    y.backward(g)
    assert torch.allclose(x.grad, g @ layer.dequantized_weight(), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        assert not layer(x).requires_grad
    assert calls == [1, 1]


def test_compiled_layer_backward_matches_eager():
    layer = _quip_layer()  # with run-time rotations: the backward goes through them
    x = torch.randn(7, 96, dtype=torch.float64).float()
    xe = x.clone().requires_grad_(True)
    layer(xe).square().sum().backward()
    torch._dynamo.reset()
    xc = x.clone().requires_grad_(True)
    torch.compile(layer, fullgraph=True, backend="aot_eager")(xc).square().sum().backward()
    assert torch.allclose(xc.grad, xe.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not CUDA, reason="needs CUDA (QUANTKIT_TEST_CUDA=1)")
def test_cuda_gradient_through_a_kernel_layer():
    from test_kernels import make_int

    spec, p, _ = make_int(96, 520, 4, 64, False, seed=5)
    layer = QuantLinear(520, 96, {"format": spec}, {k: v.cuda() for k, v in p.items()}).cuda()
    x = torch.randn(7, 520, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    assert layer._kernel is not None and y.requires_grad
    g = torch.randn_like(y)
    y.backward(g)
    ref = g.float() @ layer.dequantized_weight().float()
    assert (x.grad.float() - ref).norm() <= 1e-2 * ref.norm()
