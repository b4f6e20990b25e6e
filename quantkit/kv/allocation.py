"""Key/value bit allocation per layer under a budget in average bits per cached K/V element.

An *allocation* is a JSON-able dict, saved with the checkpoint config and used when a model is
loaded (``quantkit.kv.attach(model, allocation)`` or ``make_cache(model, allocation)``)::

    {"format": "quantkit-kv", "version": 1, "policy": "norm", "budget_bits": 3.0,
     "key_bits": 4, "value_bits": 2,            # defaults for layers not in "layers"
     "layers": [{"key_bits": 4, "value_bits": 2}, ...] or null,
     "key_group_size": 32, "value_group_size": 32, "residual": 32, "scale_dtype": "float16",
     "avg_bits": 3.0, "stats": {...}}

The budget counts code bits only (the usual convention); scales, minima and the residual window
are reported separately as bytes per token (``kv_bytes_per_token``).

Policies:

* ``norm`` — the norm rule behind "More for Keys, Less for Values" (Hariri et al., 2025): the
  quantization error of a matrix grows with its norm, ``e(b) ≈ ‖X‖² · 4^(−b)`` (b-bit RTN error
  ∝ range · 2^(−b)), so bits go where norms are large. Minimising ``Σ ‖X_i‖² 4^(−b_i)`` under the
  budget gives ``b_K − b_V ≈ log2(‖K‖ / ‖V‖)`` (reverse water-filling); keys, whose norms are
  usually much larger, get more bits. Norms (Frobenius or spectral) are measured per layer on
  calibration text. (Our derivation from the paper's argument; no code was copied.)
* ``sensitivity`` — measured: for every layer, side (K or V) and bit width, the error caused by
  quantizing only that matrix, either the relative attention-output error of that layer
  (``metric="attn"``, one forward pass) or the KL divergence of the next-token distribution with
  the real quantized cache in chunked prefill (``metric="kl"``, one pass per choice). The
  per-choice errors are assumed additive and the exact multiple-choice knapsack under the budget
  is solved by dynamic programming.
* ``adaptive`` — alias of ``sensitivity`` with ``metric="attn"`` (see docs/quality/kv.md for
  the measured comparison that picked it).
* ``uniform`` — the same ``key_bits``/``value_bits`` everywhere (a spec string such as ``k4v2``).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch

from ..errors import QuantkitError
from .spec import DEFAULTS, _kv_shape, average_bits, normalize_allocation

POLICIES = ("norm", "sensitivity", "adaptive", "uniform")

# ---- solver ----------------------------------------------------------------------------------
def solve_knapsack(errors: list[dict[int, float]], budget_total: int, weights: list[int] | None = None
                   ) -> list[int]:
    """Multiple-choice knapsack: pick one bit width per item minimising the summed error with
    ``Σ weight_i · bits_i <= budget_total``. Exact (dynamic programming over the integer cost)."""
    n = len(errors)
    w = weights or [1] * n
    INF = float("inf")
    dp = [0.0] + [INF] * budget_total  # dp[c]: best error with cost exactly c, over items so far
    choice: list[list[int | None]] = []
    for i in range(n):
        new = [INF] * (budget_total + 1)
        ch: list[int | None] = [None] * (budget_total + 1)
        for c, val in enumerate(dp):
            if val == INF:
                continue
            for b, e in errors[i].items():
                c2 = c + w[i] * b
                if c2 <= budget_total and val + e < new[c2]:
                    new[c2], ch[c2] = val + e, b
        dp = new
        choice.append(ch)
    best_c = min(range(budget_total + 1), key=lambda c: (dp[c], -c))
    if dp[best_c] == INF:
        mins = sum(w[i] * min(errors[i]) for i in range(n))
        raise QuantkitError(f"kv budget too small: the smallest allowed bit widths need {mins / sum(w):.3f} bits "
                            f"per element on average; raise budget_bits or lower min_bits")
    out = [0] * n
    c = best_c
    for i in range(n - 1, -1, -1):
        out[i] = choice[i][c]
        c -= w[i] * out[i]
    return out


def _budget_total(budget_bits: float, n_items: int) -> int:
    return int(math.floor(budget_bits * n_items + 1e-9))


def allocation_from_errors(errors_k: list[dict[int, float]], errors_v: list[dict[int, float]], budget_bits: float,
                           **fields) -> dict[str, Any]:
    """Solve the knapsack over 2·L items (keys and values of every layer, equal sizes)."""
    items = list(errors_k) + list(errors_v)
    bits = solve_knapsack(items, _budget_total(budget_bits, len(items)))
    L = len(errors_k)
    layers = [{"key_bits": bits[i], "value_bits": bits[L + i]} for i in range(L)]
    alloc = normalize_allocation({**DEFAULTS, **fields, "budget_bits": float(budget_bits), "layers": layers})
    alloc["avg_bits"] = average_bits(alloc)
    return alloc


def norm_errors(norms: list[float], choices: list[int]) -> list[dict[int, float]]:
    return [{b: float(n) ** 2 * 4.0 ** (-b) for b in choices} for n in norms]


def allocate_from_norms(key_norms: list[float], value_norms: list[float], budget_bits: float,
                        choices: list[int] | None = None, **fields) -> dict[str, Any]:
    """The norm rule: minimise Σ ‖X‖² 4^(−b) over keys and values of every layer under the budget."""
    ch = sorted(choices or range(2, 9))
    a = allocation_from_errors(norm_errors(key_norms, ch), norm_errors(value_norms, ch), budget_bits,
                               policy="norm", **fields)
    return a


def _monotone(e: dict[int, float]) -> dict[int, float]:
    """More bits never hurt: replace measured noise by the running minimum from low to high bits."""
    out, best = {}, float("inf")
    for b in sorted(e):
        best = min(best, e[b])
        out[b] = best
    return out


# ---- measurement -------------------------------------------------------------------------------
_PROBE_NAME = "quantkit_kv_probe"
_ACTIVE: list = []


def _register_probe() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if _PROBE_NAME in ALL_ATTENTION_FUNCTIONS:
        return
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def probe(module, query, key, value, attention_mask, **kwargs):
        out = sdpa(module, query, key, value, attention_mask, **kwargs)
        if _ACTIVE:
            _ACTIVE[-1].observe(module, query, key, value, attention_mask, out[0], sdpa, kwargs)
        return out

    AttentionInterface.register(_PROBE_NAME, probe)
    type(ALL_MASK_ATTENTION_FUNCTIONS).register(_PROBE_NAME, sdpa_mask)


@contextlib.contextmanager
def _probing(model, probe):
    _register_probe()
    cfgs = [m.config for m in model.modules() if hasattr(m, "config") and hasattr(m.config, "_attn_implementation")]
    cfgs = list({id(c): c for c in cfgs}.values())
    old = [c._attn_implementation for c in cfgs]
    _ACTIVE.append(probe)
    try:
        for c in cfgs:
            c._attn_implementation = _PROBE_NAME
        yield probe
    finally:
        _ACTIVE.pop()
        for c, o in zip(cfgs, old):
            c._attn_implementation = o


class _Probe:
    """Collects per-layer K/V norms and attention-output errors of fake-quantized K or V."""

    def __init__(self, choices, key_group_size, value_group_size, residual, scale_dtype, errors: bool,
                 spectral: bool):
        self.choices, self.G, self.g, self.R = list(choices), key_group_size, value_group_size, residual
        self.scale_dtype, self.errors, self.spectral = scale_dtype, errors, spectral
        self.fro: dict[tuple[int, str], list[float]] = {}
        self.spec: dict[tuple[int, str], list[float]] = {}
        self.err: dict[tuple[int, str, int], float] = {}
        self.ref: dict[int, float] = {}

    @torch.no_grad()
    def observe(self, module, q, k, v, mask, out, sdpa, kwargs):
        from .quant import fake_quantize_keys, fake_quantize_values

        li = int(module.layer_idx)
        for side, x in (("key", k), ("value", v)):
            xf = x.float()
            self.fro.setdefault((li, side), []).extend(xf.flatten(1).norm(dim=1).tolist())
            if self.spectral:
                self.spec.setdefault((li, side), []).extend(
                    torch.linalg.matrix_norm(xf, ord=2).mean(dim=1).tolist())
        if not self.errors:
            return
        T = k.shape[-2]
        n_q = max(T - self.R, 0) // self.G * self.G
        if n_q == 0:
            return
        ref = out.float()
        self.ref[li] = self.ref.get(li, 0.0) + float(ref.pow(2).sum())
        for b in self.choices:
            for side in ("key", "value"):
                if b >= 16:
                    self.err[(li, side, b)] = 0.0
                    continue
                if side == "key":
                    kq = torch.cat([fake_quantize_keys(k[..., :n_q, :], b, self.G, self.scale_dtype),
                                    k[..., n_q:, :]], dim=-2)
                    o = sdpa(module, q, kq, v, mask, **kwargs)[0]
                else:
                    vq = torch.cat([fake_quantize_values(v[..., :n_q, :], b, min(self.g, v.shape[-1]),
                                                         self.scale_dtype),
                                    v[..., n_q:, :]], dim=-2)
                    o = sdpa(module, q, k, vq, mask, **kwargs)[0]
                self.err[(li, side, b)] = self.err.get((li, side, b), 0.0) + float((o.float() - ref).pow(2).sum())


def _calibration(model_or_qm, tokenizer, calibration, samples, seq_len, seed):
    from ..data import calibration_batch

    if isinstance(calibration, torch.Tensor):
        if calibration.dim() != 2:
            raise QuantkitError(f"kv calibration must be token ids [N, L], got shape {tuple(calibration.shape)}")
        return calibration.long()
    tok = tokenizer if tokenizer is not None else getattr(model_or_qm, "tokenizer", None)
    if tok is None:
        raise QuantkitError("kv allocation needs calibration text: pass tokenizer= (or a QuantizedModel) or "
                            "calibration= as a [N, L] tensor of token ids")
    bos = getattr(model_or_qm, "bos_token_id", None) if hasattr(model_or_qm, "tokenizer") else None
    return calibration_batch(tok, samples, seq_len, seed, "enwiki", bos)


def _unwrap(model_or_qm):
    return getattr(model_or_qm, "model", model_or_qm) if not isinstance(model_or_qm, torch.nn.Module) else model_or_qm


@torch.no_grad()
def measure(model, ids: torch.Tensor, *, choices=(2, 3, 4, 6, 8), key_group_size=32, value_group_size=32,
            residual=32, scale_dtype="float16", errors=True, spectral=True, batch_size=4) -> dict[str, Any]:
    """One pass over the calibration ids through the attention probe: per layer Frobenius and
    spectral norms of K and V (mean over sequences; spectral = mean over KV heads of the top singular
    value of the [T, head_dim] matrix) and, with ``errors``, the relative attention-output error of
    quantizing K (or V) alone at each bit width."""
    from .quant import SCALE_DTYPES

    probe = _Probe(choices, key_group_size, value_group_size, residual, SCALE_DTYPES[scale_dtype], errors, spectral)
    dev = next(model.parameters()).device
    with _probing(model, probe):
        for i in range(0, ids.shape[0], batch_size):
            model(input_ids=ids[i:i + batch_size].to(dev), use_cache=False)
    layers = sorted({li for li, _ in probe.fro})
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    res: dict[str, Any] = {
        "key_fro": [mean(probe.fro[(li, "key")]) for li in layers],
        "value_fro": [mean(probe.fro[(li, "value")]) for li in layers],
    }
    if spectral:
        res["key_spectral"] = [mean(probe.spec[(li, "key")]) for li in layers]
        res["value_spectral"] = [mean(probe.spec[(li, "value")]) for li in layers]
    if errors:
        if not probe.ref:
            raise QuantkitError(f"kv calibration sequences of {ids.shape[1]} tokens are too short to quantize "
                                f"anything (residual {residual} + key group {key_group_size}); use longer ones")
        for side in ("key", "value"):
            res[f"{side}_attn_err"] = [{b: probe.err[(li, side, b)] / max(probe.ref[li], 1e-30) for b in choices}
                                       for li in layers]
    return res


@torch.no_grad()
def measure_kl(model, ids: torch.Tensor, *, choices=(2, 3, 4), chunk=64, key_group_size=32, value_group_size=32,
               residual=32, scale_dtype="float16", progress=False) -> dict[str, Any]:
    """End-to-end sensitivity with the real quantized cache: for each layer, side and bit width,
    the mean KL(float || quantized) of the next-token distribution when only that matrix is
    quantized (chunked prefill, so later chunks read earlier ones from the cache). Costs
    2 · layers · len(choices) chunked passes over ``ids``."""
    from .evaluate import chunked_logits

    n_layers, _, _ = _kv_shape(model.config)
    base = {"key_group_size": key_group_size, "value_group_size": value_group_size, "residual": residual,
            "scale_dtype": scale_dtype}
    kl = {(li, s, b): 0.0 for li in range(n_layers) for s in ("key", "value") for b in choices}
    ntok = 0
    for w in range(ids.shape[0]):
        x = ids[w:w + 1]
        ref = torch.log_softmax(chunked_logits(model, x, None, chunk).float(), -1)
        ntok += ref.shape[1]
        for li in range(n_layers):
            for side in ("key", "value"):
                for b in choices:
                    layers = [{"key_bits": 16, "value_bits": 16} for _ in range(n_layers)]
                    layers[li][f"{side}_bits"] = b
                    lp = torch.log_softmax(chunked_logits(model, x, {**base, "layers": layers}, chunk).float(), -1)
                    kl[(li, side, b)] += float((ref.exp() * (ref - lp)).sum())
        if progress:
            print(f"  kl sensitivity: window {w + 1}/{ids.shape[0]}", flush=True)
    return {f"{side}_kl": [{b: kl[(li, side, b)] / ntok for b in choices} for li in range(n_layers)]
            for side in ("key", "value")}


def allocate(model_or_qm, budget_bits: float, policy: str = "adaptive", *, tokenizer=None, calibration=None,
             samples: int = 8, seq_len: int = 512, seed: int = 0, choices=None, min_bits: int = 2,
             max_bits: int = 8, key_group_size: int = DEFAULTS["key_group_size"],
             value_group_size: int = DEFAULTS["value_group_size"], residual: int = DEFAULTS["residual"],
             scale_dtype: str = "float16", norm: str = "frobenius", metric: str = "attn", chunk: int = 64,
             stats: dict[str, Any] | None = None, progress: bool = False) -> dict[str, Any]:
    """Choose key and value bits per layer with mean code bits <= ``budget_bits``. Returns the
    allocation dict (JSON-able). ``stats`` may pass a previous :func:`measure` result to skip
    the calibration pass."""
    if policy not in POLICIES:
        raise QuantkitError(f"kv policy {policy!r} unknown; use one of {', '.join(POLICIES)}")
    if norm not in ("frobenius", "spectral"):
        raise QuantkitError(f"kv norm {norm!r} unknown; use frobenius or spectral")
    if metric not in ("attn", "kl"):
        raise QuantkitError(f"kv metric {metric!r} unknown; use attn (attention-output error) or kl")
    if not 1 <= min_bits <= max_bits <= 8:
        raise QuantkitError(f"kv min_bits={min_bits}, max_bits={max_bits}: need 1 <= min_bits <= max_bits <= 8")
    if not min_bits <= budget_bits:
        raise QuantkitError(f"kv budget_bits={budget_bits} is below min_bits={min_bits}")
    model = _unwrap(model_or_qm)
    ch = sorted({int(b) for b in (choices or range(min_bits, max_bits + 1)) if min_bits <= int(b) <= max_bits})
    fields = {"key_group_size": key_group_size, "value_group_size": value_group_size, "residual": residual,
              "scale_dtype": scale_dtype}
    if policy == "uniform":
        b = int(budget_bits)
        if b != budget_bits:
            raise QuantkitError(f"kv policy uniform needs a whole budget_bits, got {budget_bits}; use norm or "
                                f"adaptive for fractional budgets")
        return normalize_allocation({**fields, "policy": "uniform", "budget_bits": float(budget_bits),
                                     "key_bits": b, "value_bits": b, "layers": None, "avg_bits": float(b)})
    was_training = model.training
    model.eval()
    try:
        if policy == "norm":
            if stats is None:
                ids = _calibration(model_or_qm, tokenizer, calibration, samples, seq_len, seed)
                stats = measure(model, ids, errors=False, spectral=(norm == "spectral"), **fields)
            kn, vn = stats[f"key_{'fro' if norm == 'frobenius' else 'spectral'}"], \
                stats[f"value_{'fro' if norm == 'frobenius' else 'spectral'}"]
            alloc = allocate_from_norms(kn, vn, budget_bits, ch, **fields)
            alloc["stats"] = {"norm": norm, "key_norm": [round(x, 4) for x in kn],
                              "value_norm": [round(x, 4) for x in vn]}
            return alloc
        # sensitivity / adaptive
        if metric == "attn":
            if stats is None or "key_attn_err" not in stats:
                ids = _calibration(model_or_qm, tokenizer, calibration, samples, seq_len, seed)
                stats = measure(model, ids, choices=ch, spectral=False, **fields)
            ek, ev = stats["key_attn_err"], stats["value_attn_err"]
        else:
            if stats is None or "key_kl" not in stats:
                ids = _calibration(model_or_qm, tokenizer, calibration, samples, seq_len, seed)
                stats = measure_kl(model, ids, choices=ch, chunk=chunk, progress=progress, **fields)
            ek, ev = stats["key_kl"], stats["value_kl"]
        ek = [_monotone({int(b): float(e) for b, e in d.items() if int(b) in ch}) for d in ek]
        ev = [_monotone({int(b): float(e) for b, e in d.items() if int(b) in ch}) for d in ev]
        alloc = allocation_from_errors(ek, ev, budget_bits, policy=policy, **fields)
        alloc["metric"] = metric
        alloc["stats"] = {"metric": metric,
                          "key_err": [{str(b): float(f"{e:.4g}") for b, e in d.items()} for d in ek],
                          "value_err": [{str(b): float(f"{e:.4g}") for b, e in d.items()} for d in ev]}
        return alloc
    finally:
        model.train(was_training)
