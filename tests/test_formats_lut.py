"""LUT formats (any4/any3/any2, NF4, FP4): tables, rounding, packing, k-means, GPTQ, checkpoints."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import quantkit
from quantkit.errors import CheckpointError, RecipeError
from quantkit.formats.base import format_from_spec
from quantkit.formats.kmeans import kmeans_dp_1d, weighted_kmeans_1d, weighted_sse
from quantkit.formats.lut import FP4_TABLE, NF4_TABLE
from quantkit.formats.packing import pack_codes
from quantkit.quantizers.base import LayerStats, quantize_columns, quantizer_from_spec

SPECS = [
    {"type": "lut", "table": "learned", "bits": 4, "group_size": 32},
    {"type": "lut", "table": "learned", "bits": 3, "group_size": None},
    {"type": "lut", "table": "learned", "bits": 2, "group_size": 48},
    {"type": "lut", "table": "nf4", "group_size": 32},
    {"type": "lut", "table": "fp4", "group_size": None},
]


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(cfg).eval()


# ---- fixed tables against their definitions ------------------------------------------------------
def test_nf4_table_matches_its_definition():
    # QLoRA / bitsandbytes: 8 positive normal quantiles from linspace(0.9677083, 0.5, 9)[:-1], 7
    # negative ones from linspace(0.9677083, 0.5, 8)[:-1], and 0; divided by the largest.
    off = 0.9677083
    def ndtri(p):
        return math.sqrt(2) * torch.special.erfinv(torch.tensor(2 * p - 1, dtype=torch.float64)).item()

    pos = [ndtri(p) for p in np.linspace(off, 0.5, 9)[:-1]]
    neg = [-ndtri(p) for p in np.linspace(off, 0.5, 8)[:-1]]
    vals = sorted(pos + neg + [0.0])
    m = max(abs(v) for v in vals)
    ref = [v / m for v in vals]
    assert len(NF4_TABLE) == 16
    assert np.allclose(NF4_TABLE, ref, atol=1e-6)


def test_fp4_table_is_e2m1():
    mags = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]  # OCP MX spec, E2M1 codes 0..7
    assert list(FP4_TABLE[:8]) == mags
    assert list(FP4_TABLE[8:]) == [-v for v in mags]
    assert math.copysign(1.0, FP4_TABLE[8]) == -1.0  # code 8 is -0


# ---- encoding round trips --------------------------------------------------------------------------
@pytest.mark.parametrize("spec", SPECS,
                         ids=lambda s: f"{s['table']}{s['bits'] if 'bits' in s else 4}-g{s['group_size']}")
def test_every_code_decodes_exactly(spec):
    fmt = format_from_spec(spec)
    K = 1 << fmt.cfg.bits
    rows, cols = 6, 100
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, K, (rows, cols), generator=g, dtype=torch.int32)
    codes[:, :K] = torch.arange(K, dtype=torch.int32)  # every code in every row
    if fmt.learned:
        lut = (torch.randn(rows, K, generator=g)).to(torch.float16)
    else:
        lut = torch.tensor(NF4_TABLE if spec["table"] == "nf4" else FP4_TABLE).to(torch.float16).unsqueeze(0)
    ng = len(fmt.cfg.groups(cols))
    packed = {"qweight": pack_codes(codes, fmt.cfg.bits), "lut": lut}
    if fmt.has_scales:
        packed["scales"] = (torch.rand(rows, ng, generator=g) + 0.1).to(torch.float16)
    w = fmt.unpack(packed, (rows, cols))
    # float64 reference: w = lut[r, q] * scale[r, j // g]
    gsz = spec["group_size"] or cols
    ref = torch.empty(rows, cols, dtype=torch.float64)
    for r in range(rows):
        for j in range(cols):
            v = float(lut[r if fmt.learned else 0, codes[r, j]])
            s = float(packed["scales"][r, j // gsz]) if fmt.has_scales else 1.0
            ref[r, j] = v * s
    assert torch.equal(w.double(), ref)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s['table']}-{s.get('bits', 4)}-g{s['group_size']}")
def test_quantize_pack_unpack_is_exact_and_nearest(spec):
    fmt = format_from_spec(spec)
    torch.manual_seed(0)
    w = torch.randn(24, 100) * torch.rand(24, 1)  # 100 columns: a short last group
    stats = LayerStats(10, None, torch.rand(100) * 10, torch.rand(100))
    codes, deq, layer, groups = quantize_columns(w, fmt, stats)
    packed = fmt.pack(codes, layer, groups, None)
    assert torch.equal(fmt.unpack(packed, tuple(w.shape)), deq)  # stored == in-memory, bit for bit
    # every weight went to the nearest table value (float64 brute force; ties excluded)
    lut = packed["lut"].double()
    gsz = spec["group_size"] or 100
    scale = (packed["scales"].double()[:, torch.arange(100) // gsz] if fmt.has_scales
             else torch.ones(24, 100, dtype=torch.float64))
    x = w.double() / scale
    tab = lut if fmt.learned else lut.expand(24, -1)
    dist = (x.unsqueeze(-1) - tab.unsqueeze(1)).abs()  # [r, j, K]
    best = dist.min(-1).values
    chosen = dist.gather(-1, codes.long().unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(chosen, best, rtol=0, atol=1e-6 * float(x.abs().max()))
    # re-quantizing the dequantized weight with the same parameters is a fixed point
    for (a, b), p in zip(fmt.cfg.groups(100), groups):
        _, again = fmt.quantize(deq[:, a:b], p, layer)
        assert torch.equal(again, deq[:, a:b])


def test_bits_per_weight_counts_everything():
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    for spec, expect in [({"type": "lut", "bits": 4, "group_size": 128}, 4 + 16 * 16 / 256 + 16 / 128),
                         ({"type": "lut", "bits": 4, "group_size": None, "weighting": "none"}, 4 + 16 * 16 / 256),
                         ({"type": "lut", "bits": 3, "group_size": None, "weighting": "none"}, 3 + 8 * 16 / 256),
                         ({"type": "lut", "table": "nf4", "group_size": 64}, 4 + 16 / 64 + 16 * 16 / (64 * 256))]:
        fmt = format_from_spec(spec)
        codes, _, layer, groups = quantize_columns(w, fmt, LayerStats(1, None, torch.ones(256), torch.ones(256)))
        packed = fmt.pack(codes, layer, groups, None)
        assert fmt.bits_per_weight(packed, (64, 256)) == pytest.approx(expect, rel=1e-12)


def test_config_errors():
    with pytest.raises(RecipeError, match="bits: 4"):
        format_from_spec({"type": "lut", "table": "nf4", "bits": 3})
    with pytest.raises(RecipeError):
        format_from_spec({"type": "lut", "table": "int9"})


# ---- k-means --------------------------------------------------------------------------------------
def _dp_optimum(x, w, k):
    """Exact weighted 1-D k-means error in float64 by dynamic programming over the sorted points."""
    o = np.argsort(x)
    xs, ws = x[o], w[o]
    n = len(xs)
    W = np.concatenate([[0], np.cumsum(ws)])
    S = np.concatenate([[0], np.cumsum(ws * xs)])
    Q = np.concatenate([[0], np.cumsum(ws * xs * xs)])
    a, b = np.arange(n + 1)[:, None], np.arange(n + 1)[None, :]
    ww, s = W[b] - W[a], S[b] - S[a]
    with np.errstate(all="ignore"):
        C = Q[b] - Q[a] - np.where(ww > 0, s * s / ww, 0)
    C = np.where(b > a, C, np.inf)
    D = np.full(n + 1, np.inf)
    D[0] = 0
    for _ in range(k):
        D = np.min(D[:, None] + C, axis=0)
    return D[n]


def test_kmeans_recovers_known_optimum_of_separated_clusters():
    # 4 well-separated clusters with random positive weights: the optimal table is the weighted
    # mean of each cluster, whatever the weights
    g = torch.Generator().manual_seed(3)
    true = torch.tensor([-3.0, -1.0, 0.5, 2.5], dtype=torch.float64)
    x = (true.repeat_interleave(10) + 0.05 * torch.randn(40, generator=g, dtype=torch.float64)).unsqueeze(0)
    w = (torch.rand(1, 40, generator=g, dtype=torch.float64) ** 3 + 1e-3)
    ref = torch.stack([(x[0, i * 10:(i + 1) * 10] * w[0, i * 10:(i + 1) * 10]).sum() / w[0, i * 10:(i + 1) * 10].sum()
                       for i in range(4)])
    for bins in (0, 128):
        c = weighted_kmeans_1d(x.float(), w.float(), 4, dp_bins=bins)
        assert torch.allclose(c[0].double(), ref, atol=1e-5), (bins, c, ref)


def test_kmeans_reaches_exact_optimum_on_small_rows():
    # rows of <= 128 values: the DP start is exact, so the table minimises the weighted error
    g = torch.Generator().manual_seed(4)
    R, N, k = 20, 50, 4
    x = torch.randn(R, N, generator=g, dtype=torch.float64) * (1 + torch.rand(R, 1, generator=g, dtype=torch.float64))
    w = torch.rand(R, N, generator=g, dtype=torch.float64) ** 3
    c = weighted_kmeans_1d(x.float(), w.float(), k)
    err = weighted_sse(x.float(), w.float(), c).double()
    opt = torch.tensor([_dp_optimum(x[r].numpy(), w[r].numpy(), k) for r in range(R)])
    assert torch.all(err <= opt * (1 + 1e-4) + 1e-9), (err / opt)
    # plain Lloyd from quantiles does not always get there: the DP start is what makes it exact
    c0 = weighted_kmeans_1d(x.float(), w.float(), k, dp_bins=0)
    assert (weighted_sse(x.float(), w.float(), c0).double() > opt * 1.01).any()


def test_kmeans_single_center_is_weighted_mean_and_weights_matter():
    x = torch.tensor([[0.0, 1.0, 2.0, 10.0]])
    w = torch.tensor([[1.0, 1.0, 1.0, 7.0]])
    c = weighted_kmeans_1d(x, w, 1)
    assert c[0, 0].item() == pytest.approx((0 + 1 + 2 + 70) / 10, rel=1e-6)
    # two centers: unweighted splits {0,1,2} | {10}; heavy weight on 0 and 10 keeps that split
    # but zero weight on 10 moves both centers into [0, 2]
    c2 = weighted_kmeans_1d(x, torch.tensor([[1.0, 1.0, 1.0, 0.0]]), 2)
    assert float(c2.max()) <= 2.0


def test_banded_dp_matches_full_dp_on_gaussian_rows():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(32, 300, generator=g)
    w = torch.rand(32, 300, generator=g)
    full = kmeans_dp_1d(x, w, 16, bins=128, band=128)
    band = kmeans_dp_1d(x, w, 16, bins=128)
    assert torch.allclose(weighted_sse(x, w, band), weighted_sse(x, w, full), rtol=1e-4)


def test_learned_table_beats_fixed_tables_on_weighted_error():
    # on the same group scales, a per-row table learned for the weighted error does no worse than NF4
    torch.manual_seed(0)
    w = torch.randn(32, 256) ** 3  # heavy-tailed rows
    cw = torch.rand(256) ** 4 * 10
    stats = LayerStats(100, None, cw * 100, torch.ones(256))
    errs = {}
    for name, spec in [("any4", {"type": "lut", "bits": 4, "group_size": 64}),
                       ("nf4", {"type": "lut", "table": "nf4", "group_size": 64}),
                       ("int4", {"type": "int", "bits": 4, "group_size": 64, "sym": True})]:
        _, deq, _, _ = quantize_columns(w, format_from_spec(spec), stats)
        errs[name] = float(((deq - w) ** 2 * cw).sum())
    assert errs["any4"] < errs["nf4"] and errs["any4"] < errs["int4"], errs


# ---- GPTQ ------------------------------------------------------------------------------------------
def _correlated_stats(cols, n=2048, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, cols // 4, generator=g)
    x = base.repeat_interleave(4, 1) + 0.3 * torch.randn(n, cols, generator=g)
    x = x * (torch.rand(cols, generator=g) * 3 + 0.1)
    return LayerStats(n, x.t() @ x, (x ** 2).sum(0), x.abs().amax(0)), x


@pytest.mark.parametrize("spec", [{"type": "lut", "bits": 4, "group_size": 32},
                                  {"type": "lut", "bits": 3, "group_size": None},
                                  {"type": "lut", "table": "nf4", "group_size": 32}])
def test_gptq_rounds_to_the_table_and_beats_rtn(spec):
    torch.manual_seed(1)
    w = torch.randn(48, 128)
    stats, x = _correlated_stats(128)
    fmt = format_from_spec(spec)
    gptq = quantizer_from_spec({"type": "gptq", "act_order": True, "static_groups": True})
    res = gptq.quantize(w, fmt, stats)
    assert torch.equal(fmt.unpack(res.packed, tuple(w.shape)), res.weight)  # codes decode to GPTQ's weights
    rtn = quantizer_from_spec("rtn").quantize(w, fmt, stats)
    def out_err(q):
        return float(((x @ (w - q).t()) ** 2).sum())

    assert out_err(res.weight) < 0.9 * out_err(rtn.weight)
    # the same table in both (learned once per layer from the weights before any update)
    assert torch.equal(res.packed["lut"], rtn.packed["lut"])


def test_gptq_act_order_without_static_groups_is_refused():
    w = torch.randn(16, 64)
    stats, _ = _correlated_stats(64)
    fmt = format_from_spec({"type": "lut", "bits": 4, "group_size": 16})
    gptq = quantizer_from_spec({"type": "gptq", "act_order": True, "static_groups": False})
    with pytest.raises(RecipeError, match="static_groups"):
        gptq.quantize(w, fmt, stats)


# ---- checkpoints -------------------------------------------------------------------------------------
@pytest.mark.parametrize("recipe", [
    {"quantizer": "rtn", "format": {"type": "lut", "bits": 4, "group_size": 32}},
    {"quantizer": {"type": "gptq"}, "format": {"type": "lut", "bits": 3, "group_size": None}},
    {"quantizer": "rtn", "format": {"type": "lut", "table": "nf4", "group_size": 32}},
    {"quantizer": {"type": "gptq"}, "format": {"type": "lut", "table": "fp4", "group_size": 64}},
], ids=["any4-rtn", "any3-gptq", "nf4-rtn", "fp4-gptq"])
def test_checkpoint_round_trip(tmp_path, recipe):
    m = _tiny_llama()
    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    qm = quantkit.quantize(m, recipe, calibration=calib, progress=False, device="cpu")
    x = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = qm(x).logits
    qm.save(str(tmp_path / "ck"))
    lm = quantkit.load(str(tmp_path / "ck"))
    with torch.no_grad():
        y2 = lm(x).logits
    assert torch.equal(y, y2)
    layers = lm.quantized_layers()
    assert len(layers) == 14
    q = layers["model.layers.0.self_attn.q_proj"]
    assert q.spec["format"]["type"] == "lut" and q.spec["format"]["table"] == recipe["format"].get("table", "learned")
    K = 1 << q.fmt.cfg.bits
    assert tuple(q.packed["lut"].shape) == ((64, K) if q.fmt.learned else (1, K))
    saved = qm.quantized_layers()["model.layers.0.self_attn.q_proj"]
    assert torch.equal(q.dequantized_weight(), saved.dequantized_weight())


def test_bad_lut_shape_is_a_checkpoint_error():
    fmt = format_from_spec({"type": "lut", "bits": 4, "group_size": None, "weighting": "none"})
    w = torch.randn(8, 32)
    codes, _, layer, groups = quantize_columns(w, fmt, LayerStats())
    packed = fmt.pack(codes, layer, groups, None)
    bad = {**packed, "lut": packed["lut"][:1]}
    with pytest.raises(CheckpointError, match="lut"):
        fmt.unpack(bad, (8, 32))
    with pytest.raises(CheckpointError, match="scales"):
        fmt.unpack({**packed, "scales": torch.ones(8, 1, dtype=torch.float16)}, (8, 32))


def test_any4_gptq_is_deterministic_across_runs_and_threads():
    """Issue 19: any4's learned tables must not differ between two identical runs (the table comes from a
    dynamic-programming start and Lloyd steps: no random start), nor with the number of CPU threads."""
    ids = torch.randint(0, 256, (8, 64), generator=torch.Generator().manual_seed(0))
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            qm = quantkit.quantize(_tiny_llama(), "any4-gptq", calibration=ids, progress=False, device="cpu")
            runs.append({f"{name}.{k}": t.clone() for name, layer in qm.quantized_layers().items()
                         for k, t in layer.packed.items()})
    finally:
        torch.set_num_threads(threads)
    assert runs[0].keys() == runs[1].keys() and any(k.endswith("lut") or "table" in k for k in runs[0]), \
        sorted(runs[0])[:5]
    for r in runs[1:]:
        for k, t in runs[0].items():
            assert torch.equal(t.view(torch.uint8), r[k].view(torch.uint8)), k
