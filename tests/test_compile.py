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
