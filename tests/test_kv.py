"""Quantized KV cache: quantizer bounds, cache semantics, allocation, evaluation path (tiny models only)."""

from __future__ import annotations

import itertools
import json
import random

import pytest
import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from quantkit.errors import QuantkitError, RecipeError
from quantkit.formats.packing import unpack_codes
from quantkit.kv import (
    KVConfig,
    allocate,
    allocate_from_norms,
    attach,
    average_bits,
    detach,
    kv_bytes_per_token,
    make_cache,
    measure,
    normalize_allocation,
    parse_spec,
    solve_knapsack,
)
from quantkit.kv.cache import QuantKVLayer, cache_kwarg
from quantkit.kv.evaluate import chunked_logits, chunked_nll
from quantkit.kv.quant import (
    dequantize_keys,
    dequantize_values,
    fake_quantize_keys,
    fake_quantize_values,
    quantize_keys,
    quantize_values,
)

from conftest import tiny_model


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from threads, and on shared, oversubscribed cores two spinning
    threads made these tests ~20x slower; restore the setting afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _kv(seed=0, B=2, H=3, T=64, D=32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, H, T, D, generator=g) * torch.rand(1, 1, 1, D, generator=g).mul(4).add(0.1)
    x[0, 0, 5, 3] = 40.0  # an outlier
    x[1, 2, :, 7] += 10.0  # a shifted channel (what per-channel key quantization is for)
    return x


# ---- quantizer ------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", range(1, 9))
def test_key_value_error_bound_and_codes_match_float64_reference(bits):
    x = _kv(bits)
    B, H, T, D = x.shape
    qmax = (1 << bits) - 1
    # keys: per channel, groups of 16 tokens
    G = 16
    codes, s, m = quantize_keys(x, bits, G)
    assert codes.dtype == torch.uint8 and codes.shape[-1] == (D * bits + 7) // 8
    deq = dequantize_keys(codes, s, m, bits, G, D).double()
    s64 = s.double().repeat_interleave(G, dim=2)
    m64 = m.double().repeat_interleave(G, dim=2)
    x64 = x.double()
    assert torch.all((x64 - deq).abs() <= s64 / 2 + 1e-5 * x64.abs().clamp_min(1))
    # plain float64 RTN with the stored scale/min gives the same codes (up to exact .5 ties)
    ref_q = torch.round((x64 - m64) / s64).clamp(0, qmax)
    got_q = unpack_codes(codes.reshape(-1, codes.shape[-1]), bits, D).view(B, H, T, D).double()
    assert (ref_q != got_q).double().mean() < 1e-3
    # the stored scale is the tight one: (max - min) / qmax rounded up to float16 (not inflated)
    # (the min is rounded down to float16 first, the scale up, each by at most one float16 step)
    xg = x64.view(B, H, T // G, G, D)
    assert torch.all(m.double() <= xg.amin(3))
    assert torch.all(xg.amin(3) - m.double() <= xg.amin(3).abs() * 2 ** -10 + 1e-7)
    tight = (xg.amax(3) - m.double()) / qmax
    assert torch.all(s.double() <= tight * (1 + 2 ** -9) + 1e-7)
    # values: per token, groups of 8 channels
    g = 8
    codes, s, m = quantize_values(x, bits, g)
    deq = dequantize_values(codes, s, m, bits, g, D).double()
    s64 = s.double().repeat_interleave(g, dim=3)
    assert torch.all((x64 - deq).abs() <= s64 / 2 + 1e-5 * x64.abs().clamp_min(1))
    xg = x64.view(B, H, T, D // g, g)
    assert torch.all(s.double() <= (xg.amax(4) - m.double()) / qmax * (1 + 2 ** -9) + 1e-7)


def test_constant_groups_are_exact():
    x = torch.full((1, 1, 32, 8), 0.3)
    assert torch.allclose(fake_quantize_keys(x, 2, 32), x, atol=1e-3)
    assert torch.allclose(fake_quantize_values(x, 2, 8), x, atol=1e-3)


# ---- cache ---------------------------------------------------------------------------------
class _RefLayer(DynamicLayer):
    """Reference: keeps every token in float; a token that has left the residual window is replaced,
    group by group, by its quantize->dequantize value. Own bookkeeping, no packing, no store."""

    def __init__(self, kb, vb, G, g, R):
        super().__init__()
        self.kb, self.vb, self.G, self.g, self.R = kb, vb, G, g, R
        self.n_q = 0

    def update(self, k, v, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(k, v)
        out_k, out_v = torch.cat([self.keys, k], -2), torch.cat([self.values, v], -2)
        self.keys, self.values = out_k.clone(), out_v.clone()
        T = self.keys.shape[-2]
        while T - self.n_q - self.R >= self.G:  # one group at a time
            a, b = self.n_q, self.n_q + self.G
            self.keys[..., a:b, :] = fake_quantize_keys(self.keys[..., a:b, :], self.kb, self.G)
            self.values[..., a:b, :] = fake_quantize_values(self.values[..., a:b, :], self.vb, self.g)
            self.n_q = b
        return out_k, out_v


def _ref_cache(n_layers, kb, vb, G, g, R):
    return Cache(layers=[_RefLayer(kb, vb, G, g, R) for _ in range(n_layers)])


def test_generation_equals_cache_of_dequantized_values():
    m = tiny_model("llama")
    name = cache_kwarg(m)
    ids = torch.randint(0, 256, (2, 21), generator=torch.Generator().manual_seed(3))
    kw = dict(max_new_tokens=24, do_sample=False, output_scores=True, return_dict_in_generate=True)
    spec = {"key_bits": 3, "value_bits": 2, "key_group_size": 8, "value_group_size": 8, "residual": 8,
            "layers": None}
    q = m.generate(ids, **{name: make_cache(m, spec)}, **kw)
    r = m.generate(ids, **{name: _ref_cache(2, 3, 2, 8, 8, 8)}, **kw)
    f = m.generate(ids, **{name: DynamicCache()}, **kw)
    assert torch.equal(q.sequences, r.sequences)
    dq = max((a - b).abs().max().item() for a, b in zip(q.scores, r.scores))
    df = max((a - b).abs().max().item() for a, b in zip(q.scores, f.scores))
    assert dq < 1e-5, dq
    assert df > 1e3 * max(dq, 1e-9)  # quantization really happened and changed the logits
    # attach(): generate without a cache argument uses the quantized cache
    attach(m, spec)
    a = m.generate(ids, **kw)
    detach(m)
    assert torch.equal(a.sequences, q.sequences)
    assert max((x - y).abs().max().item() for x, y in zip(a.scores, q.scores)) < 1e-6
    assert "generate" not in m.__dict__


def test_chunked_prefill_reads_quantized_tokens_and_store_layout():
    m = tiny_model("llama")
    ids = torch.randint(0, 256, (1, 70), generator=torch.Generator().manual_seed(4))
    spec = "k2v2-r8-gk16-gv8"
    lq = chunked_logits(m, ids, spec, 10)
    # reference: chunk by chunk through the reference cache
    name = cache_kwarg(m)
    ref = _ref_cache(2, 2, 2, 16, 8, 8)
    lr = torch.cat([m(input_ids=ids[:, s:s + 10], use_cache=True, **{name: ref}).logits for s in range(0, 70, 10)], 1)
    assert (lq - lr).abs().max() < 1e-5
    c = make_cache(m, spec)
    m(input_ids=ids, use_cache=True, **{name: c})
    L = c.layers[0]
    assert isinstance(L, QuantKVLayer) and L.get_seq_length() == 70
    # 70 tokens, R=8, G=16: 48 quantized (3 groups), 22 in the residual window (in [R, R+G))
    assert L.quantized_length("key") == 48 and L.keys.shape[-2] == 22
    # first chunk of a fresh cache: nothing read back, identical to float
    assert torch.allclose(lq[:, :10], m(input_ids=ids[:, :10]).logits, atol=1e-5)


def test_8bit_cache_close_to_float_cache_and_2bit_is_not():
    m = tiny_model("llama")
    ids = torch.randint(0, 256, (2, 96), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = m.double()(input_ids=ids).logits  # float64 reference, one full forward
    m.float()
    f = chunked_logits(m, ids, None, 16).double()
    k8 = chunked_logits(m, ids, "k8v8-r0-gk16", 16).double()
    k2 = chunked_logits(m, ids, "k2v2-r0-gk16", 16).double()
    scale = full.abs().max()
    assert (f - full).abs().max() / scale < 1e-5
    e8 = ((k8 - full).abs().max() / scale).item()
    e2 = ((k2 - full).abs().max() / scale).item()
    assert e8 < 2e-3, e8
    assert e2 > 10 * e8


def test_float_chunked_nll_equals_full_forward():
    m = tiny_model("llama")
    ids = torch.randint(0, 256, (2, 50), generator=torch.Generator().manual_seed(6))
    nll, n, _ = chunked_nll(m, ids, None, 7)
    with torch.no_grad():
        lg = m(input_ids=ids).logits[:, :-1]
    ref = torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]).double(), ids[:, 1:].reshape(-1),
                                            reduction="sum").item()
    assert n == 2 * 49 and abs(nll - ref) < 1e-3 * abs(ref)


@pytest.mark.parametrize("T", [5, 40, 41, 63, 64, 100])
def test_bytes_per_token_formula_matches_live_cache(T):
    m = tiny_model("llama")
    spec = normalize_allocation({"layers": [{"key_bits": 3, "value_bits": 2}, {"key_bits": 16, "value_bits": 5}],
                                 "key_group_size": 16, "value_group_size": 8, "residual": 24})
    c = make_cache(m, spec)
    m(input_ids=torch.randint(0, 256, (1, T)), use_cache=True, **{cache_kwarg(m): c})
    live = c.nbytes(fp_bytes=2)
    est = kv_bytes_per_token(spec, m.config, context=T, fp_bytes=2)
    for k in ("codes", "scales", "zeros", "residual", "total"):
        assert abs(live[k] / T - est[k]) < 1e-9, (k, live[k] / T, est[k])


def test_sliding_window_layers_stay_float():
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.Gemma3TextConfig(vocab_size=256, hidden_size=64, intermediate_size=160, num_attention_heads=4,
                              num_key_value_heads=1, head_dim=16, max_position_embeddings=256, sliding_window=16,
                              num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"])
    m = tf.AutoModelForCausalLM.from_config(cfg).eval()
    c = make_cache(m, "k4v4-r4-gk4")
    assert any(isinstance(L, QuantKVLayer) for L in c.layers)
    assert any(not isinstance(L, QuantKVLayer) for L in c.layers)
    ids = torch.randint(0, 256, (1, 40))
    lg = chunked_logits(m, ids, "k8v8-r4-gk4", 8)
    with torch.no_grad():
        ref = m(input_ids=ids).logits
    assert (lg - ref).abs().max() / ref.abs().max() < 1e-2


# ---- allocation -----------------------------------------------------------------------------
def test_knapsack_is_optimal_and_within_budget():
    rnd = random.Random(0)
    for _ in range(30):
        n = rnd.randint(1, 5)
        choices = sorted(rnd.sample(range(1, 9), rnd.randint(1, 4)))
        errs = [{b: rnd.random() * 4.0 ** (-b) * rnd.choice([1, 10, 100]) for b in choices} for _ in range(n)]
        budget = rnd.randint(min(choices) * n, max(choices) * n)
        got = solve_knapsack(errs, budget)
        assert sum(got) <= budget
        best = min((sum(e[b] for e, b in zip(errs, combo)), combo)
                   for combo in itertools.product(choices, repeat=n) if sum(combo) <= budget)
        assert abs(sum(e[b] for e, b in zip(errs, got)) - best[0]) < 1e-12


@pytest.mark.parametrize("budget,lo", [(2.0, 1), (2.5, 2), (3.0, 2), (3.3, 2), (4.0, 2), (5.75, 2)])
def test_norm_allocation_never_exceeds_budget_and_prefers_keys(budget, lo):
    g = torch.Generator().manual_seed(int(budget * 10))
    kn = (torch.rand(12, generator=g) * 20 + 20).tolist()  # keys: norms 20..40
    vn = (torch.rand(12, generator=g) * 4 + 2).tolist()    # values: norms 2..6
    a = allocate_from_norms(kn, vn, budget, list(range(lo, 9)))
    assert average_bits(a) <= budget + 1e-12
    assert average_bits(a) > budget - 1 / 24 - 1e-12  # the budget is used (to one bit of slack)
    for L in a["layers"]:
        assert L["key_bits"] >= L["value_bits"]
    assert sum(L["key_bits"] for L in a["layers"]) > sum(L["value_bits"] for L in a["layers"])
    # and the other way round when values are the larger ones
    b = allocate_from_norms(vn, kn, budget, list(range(lo, 9)))
    assert all(L["value_bits"] >= L["key_bits"] for L in b["layers"])
    json.dumps(a)  # JSON-able


def test_measured_norms_follow_a_scaled_k_proj():
    m = tiny_model("llama")
    with torch.no_grad():
        for layer in m.model.layers:
            layer.self_attn.k_proj.weight.mul_(8.0)
    ids = torch.randint(0, 256, (2, 96), generator=torch.Generator().manual_seed(7))
    st = measure(m, ids, choices=(2, 4), key_group_size=16, residual=16)
    assert all(k > 3 * v for k, v in zip(st["key_fro"], st["value_fro"]))
    a = allocate(m, 3, "norm", calibration=ids, key_group_size=16, residual=16)
    assert average_bits(a) <= 3 and all(L["key_bits"] > L["value_bits"] for L in a["layers"])
    s = allocate(m, 2.5, "adaptive", calibration=ids, key_group_size=16, residual=16, choices=[2, 3, 4])
    assert average_bits(s) <= 2.5 and s["policy"] == "adaptive"
    c = make_cache(m, s)  # the allocation drives a working cache
    assert [(L.key_bits, L.value_bits) for L in c.layers] == [(x["key_bits"], x["value_bits"]) for x in s["layers"]]
    # the attention-output error shrinks with bits
    for d in st["key_attn_err"] + st["value_attn_err"]:
        assert d[2] > d[4] >= 0


# ---- specs and recipe section ------------------------------------------------------------------
def test_spec_parsing_and_errors(tmp_path):
    a = parse_spec("K4V2-r64-gk16-gv64")
    assert (a["key_bits"], a["value_bits"], a["residual"], a["key_group_size"], a["value_group_size"]) == \
        (4, 2, 64, 16, 64)
    assert parse_spec("float")["key_bits"] == 16
    with pytest.raises(QuantkitError, match="k<key bits>v<value bits>"):
        parse_spec("4bit")
    with pytest.raises(QuantkitError, match="key_bits"):
        normalize_allocation({"key_bits": 9, "value_bits": 2})
    p = tmp_path / "a.json"
    p.write_text(json.dumps(allocate_from_norms([3.0, 3.0], [1.0, 1.0], 3)))
    assert normalize_allocation(str(p))["layers"][0]["key_bits"] == 4
    m = tiny_model("llama")
    with pytest.raises(QuantkitError, match="3 layers but the model has 2"):
        make_cache(m, {"layers": [{"key_bits": 4, "value_bits": 4}] * 3})


def test_kvconfig_validates_recipe_section():
    c = KVConfig.from_recipe({"budget_bits": 3, "policy": "adaptive"}, "r.yaml")
    assert c.budget_bits == 3 and c.residual == 32
    assert KVConfig.from_recipe("k4v2", "r.yaml").bits == "k4v2"
    for bad, key in [({"budget_bits": "x"}, "kv_cache.budget_bits"), ({"budget_bits": 3, "polcy": "norm"},
                     "kv_cache.polcy"), ({"budget_bits": 3, "policy": "best"}, "kv_cache.policy"),
                     ({"bits": "k9"}, "kv_cache.bits"), ({}, "budget_bits"), ({"budget_bits": 3, "residual": -1},
                                                                               "kv_cache.residual")]:
        with pytest.raises(RecipeError, match=key.replace(".", r"\.")) as e:
            KVConfig.from_recipe(bad, "r.yaml")
        assert "r.yaml" in str(e.value)
    m = tiny_model("llama")
    a = KVConfig.from_recipe({"bits": "k4v2", "residual": 16}, "r.yaml").build(m)
    assert (a["key_bits"], a["value_bits"], a["residual"]) == (4, 2, 16)


def test_zero_shot_scoring_through_the_cache_matches_plain_forward():
    from _guards import load_bench

    from quantkit.eval.loglik import direct_logprob

    score_choices = load_bench("kv_zeroshot", "kv_zeroshot").score_choices

    m = tiny_model("llama")
    g = torch.Generator().manual_seed(8)
    ctx = torch.randint(0, 256, (75,), generator=g).tolist()
    conts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (1, 3, 5)]
    got, nq = score_choices(m, ctx, conts, None, 16)
    assert nq == 0
    for (lp, _), c in zip(got, conts):
        assert abs(lp - direct_logprob(m, ctx, c)) < 1e-4
    got8, nq = score_choices(m, ctx, conts, "k8v8-r8-gk16", 16)
    assert nq == 64  # 75 context tokens, R=8, G=16: 4 groups read back quantized
    for (lp, _), c in zip(got8, conts):
        assert abs(lp - direct_logprob(m, ctx, c)) < 1e-2


def test_builtin_kv_recipes_validate():
    from quantkit.recipe import builtin_recipes, load_recipe

    names = [n for n in builtin_recipes() if n.startswith("kv-")]
    assert len(names) >= 3
    for n in names:
        r = load_recipe(n)
        assert KVConfig.from_recipe(r.kv_cache, r.source) is not None
