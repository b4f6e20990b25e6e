"""INT8 W8A8 (format int8a8): int-layout weights, int8 activations (dynamic / static), checkpoints."""

from __future__ import annotations

import pytest
import torch

import quantkit
from quantkit.errors import CheckpointError, NumericalError, RecipeError
from quantkit.formats.base import format_from_spec
from quantkit.formats.int8 import quantize_activations_int8
from quantkit.quantizers.base import LayerStats, quantize_columns


def _stats(x):
    return LayerStats(x.shape[0], None, (x ** 2).sum(0), x.abs().amax(0))


def test_weights_are_the_int_layout_int8_sym_per_channel():
    torch.manual_seed(0)
    w = torch.randn(48, 80)
    w[2] *= 30
    st = _stats(torch.randn(50, 80))
    a8 = format_from_spec({"type": "int8a8"})
    ref = format_from_spec({"type": "int", "bits": 8, "group_size": None, "sym": True})
    c1, d1, l1, g1 = quantize_columns(w, a8, st)
    c2, d2, l2, g2 = quantize_columns(w, ref, st)
    p1, p2 = a8.pack(c1, l1, g1, None), ref.pack(c2, l2, g2, None)
    assert set(p1) == {"qweight", "scales"}
    assert torch.equal(p1["qweight"], p2["qweight"]) and torch.equal(p1["scales"], p2["scales"])
    assert p1["qweight"].shape == (48, 80) and p1["scales"].shape == (48, 1)
    assert torch.equal(a8.unpack(p1, (48, 80)), d1)
    # float64 reference of the int math: s = max|w| / 127.5 (fp16), q = clamp(round(w/s) + 128, 0, 255)
    s = (w.double().abs().amax(1, keepdim=True) / 127.5).half().double()
    q = torch.clamp(torch.round(w.double() / s) + 128, 0, 255)
    assert torch.equal(d1.double(), ((q - 128) * s).float().double())
    assert a8.bits_per_weight(p1, (48, 80)) == pytest.approx(8 + 16 / 80)


def test_dynamic_activation_error_within_half_a_step():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 50, 64, generator=g) * 4
    x[..., 7] *= 50
    x[0, 0] = 0
    q, s = quantize_activations_int8(x)
    assert s.shape == (3, 50, 1)
    assert torch.equal(q, torch.round(q)) and float(q.abs().max()) <= 127
    assert torch.all((q * s - x).abs() <= s / 2 * (1 + 1e-6))
    assert torch.all(q.abs().amax(-1) == torch.where(x.abs().amax(-1) > 0, 127.0, 0.0))


def test_static_activation_saturates_at_127():
    q, s = quantize_activations_int8(torch.tensor([[0.26, -1.0, 5.0, -50.0]]), torch.tensor([[0.01]]))
    assert q.tolist()[0] == [26.0, -100.0, 127.0, -127.0]


@pytest.mark.parametrize("act", ["dynamic", "static"])
def test_linear_against_float64_integer_matmul(act):
    torch.manual_seed(1)
    w = torch.randn(32, 64)
    xcal = torch.randn(100, 64) * 2
    fmt = format_from_spec({"type": "int8a8", "activations": act})
    codes, deq, layer, groups = quantize_columns(w, fmt, _stats(xcal))
    packed = fmt.pack(codes, layer, groups, None)
    assert ("input_scale" in packed) == (act == "static")
    x = torch.randn(4, 7, 64) * 2
    y = fmt.linear(x, packed, (32, 64))
    x64 = x.double().reshape(-1, 64)
    if act == "dynamic":
        sx = x64.abs().amax(1, keepdim=True) / 127
    else:
        sx = torch.tensor([[float(xcal.abs().max()) / 127]], dtype=torch.float64)
        assert packed["input_scale"].item() == pytest.approx(float(sx), rel=1e-6)
        sx = packed["input_scale"].double()
    xq = torch.clamp(torch.round(x64 / sx), -127, 127)
    wq = codes.double() - 128
    yref = (xq @ wq.t()) * sx * packed["scales"].double().t()
    assert torch.allclose(y.reshape(-1, 32).double(), yref, rtol=1e-5, atol=1e-6 * float(yref.abs().max()))
    # and the W8A8 output stays close to the float layer
    yf = x @ w.t()
    assert float((y - yf).norm() / yf.norm()) < 0.02


def test_config_and_checkpoint_errors():
    with pytest.raises(RecipeError, match="per channel"):
        format_from_spec({"type": "int8a8", "group_size": 128})
    with pytest.raises(RecipeError):
        format_from_spec({"type": "int8a8", "bits": 4})
    fmt = format_from_spec({"type": "int8a8", "activations": "static"})
    with pytest.raises(NumericalError, match="calibration"):
        fmt.begin_layer(torch.randn(4, 8), None, LayerStats())
    dyn = format_from_spec({"type": "int8a8"})
    codes, _, layer, groups = quantize_columns(torch.randn(4, 8), dyn, LayerStats())
    packed = dyn.pack(codes, layer, groups, None)
    with pytest.raises(CheckpointError, match="input_scale"):
        dyn.linear(torch.randn(2, 8), {**packed, "input_scale": torch.ones(1, 1)}, (4, 8))
    with pytest.raises(CheckpointError, match="scales"):
        dyn.linear(torch.randn(2, 8), {**packed, "scales": packed["scales"].float()}, (4, 8))


@pytest.mark.parametrize("act", ["dynamic", "static"])
def test_checkpoint_round_trip(tmp_path, act):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2)).eval()
    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    x = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        yf = m(x).logits
    qm = quantkit.quantize(m, {"quantizer": "gptq", "format": {"type": "int8a8", "activations": act}},
                           calibration=calib, progress=False, device="cpu")
    with torch.no_grad():
        y = qm(x).logits
    assert float((y - yf).norm() / yf.norm()) < 0.05
    qm.save(str(tmp_path / "ck"))
    lm = quantkit.load(str(tmp_path / "ck"))
    with torch.no_grad():
        y2 = lm(x).logits
    assert torch.equal(y, y2)
    q = lm.quantized_layers()["model.layers.1.mlp.down_proj"]
    assert q.spec["format"]["type"] == "int8a8" and q.spec["format"]["activations"] == act
    assert set(q.packed) == ({"qweight", "scales", "input_scale"} if act == "static" else {"qweight", "scales"})
