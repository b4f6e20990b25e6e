"""The whole loop: quantize with one or more recipes, save, reload, evaluate each and the float model.

Used by ``quantkit run`` (the README's main job). Every checkpoint is evaluated *after reloading it
from disk*, so the figures are those of the saved artefact. Results go to ``<out>/results.json``.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from . import api
from .checkpoint.io import write_json
from .recipe import load_recipe


def run(model: str, recipes: list[str], out_dir: str, *, device: str | None = None,
        eval_kwargs: dict[str, Any] | None = None, calib_overrides: dict[str, Any] | None = None,
        overwrite: bool = False, progress: bool = True, log=print) -> dict[str, Any]:
    eval_kwargs = eval_kwargs or {}
    calib_overrides = {k: v for k, v in (calib_overrides or {}).items() if v is not None}
    os.makedirs(out_dir, exist_ok=True)
    results: dict[str, Any] = {"model": model, "created": time.strftime("%Y-%m-%d %H:%M:%S"),
                               "quantkit_commit": api.git_commit(), "runs": []}

    log(f"[float] evaluating {model}")
    f = api.evaluate(model, device=device, progress=progress, **eval_kwargs)
    results["runs"].append({"name": "float", "recipe": None, "bits_per_weight": 16.0, "eval": f,
                            "quantize_seconds": 0.0})
    results["eval_settings"] = {k: f[k] for k in ("corpus", "split", "seq_len", "stride", "windows",
                                                  "tokens_scored", "bos", "text_sha256")}
    for r in recipes:
        recipe = load_recipe(r)
        ck = os.path.join(out_dir, recipe.name)
        log(f"[{recipe.name}] quantizing {model}")
        qm = api.quantize(model, recipe, device=device, progress=progress, **calib_overrides)
        qm.save(ck, overwrite=overwrite)
        del qm
        log(f"[{recipe.name}] reloading {ck} and evaluating")
        loaded = api.load(ck)
        e = api.evaluate(loaded, device=device, progress=progress, **eval_kwargs)
        results["runs"].append({
            "name": recipe.name, "recipe": recipe.model_dump(), "checkpoint": os.path.abspath(ck),
            "bits_per_weight": loaded.bits_per_weight(), "size_bytes": _dir_size(ck),
            "quantize_seconds": loaded.meta.get("seconds"), "calibration": loaded.meta.get("calibration"),
            "eval": e})
        write_json(os.path.join(out_dir, "results.json"), results)
    write_json(os.path.join(out_dir, "results.json"), results)
    return results


def _dir_size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def summary_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    base = results["runs"][0]["eval"]["ppl"]
    rows = []
    for r in results["runs"]:
        ppl = r["eval"]["ppl"]
        rows.append({"scheme": r["name"], "bits/weight": r["bits_per_weight"], "ppl": ppl,
                     "gap to float": ppl - base, "quantize s": r.get("quantize_seconds") or 0.0})
    return rows


def load_results(path: str) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)
