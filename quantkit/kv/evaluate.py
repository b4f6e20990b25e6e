"""Perplexity with the quantized KV cache really in the attention path.

Each window is fed through the model in chunks of ``chunk`` tokens with one cache per window:
chunk *i*'s attention reads the tokens of chunks ``< i`` back from the (quantized) cache, and its
own tokens in full precision, exactly as a chunked prefill / decode would. The float baseline goes
through the same chunked path with transformers' ``DynamicCache`` so every row of a table differs
only by the cache. Windows are the same as ``quantkit.evaluate``'s (disjoint windows of
``seq_len`` tokens of the evaluation split, BOS first when the model adds one).
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from ..errors import QuantkitError
from .cache import cache_kwarg, make_cache
from .spec import _kv_shape, average_bits, kv_bytes_per_token, normalize_allocation


def new_cache(model, allocation):
    from transformers.cache_utils import DynamicCache

    if allocation is None:
        return DynamicCache(config=model.config.get_text_config(decoder=True))
    return make_cache(model, allocation)


@torch.no_grad()
def chunked_logits(model, ids: torch.Tensor, allocation: dict[str, Any] | str | None, chunk: int = 64
                   ) -> torch.Tensor:
    """Logits [B, T, V] of ``ids`` [B, T] computed chunk by chunk through one cache."""
    dev = next(model.parameters()).device
    cache, name = new_cache(model, allocation), cache_kwarg(model)
    outs = []
    for s in range(0, ids.shape[1], chunk):
        outs.append(model(input_ids=ids[:, s:s + chunk].to(dev), use_cache=True, **{name: cache}).logits)
    return torch.cat(outs, dim=1)


@torch.no_grad()
def chunked_nll(model, ids: torch.Tensor, allocation, chunk: int = 64, fp_bytes: int = 2
                ) -> tuple[float, int, dict[str, int]]:
    """Summed next-token NLL over ``ids`` [B, T] (every token but the first is scored) with a
    chunked pass through one cache; also returns the cache's bytes after the last chunk."""
    dev = next(model.parameters()).device
    cache, name = new_cache(model, allocation), cache_kwarg(model)
    B, T = ids.shape
    nll, n = 0.0, 0
    for s in range(0, T, chunk):
        logits = model(input_ids=ids[:, s:s + chunk].to(dev), use_cache=True, **{name: cache}).logits.float()
        tgt = ids[:, s + 1:s + chunk + 1].to(dev)
        logits = logits[:, :tgt.shape[1]]
        if tgt.numel():
            nll += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                                                           reduction="sum"))
            n += tgt.numel()
    if hasattr(cache, "nbytes"):
        mem = cache.nbytes(fp_bytes)
    else:
        mem = {"codes": 0, "scales": 0, "zeros": 0,
               "residual": sum((L.keys.numel() + L.values.numel()) * fp_bytes for L in cache.layers
                               if getattr(L, "keys", None) is not None)}
        mem["total"] = mem["residual"]
    return nll, n, mem


def _windows(ids: torch.Tensor, seq_len: int, max_windows: int | None, bos: int | None) -> list[torch.Tensor]:
    body = seq_len - (1 if bos is not None else 0)
    out = []
    for s in range(0, ids.numel() - 1, body):
        seg = ids[s:s + body]
        if bos is not None:
            seg = torch.cat([torch.tensor([bos], dtype=seg.dtype), seg])
        out.append(seg)
        if max_windows is not None and len(out) >= max_windows:
            break
    return out


def resolve_model(qm_or_model, tokenizer, bos_token_id):
    model = getattr(qm_or_model, "model", qm_or_model)
    tok = tokenizer if tokenizer is not None else getattr(qm_or_model, "tokenizer", None)
    if tok is None:
        raise QuantkitError("evaluate_with_kv needs a tokenizer: pass tokenizer= or a QuantizedModel")
    if bos_token_id == "auto":
        if hasattr(qm_or_model, "bos_token_id") and hasattr(qm_or_model, "source"):
            bos_token_id = qm_or_model.bos_token_id
        else:
            bos_token_id = tok.bos_token_id if getattr(tok, "add_bos_token", False) else None
    return model, tok, bos_token_id


def evaluate_with_kv(qm_or_model, tokenizer=None, spec: str | dict | None = None, *, seq_len: int = 512,
                     max_windows: int | None = 40, chunk: int = 64, corpus: str = "enwiki", batch_size: int = 4,
                     device: str | None = None, bos_token_id: int | None | str = "auto", fp_bytes: int = 2,
                     progress: bool = True, split=None) -> dict[str, Any]:
    """Perplexity on the evaluation split with a quantized KV cache (``spec``: ``'k4v2'``, an
    allocation dict or JSON path, or ``None``/``'float'`` for the float cache), and KV bytes per token.

    ``kv_bytes_per_token`` is measured on the live cache after a full window of ``seq_len`` tokens
    (codes + scales + minima + the residual window, full-precision elements counted at ``fp_bytes``
    bytes); ``kv_bytes_per_token_long`` is the long-context limit (residual amortised away).
    ``split`` may pass an already tokenized ``quantkit.data.TokenSplit`` (tokenizing takes seconds)."""
    from ..eval.corpora import evaluation_split

    model, tok, bos = resolve_model(qm_or_model, tokenizer, bos_token_id)
    if chunk < 1 or seq_len < 2:
        raise QuantkitError(f"evaluate_with_kv: chunk={chunk} must be >= 1 and seq_len={seq_len} >= 2")
    alloc = None
    if spec is not None and not (isinstance(spec, str) and spec.strip().lower() in ("float", "none")):
        alloc = normalize_allocation(spec)
    if device is not None:
        model.to(device)
    model.eval()
    if split is None:
        split = evaluation_split(tok, corpus)
    wins = _windows(split.ids, seq_len, max_windows, bos)
    # batch windows of equal length (all but possibly the last)
    groups: list[list[torch.Tensor]] = []
    for w in wins:
        if groups and len(groups[-1]) < batch_size and groups[-1][0].numel() == w.numel():
            groups[-1].append(w)
        else:
            groups.append([w])
    t0 = time.time()
    nll, n, mem_full = 0.0, 0, None
    for gi, g in enumerate(groups):
        x = torch.stack(g)
        s, c, mem = chunked_nll(model, x, alloc, chunk, fp_bytes)
        nll, n = nll + s, n + c
        if x.shape[1] == seq_len and mem_full is None:
            mem_full = {k: v / (x.shape[0] * x.shape[1]) for k, v in mem.items()}
        if progress:
            print(f"  kv eval {gi + 1}/{len(groups)}: ppl {math.exp(nll / max(n, 1)):.3f}", flush=True)
    cfg = model.config
    n_layers, H, D = _kv_shape(cfg)
    float_bpt = n_layers * 2 * H * D * fp_bytes
    res = {
        "ppl": math.exp(nll / max(n, 1)), "nll": nll / max(n, 1), "tokens_scored": n, "windows": len(wins),
        "seq_len": seq_len, "chunk": chunk, "bos": bos is not None, "corpus": corpus,
        "split": "evaluation (odd-numbered articles)", "text_sha256": split.text_sha256,
        "kv": "float" if alloc is None else alloc.get("policy", "custom"),
        "allocation": alloc,
        "avg_bits": 16.0 if alloc is None else average_bits(alloc, n_layers),
        "kv_bytes_per_token": (mem_full or {}).get("total"),
        "kv_bytes_breakdown": mem_full,
        "kv_bytes_per_token_long": (float_bpt if alloc is None
                                    else kv_bytes_per_token(alloc, cfg, None, fp_bytes)["total"]),
        "float16_bytes_per_token": float_bpt,
        "fp_bytes": fp_bytes,
        "device": str(next(model.parameters()).device),
        "seconds": time.time() - t0,
    }
    return res
