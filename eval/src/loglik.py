"""Log-likelihood of continuations given contexts, batched, with shared contexts.

The scoring convention is lm-evaluation-harness's ``loglikelihood`` request:

* the text is tokenised as a whole (``context + continuation``) and split where the context's own
  tokens end; a trailing space of the context moves to the continuation first;
* with ``bos_token_id`` (the model was trained with BOS in front, see
  ``QuantizedModel.bos_token_id``) every request starts with BOS; an empty context is always
  given BOS (or EOS when the tokenizer has no BOS) so the first token has something to condition on;
* the log-likelihood is the sum over the continuation's tokens of ``log p(token | everything before
  it)``; ``is_greedy`` says whether every continuation token was the arg-max prediction (LAMBADA's
  accuracy).

Speed: requests that share a context (the choices of one multiple-choice question) are *packed*
into one row: the context once, then every continuation, each continuation attending only to the
context and to its own earlier tokens (a block attention mask, positions restarting after the
context). Several such groups share a row, each attending only to itself. Rows are batched.
A model whose forward ignores custom 4-D attention masks would score such rows wrongly, so the
first packed batch is checked against plain one-request-per-row scoring; on a mismatch the scorer
falls back to plain rows (``pack=False``) for the whole run and says so.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm


@dataclass
class Scored:
    logprob: float
    is_greedy: bool
    n_tokens: int


@dataclass
class _Group:
    ctx: list[int]
    conts: list[list[int]] = field(default_factory=list)
    req: list[int] = field(default_factory=list)  # request index of each continuation

    @property
    def length(self) -> int:
        return len(self.ctx) + sum(len(c) for c in self.conts)


def encode_pair(tokenizer, context: str, continuation: str, bos_token_id: int | None = None
                ) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation) by lm-evaluation-harness's rule (see module doc)."""
    n_space = len(context) - len(context.rstrip(" "))
    if n_space:
        continuation = context[-n_space:] + continuation
        context = context[:-n_space]
    enc = lambda s: tokenizer(s, add_special_tokens=False).input_ids  # noqa: E731
    whole = enc(context + continuation)
    ctx = enc(context) if context else []
    cont = whole[len(ctx):]
    if not cont:  # a tokenizer that merged across the boundary: fall back to separate encoding
        cont = enc(continuation)
    prefix = []
    if bos_token_id is not None:
        prefix = [bos_token_id]
    elif not ctx:
        tok_bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        prefix = [tok_bos] if tok_bos is not None else []
    return prefix + ctx, cont


def _truncate(ctx: list[int], cont: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Keep at most ``max_length`` tokens, dropping context tokens from the left (as lm-eval)."""
    if len(ctx) + len(cont) <= max_length:
        return ctx, cont
    if len(cont) >= max_length:  # keep one context token to condition on
        return ctx[-1:], cont[-(max_length - 1):]
    return ctx[len(ctx) + len(cont) - max_length:], cont


def _groups(pairs: list[tuple[list[int], list[int]]], share: bool) -> list[_Group]:
    groups: dict[tuple, _Group] = {}
    out = []
    for i, (ctx, cont) in enumerate(pairs):
        key = tuple(ctx) if share else (i,)
        g = groups.get(key)
        if g is None:
            g = _Group(ctx)
            groups[key] = g
            out.append(g)
        g.conts.append(cont)
        g.req.append(i)
    return out


def _rows(groups: list[_Group], row_tokens: int) -> list[list[_Group]]:
    """First-fit-decreasing packing of groups into rows of at most ``row_tokens`` tokens."""
    rows: list[list[_Group]] = []
    space: list[int] = []
    for g in sorted(groups, key=lambda g: -g.length):
        for r, free in enumerate(space):
            if g.length <= free:
                rows[r].append(g)
                space[r] -= g.length
                break
        else:
            rows.append([g])
            space.append(max(row_tokens, g.length) - g.length)
    return rows


def _batches(rows: list[list[_Group]], batch_tokens: int) -> list[list[list[_Group]]]:
    """Rows sorted longest first; a batch holds as many rows as fit ``batch_tokens`` once padded."""
    rows = sorted(rows, key=lambda r: -sum(g.length for g in r))
    out, cur, width = [], [], 0
    for r in rows:
        if not cur:
            width = sum(g.length for g in r)  # the longest row of the batch: every row is padded to it
        elif width * (len(cur) + 1) > batch_tokens:
            out.append(cur)
            cur, width = [], sum(g.length for g in r)
        cur.append(r)
    if cur:
        out.append(cur)
    return out


def _build(batch: list[list[_Group]], packed: bool, pad_id: int, dtype: torch.dtype):
    """Input ids, position ids, 4-D additive mask (packed) or 2-D mask, and scoring targets."""
    L = max(sum(g.length for g in row) for row in batch)
    B = len(batch)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    pos = torch.zeros((B, L), dtype=torch.long)
    allow = torch.zeros((B, L, L), dtype=torch.bool) if packed else None
    mask2d = torch.zeros((B, L), dtype=torch.long)
    targets = []  # (request, row, [pred positions], [target ids])
    for b, row in enumerate(batch):
        t = 0
        for g in row:
            c0, nc = t, len(g.ctx)
            ids[b, c0:c0 + nc] = torch.tensor(g.ctx, dtype=torch.long)
            pos[b, c0:c0 + nc] = torch.arange(nc)
            if packed:
                allow[b, c0:c0 + nc, c0:c0 + nc] = torch.ones(nc, nc, dtype=torch.bool).tril()
            t += nc
            for cont, ri in zip(g.conts, g.req):
                n = len(cont)
                ids[b, t:t + n] = torch.tensor(cont, dtype=torch.long)
                pos[b, t:t + n] = torch.arange(nc, nc + n)
                if packed:
                    allow[b, t:t + n, c0:c0 + nc] = True
                    allow[b, t:t + n, t:t + n] = torch.ones(n, n, dtype=torch.bool).tril()
                preds = [c0 + nc - 1] + list(range(t, t + n - 1))
                targets.append((ri, b, preds, cont))
                t += n
        mask2d[b, :t] = 1
        if packed:
            idx = torch.arange(t, L)
            allow[b, idx, idx] = True  # padding attends to itself only (no all-masked rows)
            pos[b, t:] = 0
    if packed:
        m = torch.zeros((B, 1, L, L), dtype=dtype)
        m.masked_fill_(~allow.unsqueeze(1), torch.finfo(dtype).min)
        return ids, pos, m, targets
    return ids, None, mask2d, targets


def _model_dtype(model) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


@torch.no_grad()
def _score_batch(model, batch, packed: bool, pad_id: int, device) -> list[tuple[int, Scored]]:
    dtype = _model_dtype(model)
    ids, pos, mask, targets = _build(batch, packed, pad_id, dtype)
    kw = {"input_ids": ids.to(device), "attention_mask": mask.to(device), "use_cache": False}
    if pos is not None:
        kw["position_ids"] = pos.to(device)
    logits = model(**kw).logits
    rows_i, cols_i, tgt = [], [], []
    for _, b, preds, cont in targets:
        rows_i += [b] * len(preds)
        cols_i += preds
        tgt += cont
    sel = logits[torch.tensor(rows_i, device=logits.device), torch.tensor(cols_i, device=logits.device)].float()
    logp = torch.log_softmax(sel, dim=-1)
    tgt_t = torch.tensor(tgt, device=logp.device)
    tok_lp = logp.gather(1, tgt_t[:, None])[:, 0].cpu()
    greedy = (logp.argmax(-1) == tgt_t).cpu()
    out, k = [], 0
    for ri, _, _preds, cont in targets:
        n = len(cont)
        out.append((ri, Scored(float(tok_lp[k:k + n].double().sum()), bool(greedy[k:k + n].all()), n)))
        k += n
    return out


def score(model, tokenizer, requests: Sequence[tuple[str, str]], *, bos_token_id: int | None = None,
          pack: bool = True, row_tokens: int = 512, batch_tokens: int | None = None, max_length: int = 2048,
          device=None, progress: bool = True, desc: str = "loglikelihood") -> list[Scored]:
    """Score ``(context, continuation)`` string pairs; returns one :class:`Scored` per request.

    ``batch_tokens`` (padded tokens per forward) defaults to 2048 on CPU and 16384 on GPU."""
    pairs = [_truncate(*encode_pair(tokenizer, c, x, bos_token_id), max_length) for c, x in requests]
    return score_tokens(model, pairs, pack=pack, row_tokens=row_tokens, batch_tokens=batch_tokens,
                        pad_id=_pad_id(tokenizer), device=device, progress=progress, desc=desc)


def _pad_id(tokenizer) -> int:
    for t in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if t is not None:
            return int(t)
    return 0


def score_tokens(model, pairs: list[tuple[list[int], list[int]]], *, pack: bool = True, row_tokens: int = 512,
                 batch_tokens: int | None = None, pad_id: int = 0, device=None, progress: bool = True,
                 desc: str = "loglikelihood") -> list[Scored]:
    """Score token-id pairs (context ids, continuation ids); the context must not be empty."""
    for i, (ctx, cont) in enumerate(pairs):
        if not ctx or not cont:
            raise ValueError(f"request {i}: context and continuation must both have tokens "
                             f"(got {len(ctx)} and {len(cont)})")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if batch_tokens is None:
        batch_tokens = 16384 if device.type == "cuda" else 2048
    window = getattr(getattr(model, "config", None), "sliding_window", None)
    if pack and window and max(len(c) + len(x) for c, x in pairs) > window:
        pack = False  # a custom mask would override the model's sliding-window attention
    results: list[Scored | None] = [None] * len(pairs)
    if pack:
        batches = _batches(_rows(_groups(pairs, share=True), row_tokens), batch_tokens)
    else:
        batches = _batches([[g] for g in _groups(pairs, share=False)], batch_tokens)
    n_tok = sum(sum(g.length for g in row) for b in batches for row in b)
    bar = tqdm(total=n_tok, desc=desc, unit="tok", unit_scale=True, disable=not progress)
    checked = not pack
    i = 0
    while i < len(batches):
        batch = batches[i]
        got = _score_batch(model, batch, pack, pad_id, device)
        if not checked:
            checked = True
            if not _agrees(model, batch, got, pad_id, device):
                warnings.warn("this model's forward does not honour custom 4-D attention masks; scoring "
                              "falls back to one request per row (slower, same results)", stacklevel=2)
                pack = False
                batches = _batches([[g] for g in _groups(pairs, share=False)], batch_tokens)
                bar.reset(total=sum(sum(g.length for g in row) for b in batches for row in b))
                i = 0
                continue
        for ri, s in got:
            results[ri] = s
        bar.update(sum(sum(g.length for g in row) for row in batch))
        i += 1
    bar.close()
    return results  # type: ignore[return-value]


def _agrees(model, batch, got, pad_id, device, tol: float = 1e-3) -> bool:
    """Re-score the first few requests of a packed batch one per row and compare."""
    firsts = got[:4]
    by_req = {}
    for row in batch:
        for g in row:
            for cont, ri in zip(g.conts, g.req):
                by_req[ri] = (g.ctx, cont)
    plain = [[_Group(by_req[ri][0], [by_req[ri][1]], [ri])] for ri, _ in firsts]
    ref = dict(_score_batch(model, plain, False, pad_id, device))
    for ri, s in firsts:
        r = ref[ri].logprob
        if not math.isclose(s.logprob, r, rel_tol=tol, abs_tol=tol * max(1, s.n_tokens)):
            return False
    return True


@torch.no_grad()
def direct_logprob(model, ctx: list[int], cont: list[int]) -> float:
    """Reference: one plain forward of ctx+cont, float64 log-softmax (for tests and checks)."""
    device = next(model.parameters()).device
    ids = torch.tensor([ctx + cont], device=device)
    logits = model(input_ids=ids, use_cache=False).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    return float(sum(logp[len(ctx) - 1 + j, t] for j, t in enumerate(cont)))
