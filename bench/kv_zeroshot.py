"""Zero-shot tasks scored with the quantized KV cache in the attention path (bench/quality_kv.py).

Each document's context is prefilled in chunks of ``chunk`` tokens through a fresh cache; the cache
is then repeated once per answer choice and all continuations are scored in one batched forward
that reads the context back from the (quantized) cache, as a server would after a prefill. The
tokenization and metrics are ``quantkit.eval``'s (lm-evaluation-harness conventions).

Note: tokens of the residual window (the last ``residual`` to ``residual + key_group_size − 1``
context tokens) stay in full precision, so a context shorter than ``residual + key_group_size`` is
never quantized. The result reports the mean context length and the share of context tokens that
were read back quantized.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from quantkit.eval import loglik
from quantkit.eval import tasks as T
from quantkit.kv import normalize_allocation
from quantkit.kv.cache import cache_kwarg
from quantkit.kv.evaluate import new_cache, resolve_model


@torch.no_grad()
def score_choices(model, ctx: list[int], conts: list[list[int]], allocation, chunk: int = 64, pad_id: int = 0
                  ) -> tuple[list[tuple[float, bool]], int]:
    """(log-likelihood, is_greedy) of each continuation after ``ctx``, through one cache; also the
    number of context tokens held quantized when the continuations read it."""
    dev = next(model.parameters()).device
    cache, name = new_cache(model, allocation), cache_kwarg(model)
    out = None
    for s in range(0, len(ctx), chunk):
        out = model(input_ids=torch.tensor([ctx[s:s + chunk]], device=dev), use_cache=True, **{name: cache})
    last = out.logits[0, -1].float()
    n_quant = 0
    for layer in cache.layers:
        if hasattr(layer, "quantized_length"):
            n_quant = max(n_quant, layer.quantized_length("key"), layer.quantized_length("value"))
    cache.batch_repeat_interleave(len(conts))
    L = max(len(c) for c in conts)
    inp = torch.full((len(conts), L), pad_id, dtype=torch.long)
    for i, c in enumerate(conts):
        inp[i, :len(c)] = torch.tensor(c)
    logits = model(input_ids=inp.to(dev), use_cache=True, **{name: cache}).logits.float()
    res = []
    for i, c in enumerate(conts):
        lg = torch.cat([last[None], logits[i, :len(c) - 1]], 0)
        lp = torch.log_softmax(lg.double(), -1)
        tgt = torch.tensor(c, device=dev)
        res.append((float(lp.gather(1, tgt[:, None]).sum()), bool((lg.argmax(-1) == tgt).all())))
    return res, n_quant


def zero_shot_with_kv(qm_or_model, tokenizer=None, spec=None, *, tasks=("lambada", "hellaswag"),
                      limit: int | None = 500, chunk: int = 64, max_length: int = 2048,
                      bos_token_id: int | None | str = "auto", progress: bool = False) -> dict[str, Any]:
    """Accuracy of zero-shot tasks (``quantkit.eval.tasks``) with the KV cache ``spec``."""
    model, tok, bos = resolve_model(qm_or_model, tokenizer, bos_token_id)
    alloc = None if spec is None or (isinstance(spec, str) and spec.lower() in ("float", "none")) \
        else normalize_allocation(spec)
    model.eval()
    pad = loglik._pad_id(tok)
    out: dict[str, Any] = {}
    for name in T.parse_tasks(list(tasks)):
        td = T.load_task(name, limit)
        t0 = time.time()
        scores, ctx_tokens, q_tokens, n_ctx = {}, 0, 0, 0
        for di, d in enumerate(td.docs):
            enc = [loglik._truncate(*loglik.encode_pair(tok, c, x, bos), max_length) for _, c, x in d["requests"]]
            # choices normally share the context tokens; group by context to be safe
            groups: dict[tuple[int, ...], list[int]] = {}
            for j, (cx, _) in enumerate(enc):
                groups.setdefault(tuple(cx), []).append(j)
            for cx, js in groups.items():
                got, nq = score_choices(model, list(cx), [enc[j][1] for j in js], alloc, chunk, pad)
                ctx_tokens += len(cx)
                n_ctx += 1
                q_tokens += nq
                for j, (lp, greedy) in zip(js, got):
                    idx = d["requests"][j][0]
                    scores[(d["doc_id"], idx)] = loglik.Scored(lp, greedy, len(enc[j][1]))
            if progress and (di + 1) % 100 == 0:
                print(f"  {name}: {di + 1}/{len(td.docs)}", flush=True)
        m = T.lambada_metrics(td.docs, scores) if td.spec.kind == "lambada" else T.mc_metrics(td.docs, scores)
        m.update({"task": name, "file_sha256": td.sha256, "limit": limit, "chunk": chunk,
                  "mean_context_tokens": ctx_tokens / max(n_ctx, 1),
                  "quantized_context_share": q_tokens / max(ctx_tokens, 1), "seconds": time.time() - t0})
        out[name] = m
    return out
