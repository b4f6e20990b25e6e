"""FP8 (E4M3 / E5M2): every code against a decoder written from the spec, rounding, saturation,
activation-quantization error bounds, the simulated W8A8 matmul, checkpoints."""

from __future__ import annotations

import math

import pytest
import torch

import quantkit
from quantkit.errors import CheckpointError, NumericalError, RecipeError
from quantkit.formats.base import format_from_spec
from quantkit.formats.fp8 import FP8_DTYPES, FP8_MAX, fp8_quantize, quantize_activations_fp8
from quantkit.quantizers.base import LayerStats, quantize_columns

# exponent bits, mantissa bits, bias, "fn" (E4M3: no inf, only S.1111.111 is NaN) or IEEE-like (E5M2)
SPEC = {"e4m3": (4, 3, 7, True), "e5m2": (5, 2, 15, False)}


def ref_decode(code: int, kind: str) -> float:
    """Decode one FP8 byte from the OCP 8-bit floating point spec (written independently)."""
    eb, mb, bias, fn = SPEC[kind]
    sign = -1.0 if code >> 7 else 1.0
    e = (code >> mb) & ((1 << eb) - 1)
    m = code & ((1 << mb) - 1)
    emax_field = (1 << eb) - 1
    if fn:
        if e == emax_field and m == (1 << mb) - 1:
            return math.nan
    elif e == emax_field:
        return sign * math.inf if m == 0 else math.nan
    if e == 0:
        return sign * m * 2.0 ** (1 - bias - mb)
    return sign * (1 + m / 2 ** mb) * 2.0 ** (e - bias)


def ref_table(kind):
    return [ref_decode(c, kind) for c in range(256)]


def ref_encode(x: float, kind: str) -> float:
    """Nearest finite FP8 value, ties to the even code, saturating; NaN -> NaN (float64 brute force)."""
    if math.isnan(x):
        return math.nan
    m = FP8_MAX[kind]
    x = max(-m, min(m, x))
    best = None
    for c in range(256):
        v = ref_decode(c, kind)
        if not math.isfinite(v):
            continue
        d = abs(v - x)
        key = (d, c & 1)  # tie: even mantissa LSB
        if best is None or key < best[0]:
            best = (key, v)
    return best[1]


@pytest.mark.parametrize("kind", ["e4m3", "e5m2"])
def test_all_256_codes_decode_right(kind):
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    got = codes.view(FP8_DTYPES[kind]).float().tolist()
    ref = ref_table(kind)
    for c, (g, r) in enumerate(zip(got, ref)):
        if math.isnan(r):
            assert math.isnan(g), (kind, c, g)
        else:
            assert g == r and math.copysign(1, g) == math.copysign(1, r), (kind, hex(c), g, r)
    finite = [v for v in ref if math.isfinite(v)]
    assert max(finite) == FP8_MAX[kind]
    n_nan = sum(math.isnan(v) for v in ref)
    n_inf = sum(math.isinf(v) for v in ref)
    assert (n_nan, n_inf) == ((2, 0) if kind == "e4m3" else (6, 2))


@pytest.mark.parametrize("kind", ["e4m3", "e5m2"])
def test_every_finite_value_encodes_to_its_own_code(kind):
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    vals = codes.view(FP8_DTYPES[kind]).float()
    fin = torch.isfinite(vals)
    back = fp8_quantize(vals[fin], kind).view(torch.uint8)
    assert torch.equal(back, codes[fin])


@pytest.mark.parametrize("kind", ["e4m3", "e5m2"])
def test_rounding_ties_saturation_nan_inf(kind):
    fin = sorted({v for v in ref_table(kind) if math.isfinite(v)})
    mids = [(a + b) / 2 for a, b in zip(fin, fin[1:])]
    g = torch.Generator().manual_seed(0)
    rnd = (torch.randn(300, generator=g, dtype=torch.float64) * FP8_MAX[kind] / 8).tolist()
    small = (torch.randn(100, generator=g, dtype=torch.float64) * 2.0 ** (-8 if kind == "e4m3" else -15)).tolist()
    eps = [m * (1 + s * 1e-6) for m in mids[::7] for s in (-1, 1)]
    over = [FP8_MAX[kind] * f for f in (1.01, 1.2, 3.0, 1e6)] + [-FP8_MAX[kind] * 5, math.inf, -math.inf]
    xs = fin + mids + rnd + small + eps + over
    got = fp8_quantize(torch.tensor(xs, dtype=torch.float32), kind).float().tolist()
    for x, gval in zip(xs, got):
        r = ref_encode(float(torch.tensor(x, dtype=torch.float32)), kind)
        assert gval == r, (kind, x, gval, r)
    assert math.isnan(fp8_quantize(torch.tensor([math.nan]), kind).float().item())


@pytest.mark.parametrize("kind", ["e4m3", "e5m2"])
def test_dynamic_activation_error_bound(kind):
    _, mb, bias, _ = SPEC[kind]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 96, generator=g) * torch.rand(64, 1, generator=g) * 10
    x[:, 5] *= 100  # an outlier channel
    x[3] = 0  # an all-zero token
    q, s = quantize_activations_fp8(x, kind)
    assert s.shape == (64, 1) and float(s[3]) == 1.0
    xs = x / s
    err = (q.float() - xs).abs()
    # half an ulp: relative 2^-(m+1) for normal values, 2^(1-bias-m-1) absolute in the subnormal range
    bound = torch.maximum(xs.abs() * 2.0 ** -(mb + 1), torch.full_like(xs, 2.0 ** (1 - bias - mb - 1)))
    assert torch.all(err <= bound * (1 + 1e-6))
    assert float(q.float().abs().amax()) == FP8_MAX[kind]  # each token's max hits the top exactly


def test_static_activation_saturates():
    x = torch.tensor([[1.0, -2.0, 1000.0, -1e9, math.inf]])
    q, s = quantize_activations_fp8(x, "e4m3", torch.tensor([[2.0 / 448]]))
    assert q.float().tolist()[0] == [224.0, -448.0, 448.0, -448.0, 448.0]


@pytest.mark.parametrize("kind,scale,act", [("e4m3", "channel", "dynamic"), ("e5m2", "tensor", "static"),
                                            ("e4m3", "tensor", "none")])
def test_weights_and_linear_against_float64_reference(kind, scale, act):
    torch.manual_seed(0)
    w = torch.randn(40, 96)
    w[3] *= 50
    xcal = torch.randn(200, 96) * 3
    stats = LayerStats(200, None, (xcal ** 2).sum(0), xcal.abs().amax(0))
    fmt = format_from_spec({"type": "fp8", "dtype": kind, "weight_scale": scale, "activations": act})
    codes, deq, layer, groups = quantize_columns(w, fmt, stats)
    packed = fmt.pack(codes, layer, groups, None)
    assert packed["weight"].dtype == FP8_DTYPES[kind]
    assert tuple(packed["weight_scale"].shape) == ((40, 1) if scale == "channel" else (1, 1))
    assert ("input_scale" in packed) == (act == "static")
    assert torch.equal(fmt.unpack(packed, (40, 96)), deq)
    # reference: decode bytes with the spec decoder, scales in float64
    table = torch.tensor(ref_table(kind), dtype=torch.float64)
    wq = table[packed["weight"].view(torch.uint8).long()]
    sw = packed["weight_scale"].double()
    assert torch.equal(deq.double(), (wq * sw).float().double())
    # weights: per-row (or tensor) absmax maps onto FP8's max, relative error within half an ulp
    mb = SPEC[kind][1]
    rel = ((deq - w).abs() / w.abs().clamp_min(1e-30))
    big = w.abs() > sw.float() * 2.0 ** (2 - SPEC[kind][2])  # the normal range
    assert torch.all(rel[big] <= 2.0 ** -(mb + 1) * (1 + 1e-5))
    x = torch.randn(2, 5, 96) * 2
    y = fmt.linear(x, packed, (40, 96))
    x64 = x.double().reshape(-1, 96)
    if act == "none":
        yref = x64 @ (wq * sw).t()
    else:
        if act == "dynamic":
            sx = x64.abs().amax(1, keepdim=True) / FP8_MAX[kind]
        else:
            sx = torch.full((1, 1), float(stats.act_absmax.max()) / FP8_MAX[kind], dtype=torch.float64)
            assert packed["input_scale"].item() == pytest.approx(float(sx), rel=1e-6)
            sx = packed["input_scale"].double()
        xq = torch.tensor([ref_encode(v, kind) for v in (x64 / sx).float().double().flatten().tolist()],
                          dtype=torch.float64).view_as(x64)
        yref = (xq @ wq.t()) * sx * sw.t()
    assert torch.allclose(y.reshape(-1, 40).double(), yref, rtol=1e-5, atol=1e-5 * float(yref.abs().max()))


def test_config_and_checkpoint_errors():
    with pytest.raises(RecipeError, match="group"):
        format_from_spec({"type": "fp8", "group_size": 128})
    fmt = format_from_spec({"type": "fp8", "activations": "static"})
    with pytest.raises(NumericalError, match="calibration"):
        fmt.begin_layer(torch.randn(4, 8), None, LayerStats())
    dyn = format_from_spec({"type": "fp8"})
    codes, _, layer, groups = quantize_columns(torch.randn(4, 8), dyn, LayerStats())
    packed = dyn.pack(codes, layer, groups, None)
    with pytest.raises(CheckpointError, match="weight"):
        dyn.unpack({**packed, "weight": packed["weight"].view(torch.uint8)}, (4, 8))
    with pytest.raises(CheckpointError, match="input_scale"):
        dyn.unpack({**packed, "input_scale": torch.ones(1, 1)}, (4, 8))


@pytest.mark.parametrize("fmt_spec", [{"type": "fp8", "dtype": "e4m3", "activations": "dynamic"},
                                      {"type": "fp8", "dtype": "e5m2", "weight_scale": "tensor",
                                       "activations": "static"}],
                         ids=["e4m3-dyn", "e5m2-static"])
def test_checkpoint_round_trip(tmp_path, fmt_spec):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2)).eval()
    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    # the float input of block 0's q_proj, for the static scale check
    seen = []
    h = m.model.layers[0].self_attn.q_proj.register_forward_hook(lambda mod, a, o: seen.append(a[0].abs().amax()))
    with torch.no_grad():
        m(calib)
    h.remove()
    qm = quantkit.quantize(m, {"quantizer": "rtn", "format": fmt_spec}, calibration=calib, progress=False, device="cpu")
    q = qm.quantized_layers()["model.layers.0.self_attn.q_proj"]
    if fmt_spec["activations"] == "static":
        fmax = FP8_MAX[fmt_spec["dtype"]]
        assert q.packed["input_scale"].item() == pytest.approx(float(max(seen)) / fmax, rel=1e-6)
    x = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = qm(x).logits
    qm.save(str(tmp_path / "ck"))
    lm = quantkit.load(str(tmp_path / "ck"))
    with torch.no_grad():
        y2 = lm(x).logits
    assert torch.equal(y, y2)
    q2 = lm.quantized_layers()["model.layers.0.self_attn.q_proj"]
    assert q2.spec["format"] == q.spec["format"]
    assert q2.packed["weight"].dtype == FP8_DTYPES[fmt_spec["dtype"]]
    shape = q2.shape
    n_scales = shape[0] if fmt_spec.get("weight_scale", "channel") == "channel" else 1
    expect_bits = 8 + 32 * n_scales / (shape[0] * shape[1])
    if fmt_spec["activations"] == "static":
        expect_bits += 32 / (shape[0] * shape[1])
    assert q2.bits_per_weight() == pytest.approx(expect_bits)
