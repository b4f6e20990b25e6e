"""Fidelity of a quantized model to its float model on the same tokens.

* ``kl``: mean over scored positions of KL(P_float || P_quant) of the next-token distributions,
  in nats (float64 log-softmax of both models' logits);
* ``top1_agree``: fraction of positions where both models' arg-max next token is the same;
* ``generations``: greedy continuations of a few fixed prompts from both models, side by side.

Both models see identical windows of the held-out evaluation text (the first ``windows`` windows
of ``seq_len`` tokens, BOS in front when the model uses one), one window batch at a time, so no
logits are stored beyond a batch.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from tqdm.auto import tqdm

PROMPTS = (
    "The capital of France is",
    "Photosynthesis is the process by which",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
)


def _windows(ids: torch.Tensor, seq_len: int, windows: int, bos_token_id: int | None) -> torch.Tensor:
    body = seq_len - (1 if bos_token_id is not None else 0)
    n = min(windows, ids.numel() // body)
    if n == 0:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than one window of {body}")
    rows = ids[: n * body].view(n, body)
    if bos_token_id is not None:
        rows = torch.cat([torch.full((n, 1), bos_token_id, dtype=rows.dtype), rows], 1)
    return rows


@torch.no_grad()
def kl_divergence(ref_model, model, ids: torch.Tensor, *, seq_len: int = 512, windows: int = 16,
                  bos_token_id: int | None = None, batch_size: int = 2, device=None,
                  progress: bool = True) -> dict[str, Any]:
    """Mean KL(ref || model) and top-1 agreement over the first ``windows`` windows of ``ids``."""
    rows = _windows(ids, seq_len, windows, bos_token_id)
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    kl_sum, agree, n = 0.0, 0, 0
    kl_max = 0.0
    t0 = time.time()
    bar = tqdm(range(0, rows.shape[0], batch_size), desc="KL to float", unit="batch", disable=not progress)
    for b in bar:
        x = rows[b:b + batch_size].to(dev)
        lp = torch.log_softmax(ref_model(input_ids=x, use_cache=False).logits.double(), -1)
        lq = torch.log_softmax(model(input_ids=x, use_cache=False).logits.double(), -1)
        kl = (lp.exp() * (lp - lq)).sum(-1)  # [B, L]
        kl_sum += float(kl.sum())
        kl_max = max(kl_max, float(kl.max()))
        agree += int((lp.argmax(-1) == lq.argmax(-1)).sum())
        n += kl.numel()
        bar.set_postfix(kl=f"{kl_sum / n:.4f}")
    return {"kl": kl_sum / n, "kl_max": kl_max, "top1_agree": agree / n, "positions": n,
            "windows": int(rows.shape[0]), "seq_len": seq_len, "bos": bos_token_id is not None,
            "seconds": round(time.time() - t0, 2)}


@torch.no_grad()
def greedy(model, tokenizer, prompts=PROMPTS, max_new_tokens: int = 32, bos_token_id: int | None = None,
           device=None) -> list[str]:
    """Greedy continuations (the continuation text only) of each prompt."""
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    out = []
    for p in prompts:
        ids = tokenizer(p, add_special_tokens=False).input_ids
        if bos_token_id is not None:
            ids = [bos_token_id] + ids
        x = torch.tensor([ids], device=dev)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        y = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                           do_sample=False, pad_token_id=pad)
        out.append(tokenizer.decode(y[0, x.shape[1]:].tolist(), skip_special_tokens=True))
    return out
