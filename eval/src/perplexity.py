"""Token-level perplexity over fixed windows of a held-out token stream.

Windows of ``seq_len`` tokens advance by ``stride`` (default ``seq_len``: disjoint windows). With
``bos_token_id`` every window starts with BOS followed by ``seq_len - 1`` text tokens and all of
them are scored; without it the first token of a window only conditions. With ``stride <
seq_len`` only the tokens not scored by an earlier window are scored (sliding-window perplexity).

With ``tokenizer`` the result also holds word-level figures of the text the windows cover (the
span from the first window's first token to the last window's last token, decoded):
``word_ppl = exp(NLL / words)`` and ``bits_per_byte = NLL / (bytes * ln 2)``, where words are
whitespace-separated (lm-evaluation-harness's ``word_perplexity`` rule) and NLL is the span's total
negative log-likelihood: the scored tokens' sum, scaled by covered/scored tokens when some covered
tokens only condition (the first token of each window without BOS: 1 in ``seq_len``).
"""

from __future__ import annotations

import math
import time

import torch
from tqdm.auto import tqdm


def _windows(n: int, body: int, stride: int, max_windows: int | None):
    out, prev_end, start = [], 0, 0
    while start < n - 1 and (max_windows is None or len(out) < max_windows):
        end = min(start + body, n)
        out.append((start, end, prev_end))
        prev_end = end
        if end == n:
            break
        start += stride
    return out


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, *, seq_len: int = 512, stride: int | None = None,
               max_windows: int | None = None, bos_token_id: int | None = None, batch_size: int = 4,
               device: str | torch.device | None = None, progress: bool = True, tokenizer=None) -> dict:
    """Perplexity of ``model`` on the 1-D token stream ``ids``. Returns ppl, nll and counts."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    stride = stride or seq_len
    body = seq_len - (1 if bos_token_id is not None else 0)
    if stride > body:
        stride = body
    wins = _windows(ids.numel(), body, stride, max_windows)
    nll_sum, n_scored = 0.0, 0
    t0 = time.time()
    bar = tqdm(range(0, len(wins), batch_size), desc="perplexity", unit="batch", disable=not progress)
    for b in bar:
        group = wins[b:b + batch_size]
        L = max(e - s for s, e, _ in group) + (1 if bos_token_id is not None else 0)
        inp = torch.zeros(len(group), L, dtype=torch.long)
        labels = torch.full((len(group), L), -100, dtype=torch.long)
        for r, (s, e, prev_end) in enumerate(group):
            seg = ids[s:e]
            off = 0
            if bos_token_id is not None:
                inp[r, 0] = bos_token_id
                off = 1
            inp[r, off:off + seg.numel()] = seg
            lab = seg.clone()
            first_new = max(prev_end - s, 0) if stride < body else 0
            lab[:first_new] = -100
            labels[r, off:off + seg.numel()] = lab
        out = model(input_ids=inp.to(device), use_cache=False)
        logits = out.logits[:, :-1].float()
        tgt = labels[:, 1:].to(device)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                                                 ignore_index=-100, reduction="sum")
        nll_sum += float(loss)
        n_scored += int((tgt != -100).sum())
        bar.set_postfix(ppl=f"{math.exp(nll_sum / max(n_scored, 1)):.3f}")
    res = {
        "ppl": math.exp(nll_sum / max(n_scored, 1)),
        "nll": nll_sum / max(n_scored, 1),
        "tokens_scored": n_scored,
        "windows": len(wins),
        "seq_len": seq_len,
        "stride": stride if stride < body else seq_len,
        "bos": bos_token_id is not None,
        "seconds": time.time() - t0,
    }
    if tokenizer is not None and wins:
        res.update(word_level(tokenizer, ids[wins[0][0]:wins[-1][1]], nll_sum, n_scored))
    return res


def word_level(tokenizer, span: torch.Tensor, nll_sum: float, n_scored: int) -> dict:
    """Word perplexity and bits per byte of a decoded token span (see module doc)."""
    text = tokenizer.decode(span.tolist())
    words = len(text.split())
    nbytes = len(text.encode("utf-8"))
    total = nll_sum / max(n_scored, 1) * span.numel()
    return {"word_ppl": math.exp(total / max(words, 1)), "bits_per_byte": total / (math.log(2) * max(nbytes, 1)),
            "words": words, "bytes": nbytes, "tokens_covered": int(span.numel())}
