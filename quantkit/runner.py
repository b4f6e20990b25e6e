"""The whole loop: quantize with one or more recipes, save, reload, evaluate each and the float model,
write the report.

Used by ``quantkit run`` (the README's main job). Every checkpoint is evaluated *after reloading it
from disk*, so the figures are those of the saved artefact. Each model is measured with the same
settings (:class:`quantkit.eval.suite.EvalSettings`): perplexity on each corpus (token- and
word-level), zero-shot task accuracy, KL divergence / top-1 agreement against the float model on
the same tokens, and a few greedy generations. Results go to ``<out>/results.json`` (rewritten
after every model, so an interrupted run keeps what it finished) and the report to
``<out>/report.md`` and ``<out>/report.html``; ``quantkit report`` re-renders from the JSON alone.

results.json (schema 2) keeps every key of schema 1: ``runs[i].eval`` is the primary corpus's
perplexity record and ``eval_settings`` describes it; new keys are added beside them.
"""

from __future__ import annotations

import os
import time
from typing import Any

from . import api
from .checkpoint.io import write_json
from .checks import float_bits

RESULTS_FILE = "results.json"
SCHEMA = 2


def _settings(eval_kwargs: dict[str, Any], device, tasks, limit, corpora, kl_windows, generations):
    from .eval.suite import EvalSettings

    primary = eval_kwargs.get("corpus") or "enwiki"
    if corpora is None:
        corpora = [primary]
    else:
        from .eval.corpora import parse_corpora

        corpora = parse_corpora(corpora)
        corpora = [primary] + [c for c in corpora if c != primary]
    kw = {"corpora": corpora, "seq_len": eval_kwargs.get("seq_len", 512), "stride": eval_kwargs.get("stride"),
          "windows": eval_kwargs.get("max_windows", 40), "tasks": tasks, "limit": limit,
          "kl_windows": kl_windows, "generations": generations, "device": device}
    if "batch_size" in eval_kwargs:
        kw["batch_size"] = eval_kwargs["batch_size"]
    return EvalSettings(**kw)


def run(model: str, recipes: list[str], out_dir: str, *, device: str | None = None,
        eval_kwargs: dict[str, Any] | None = None, calib_overrides: dict[str, Any] | None = None,
        overwrite: bool = False, progress: bool = True, log=print, tasks: str | list[str] | None = None,
        limit: int | None = None, corpora: str | list[str] | None = None, kl_windows: int = 8,
        generations: int = 2, report: bool = True, settings=None, deterministic: bool = False) -> dict[str, Any]:
    """Quantize ``model`` with each recipe, evaluate everything, write results.json and the report.

    ``tasks``: None = the quick set (``quantkit.eval.tasks.QUICK_TASKS``), "none", "all" or a list;
    ``limit``: documents per task (None = ``QUICK_LIMIT``, 0 = all); ``corpora``: perplexity corpora
    beyond the primary one of ``eval_kwargs`` ("lambada", "all"); ``settings`` overrides all of these.
    ``deterministic``: ``quantize``'s option of that name for every recipe; on a GPU call
    ``quantkit.determinism.for_process()`` before this (the float model is evaluated first, and cuBLAS reads its
    workspace setting once per process), as the CLI's ``--deterministic`` does.
    """
    from .eval import suite
    from .eval.tasks import QUICK_LIMIT

    eval_kwargs = eval_kwargs or {}
    calib_overrides = {k: v for k, v in (calib_overrides or {}).items() if v is not None}
    if limit is None:
        limit = QUICK_LIMIT
    s = settings or _settings(eval_kwargs, device, tasks, limit or None, corpora, kl_windows, generations)
    from .checkpoint.safety import check_replaceable
    from .checks import preflight
    from .models.sources import resolve_model_dir

    replacing, checked = {}, []
    for r in recipes:  # fail on a bad recipe, model, option, output folder or missing task data before any work
        rec = preflight(model, r, device=device, **calib_overrides)  # the recipe with --samples ... applied
        checked.append(rec)
        ck = os.path.join(out_dir, rec.name)
        replacing[rec.name] = check_replaceable(ck, overwrite, protect=(resolve_model_dir(model),))
    norm = s.normalized()
    if norm["tasks"] or "lambada" in norm["corpora"]:
        from .eval.tasks import data_root

        data_root()
    os.makedirs(out_dir, exist_ok=True)
    results: dict[str, Any] = {"schema": SCHEMA, "model": model, "created": time.strftime("%Y-%m-%d %H:%M:%S"),
                               "quantkit_commit": api.git_commit(), "versions": suite.versions(),
                               "settings": s.normalized(), "calibration_overrides": calib_overrides, "runs": []}
    path = os.path.join(out_dir, RESULTS_FILE)
    t_all = time.time()

    log(f"[float] loading {model} and evaluating")
    ref = api.load_any(model)
    results["source"] = ref.source
    f = suite.evaluate_model(ref, s, progress=progress, log=log)
    if s.kl_windows:
        f["fidelity"] = suite.float_self_fidelity(ref, s, progress=progress)
    g = suite.float_generations(ref, s)
    if g:
        f["generations"] = g
    primary = s.normalized()["corpora"][0]
    results["runs"].append({"name": "float", "recipe": None, "bits_per_weight": float_bits(ref.model),
                            "size_bytes": _dir_size(ref.source_dir) if ref.source_dir else None,
                            "quantize_seconds": 0.0, "eval": f["perplexity"].get(primary), **f})
    pe = f["perplexity"].get(primary) or {}
    results["eval_settings"] = {k: pe.get(k) for k in ("corpus", "split", "seq_len", "stride", "windows",
                                                       "tokens_scored", "bos", "text_sha256")}
    write_json(path, results)

    for recipe in checked:
        ck = os.path.join(out_dir, recipe.name)
        log(f"[{recipe.name}] quantizing {model}" + (f" (will replace {replacing[recipe.name]} at {ck})"
                                                     if replacing.get(recipe.name) else ""))
        qm = api.quantize(model, recipe, device=device, progress=progress, deterministic=deterministic)
        qm.save(ck, overwrite=overwrite)
        del qm
        log(f"[{recipe.name}] reloading {ck} and evaluating")
        loaded = api.load(ck)
        e = suite.evaluate_model(loaded, s, reference=ref, progress=progress, log=log)
        run_rep = getattr(loaded, "run_report", None) or {}
        results["runs"].append({
            "name": recipe.name, "recipe": recipe.model_dump(), "description": recipe.description,
            "checkpoint": os.path.abspath(ck), "bits_per_weight": loaded.bits_per_weight(),
            "accounting": loaded.accounting().summary(),
            "size_bytes": _dir_size(ck), "quantize_seconds": loaded.meta.get("seconds"),
            "calibration": loaded.meta.get("calibration"), "finetune": loaded.meta.get("finetune"),
            "calibration_tokens": run_rep.get("calibration_tokens"), "eval": e["perplexity"].get(primary),
            "layers": {n: {"rel_err": v.get("rel_err"), "bits_per_weight": v.get("bits_per_weight")}
                       for n, v in (run_rep.get("layers") or {}).items()},
            "blocks": run_rep.get("blocks") or [], **e})
        del loaded
        write_json(path, results)
    results["seconds"] = round(time.time() - t_all, 1)
    write_json(path, results)
    if report:
        from .eval.report import write_report

        paths = write_report([results], out_dir, sources=[path])
        results["report"] = paths
        log(f"report: {paths['html']}")
    return results


def _dir_size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)
               if os.path.isfile(os.path.join(path, f)))


def summary_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    base = results["runs"][0]["eval"]["ppl"]
    rows = []
    for r in results["runs"]:
        ppl = r["eval"]["ppl"]
        row = {"scheme": r["name"], "bits/weight": r["bits_per_weight"], "ppl": ppl,
               "gap to float": ppl - base, "quantize s": r.get("quantize_seconds") or 0.0}
        fid = r.get("fidelity") or {}
        if fid:
            row["KL"] = fid.get("kl")
            row["top-1 agree"] = fid.get("top1_agree")
        for t, m in (r.get("tasks") or {}).items():
            row[t] = m.get("acc_norm", m.get("acc"))
        rows.append(row)
    return rows

