"""SmoothQuant transform: scales, exactness in float, statistics, benefit for W8A8, checkpoints."""

from __future__ import annotations

import pytest
import torch

import quantkit
from quantkit.errors import NumericalError, RecipeError
from quantkit.formats.base import format_from_spec
from quantkit.quantizers.base import LayerStats, quantizer_from_spec
from quantkit.transforms.base import LayerContext, transform_from_spec


def _data(seed=0, n=512, cols=64, rows=48):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cols, generator=g)
    x[:, 3] *= 60  # outlier input channels, as in LLM activations
    x[:, 17] *= 25
    w = torch.randn(rows, cols, generator=g) * 0.1
    return x, w


def _full_stats(x):
    return LayerStats(x.shape[0], x.t() @ x, (x ** 2).sum(0), x.abs().amax(0))


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.8, 1.0])
def test_scales_formula_and_exact_float_equivalence(alpha):
    x, w = _data()
    st = _full_stats(x)
    ctx = LayerContext("l", w.clone(), st)
    transform_from_spec({"type": "smoothquant", "alpha": alpha}).before(ctx)
    s = ctx.tensors["smooth.scales"]
    assert s.dtype == torch.float16 and s.shape == (64,)
    ref = x.double().abs().amax(0) ** alpha / w.double().abs().amax(0) ** (1 - alpha)
    assert torch.allclose(s.double(), ref, rtol=2 ** -10)  # fp16 rounding of s
    assert torch.equal(ctx.weight, w * s.float())
    # (x / s) (W s)^T == x W^T in float
    y = (x.double() / s.double()) @ ctx.weight.double().t()
    assert torch.allclose(y, x.double() @ w.double().t(), rtol=1e-5, atol=1e-5)
    assert ctx.runtime == [{"type": "smoothquant", "alpha": alpha, "key": "smooth.scales"}]


def test_statistics_are_those_of_the_smoothed_input_and_shared_stats_untouched():
    x, w = _data(1)
    st = _full_stats(x)
    h0 = st.hessian.clone()
    ctx = LayerContext("l", w.clone(), st)
    transform_from_spec({"type": "smoothquant", "alpha": 0.5}).before(ctx)
    s = ctx.tensors["smooth.scales"].double()
    xs = x.double() / s
    assert torch.allclose(ctx.stats.hessian.double(), xs.t() @ xs, rtol=1e-4, atol=1e-3)
    assert torch.allclose(ctx.stats.act_absmax.double(), xs.abs().amax(0), rtol=1e-5)
    assert torch.allclose(ctx.stats.act_sqsum.double(), (xs ** 2).sum(0), rtol=1e-4)
    assert ctx.stats.nsamples == st.nsamples
    assert torch.equal(st.hessian, h0)  # q/k/v share their input's stats object: never mutated
    # after smoothing, the per-channel activation range is flatter
    def spread(a):
        return float(a.max() / a.median())

    assert spread(ctx.stats.act_absmax) < spread(st.act_absmax) / 4


def test_dead_columns_keep_scale_one():
    x, w = _data(2)
    x[:, 5] = 0
    w[:, 9] = 0
    ctx = LayerContext("l", w.clone(), _full_stats(x))
    transform_from_spec({"type": "smoothquant"}).before(ctx)
    s = ctx.tensors["smooth.scales"]
    assert s[5] == 1 and s[9] == 1 and torch.isfinite(s).all()


def test_smoothing_lowers_int8_w8a8_output_error_with_outlier_channels():
    x, w = _data(3)
    st = _full_stats(x)
    fmt = format_from_spec({"type": "int8a8", "activations": "dynamic"})
    rtn = quantizer_from_spec("rtn")
    yf = x.double() @ w.double().t()

    def w8a8_err(smooth: bool) -> float:
        ctx = LayerContext("l", w.clone(), st)
        if smooth:
            transform_from_spec({"type": "smoothquant", "alpha": 0.5}).before(ctx)
        res = rtn.quantize(ctx.weight, fmt, ctx.stats)
        xin = x / ctx.tensors["smooth.scales"].float() if smooth else x
        y = fmt.linear(xin, res.packed, tuple(w.shape)).double()
        return float((y - yf).norm() / yf.norm())

    plain, smoothed = w8a8_err(False), w8a8_err(True)
    assert smoothed < 0.5 * plain, (plain, smoothed)


def test_needs_calibration_and_validates_alpha():
    with pytest.raises(RecipeError):
        transform_from_spec({"type": "smoothquant", "alpha": 1.5})
    ctx = LayerContext("layer.x", torch.randn(4, 8), LayerStats())
    with pytest.raises(NumericalError, match="calibration"):
        transform_from_spec({"type": "smoothquant"}).before(ctx)


def test_checkpoint_round_trip_with_runtime_division(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2)).eval()
    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    x = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        yf = m(x).logits
    recipe = {"quantizer": "rtn", "format": {"type": "int8a8", "activations": "static"},
              "transforms": [{"type": "smoothquant", "alpha": 0.5}]}
    qm = quantkit.quantize(m, recipe, calibration=calib, progress=False, device="cpu")
    with torch.no_grad():
        y = qm(x).logits
    assert float((y - yf).norm() / yf.norm()) < 0.05
    qm.save(str(tmp_path / "ck"))
    from safetensors import safe_open

    with safe_open(str(tmp_path / "ck" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.mlp.down_proj.smooth.scales" in keys
    lm = quantkit.load(str(tmp_path / "ck"))
    with torch.no_grad():
        y2 = lm(x).logits
    assert torch.equal(y, y2)
    q = lm.quantized_layers()["model.layers.0.mlp.down_proj"]
    assert q.spec["transforms"] == [{"type": "smoothquant", "alpha": 0.5, "key": "smooth.scales"}]
    assert len(q._pre) == 1
    # the stored scales count in the storage cost: 16 bits per input column
    rows, cols = q.shape
    assert q.bits_per_weight() == pytest.approx(8 + 16 / cols + 32 / (rows * cols) + 16 / rows)
    # the layer divides its input by the stored scales before the W8A8 matmul
    xin = torch.randn(3, cols)
    s = q.packed["smooth.scales"].float()
    expect = q.fmt.linear(xin / s, q.packed, q.shape)
    assert torch.equal(q(xin), expect)
