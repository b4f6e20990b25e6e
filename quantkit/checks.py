"""Checks that run before any calibration starts, so that a run that cannot succeed (or would succeed
with a wrong result) fails at once with one clear error instead of after the work.

* :func:`with_calibration` — calibration overrides (``--samples``, ``--seq-len``, ``--seed``,
  ``--batch-size``, ``--calibration-data`` / ``samples=`` ...) validated by the recipe schema (its minimums
  included); a calibration file is read and checked by :func:`preflight`;
* :func:`check_model` — the model is a float model (never quantized twice), the recipe's targets match
  at least one of its linear layers, the calibration windows fit its positions and the memory;
* :func:`check_token_ids` — calibration token ids are non-empty and inside the vocabulary;
* :func:`check_layout` — the recipe's layers can be written in the chosen checkpoint layout (asks the
  layout's declared capabilities, quantkit/checkpoint/caps.py);
* :func:`preflight` — all of the above from a model name or folder alone (a meta-device skeleton
  built from config.json: no weights are read), what ``quantkit quantize`` / ``quantkit run`` call first;
* :func:`check_results` — a results file of ``quantkit run``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from pydantic import ValidationError
from torch import nn

from .errors import ModelSourceError, QuantkitError, RecipeError
from .recipe import CalibrationConfig, Recipe, load_recipe

_POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "n_ctx")
_OPTION_NAMES = {"samples": "--samples", "seq_len": "--seq-len", "seed": "--seed", "batch_size": "--batch-size",
                 "path": "--calibration-data", "field": "--calibration-field"}
_TEXT_KEYS = ("path", "field")


# ---- calibration settings ----------------------------------------------------------------------------
def with_calibration(recipe: Recipe, **over: Any) -> Recipe:
    """``recipe`` with the non-None calibration overrides applied, validated like the recipe's own keys."""
    over = {k: v for k, v in over.items() if v is not None}
    if not over:
        return recipe
    for k, v in over.items():
        if k in _TEXT_KEYS:
            if not isinstance(v, str) or not v:
                raise RecipeError(f"calibration.{k} (option {_OPTION_NAMES[k]} / {k}=): expected a non-empty "
                                  f"string, got {v!r}")
        elif isinstance(v, bool) or not isinstance(v, int):
            raise RecipeError(f"calibration.{k} (option {_OPTION_NAMES.get(k, k)} / {k}=): expected an integer, "
                              f"got {v!r}")
    try:
        cal = CalibrationConfig.model_validate({**recipe.calibration.model_dump(), **over})
    except ValidationError as e:
        msgs = []
        for err in e.errors():
            key = ".".join(str(p) for p in err["loc"])
            src = f" (set by {_OPTION_NAMES.get(key, key)} / {key}=)" if key in over else f" (in {recipe.source})"
            msgs.append(f"calibration.{key} = {err.get('input')!r}: {err['msg']}{src}")
        raise RecipeError("; ".join(msgs)) from None
    return recipe.model_copy(update={"calibration": cal})


def max_positions(config) -> int | None:
    for k in _POSITION_KEYS:
        v = getattr(config, k, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


# ---- the model -------------------------------------------------------------------------------------
def check_float(model: nn.Module) -> None:
    """Refuse a model that is already quantized (by quantkit or by transformers' quantizers)."""
    from .nn import QuantLinear

    done = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    if done:
        raise QuantkitError(
            f"the model is already quantized ({len(done)} quantized layers, e.g. {done[0]}): quantize() replaces the "
            f"linears of the model you pass in place, so its float weights are gone. Quantize a fresh float model "
            f"(reload it, or pass the name/folder, or copy.deepcopy(model) before the first quantize)")
    qc = getattr(getattr(model, "config", None), "quantization_config", None)
    if qc is not None or getattr(model, "hf_quantizer", None) is not None:
        qm = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", qc)
        raise QuantkitError(f"the model is already quantized (config.quantization_config quant_method {qm!r}); "
                            f"quantize its float original instead")


def _linears(model: nn.Module) -> tuple[str | None, dict[str, nn.Module]]:
    from .models.discovery import find_blocks, find_linears

    try:
        blocks_name, _ = find_blocks(model)
    except ModelSourceError:
        blocks_name = None
    return blocks_name, find_linears(model)


def check_targets(model: nn.Module, recipe: Recipe) -> list[str]:
    """The names of the layers the recipe quantizes; an error if there are none."""
    _, lin = _linears(model)
    hit = [n for n in lin if recipe.scheme_for(n) is not None]
    if not hit:
        some = ", ".join(list(lin)[:4]) or "(none)"
        skips = ", rules that skip" if any(r.skip for r in recipe.rules) else ""
        raise RecipeError(
            f"{recipe.source}: the recipe quantizes none of the model's {len(lin)} linear layers (targets "
            f"{recipe.targets}, ignore {recipe.ignore}{skips}); the result would be the float model. Layers look "
            f"like: {some}. Fix targets/ignore")
    return hit


def calibration_bytes(model: nn.Module, n: int, seq_len: int, batch_size: int, recipe: Recipe,
                      with_ids: bool = True) -> dict[str, int]:
    """A lower bound of the memory calibration needs beyond the model itself (bytes, by part)."""
    cfg = getattr(model, "config", None)
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None) or 0
    try:
        elt = next(p for p in model.parameters() if p.is_floating_point()).element_size()
    except StopIteration:
        elt = 4
    tokens = n * seq_len
    parts = {"token ids": tokens * 8 if with_ids else 0,
             "block inputs": tokens * hidden * elt * (2 if recipe.block_plugins else 1)}
    if getattr(cfg, "_attn_implementation", None) == "eager":  # eager attention materialises the scores
        heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None) or 1
        parts["attention scores"] = min(batch_size, n) * heads * seq_len * seq_len * elt * 2
    return parts


def _available(device) -> int | None:
    device = torch.device(device)
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except Exception:  # noqa: BLE001 - no usable CUDA context: do not guess
            return None
    try:
        import psutil

        avail = int(psutil.virtual_memory().available)
    except Exception:  # noqa: BLE001
        return None
    # a container's memory limit (cgroup v2, then v1) can be far below what the host has free
    v1 = "/sys/fs/cgroup/memory/memory."
    for limit_f, used_f in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                            (v1 + "limit_in_bytes", v1 + "usage_in_bytes")):
        try:
            with open(limit_f) as f:
                limit = f.read().strip()
            with open(used_f) as f:
                used = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < (1 << 60):
            avail = min(avail, max(int(limit) - used, 0))
        break
    return avail


def check_fits(model: nn.Module, recipe: Recipe, n: int, seq_len: int, device, *, with_ids: bool = True,
               loaded: bool = True, where: str = "calibration") -> None:
    """Calibration windows within the model's positions and the memory available (``loaded=False``: the
    model's own weights are not in memory yet and count too)."""
    if n < 1 or seq_len < 1:
        raise QuantkitError(f"{where}: {n} windows of {seq_len} tokens; need at least one window of one token")
    mp = max_positions(getattr(model, "config", None))
    if mp is not None and seq_len > mp:
        raise QuantkitError(f"{where}: windows of {seq_len} tokens exceed the model's {mp} positions "
                            f"(config max_position_embeddings); use --seq-len / seq_len <= {mp}")
    parts = calibration_bytes(model, n, seq_len, recipe.calibration.batch_size, recipe, with_ids)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if not loaded:
        parts["model weights"] = sum(p.numel() * p.element_size() for p in model.parameters())
    host = {"token ids": parts.pop("token ids")} if device.type == "cuda" else {}
    if device.type == "cuda" and "model weights" in parts:
        host["model weights"] = parts.pop("model weights")  # loaded on the host, one block at a time on the GPU
    gib = 1 << 30
    for dev, p in ((device, parts), (torch.device("cpu"), host)):
        need, avail = sum(p.values()), _available(dev)
        if p and avail is not None and need > avail:
            detail = ", ".join(f"{k} {v / gib:.1f} GiB" for k, v in p.items() if v)
            raise QuantkitError(
                f"{where}: {n} windows of {seq_len} tokens need at least {need / gib:.1f} GiB ({detail}) but only "
                f"{avail / gib:.1f} GiB of memory is available on {dev.type}; lower --samples / --seq-len "
                f"(samples= / seq_len=)")


def check_model(model: nn.Module, recipe: Recipe, calibration, device, allow_unquantized: bool = False) -> None:
    """Everything about the model that must hold before calibration (see the module docstring)."""
    from .accounting import check_coverage

    check_float(model)
    check_targets(model, recipe)
    check_coverage(model, recipe, allow_unquantized)  # no large block tensor silently left float
    from .pipeline import is_data_free

    if is_data_free(model, recipe):
        return  # calibration data is not used (still validated by check_token_ids)
    if isinstance(calibration, torch.Tensor):
        if calibration.dim() == 2:
            check_fits(model, recipe, calibration.shape[0], calibration.shape[1], device, with_ids=False,
                       where="calibration tensor")
    elif calibration is None:
        c = recipe.calibration
        check_fits(model, recipe, c.samples, c.seq_len, device)


def check_token_ids(ids: torch.Tensor, model: nn.Module) -> None:
    """Token ids [N, L]: at least one, all inside the model's vocabulary."""
    if ids.dim() != 2 or ids.shape[0] < 1 or ids.shape[1] < 1:
        raise QuantkitError(f"calibration: token ids of shape {tuple(ids.shape)}; need [N, L] with N >= 1 windows of "
                            f"L >= 1 tokens")
    mp = max_positions(getattr(model, "config", None))
    if mp is not None and ids.shape[1] > mp:
        raise QuantkitError(f"calibration: windows of {ids.shape[1]} tokens exceed the model's {mp} positions "
                            f"(config max_position_embeddings); use shorter windows")
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(emb, "num_embeddings", None) or getattr(getattr(model, "config", None), "vocab_size", None)
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or (vocab is not None and hi >= vocab):
        bad = lo if lo < 0 else hi
        raise QuantkitError(f"calibration: token id {bad} is outside the model's vocabulary [0, {vocab}) "
                            f"(ids range {lo}..{hi}); tokenize with the model's own tokenizer")


# ---- the checkpoint layout ---------------------------------------------------------------------------
def plan_layers(model: nn.Module, recipe: Recipe):
    from .checkpoint.caps import PlannedLayer
    from .models.discovery import linear_weight

    blocks_name, lin = _linears(model)
    out = []
    for n, m in lin.items():
        w = linear_weight(m)
        out.append(PlannedLayer(n, (int(w.shape[0]), int(w.shape[1])),
                                bool(blocks_name) and n.startswith(blocks_name + "."),
                                type(m).__name__ == "Conv1D", recipe.scheme_for(n)))
    return out


def check_layout(model: nn.Module, recipe: Recipe, layout: str, options: dict[str, Any] | None = None) -> None:
    """Refuse, before any work, a recipe whose layers the layout cannot hold (one error listing why)."""
    from .registry import get

    cls = get("layout", layout)
    from .checkpoint.caps import layout_problems

    probs = layout_problems(layout, cls.CAPS, plan_layers(model, recipe), kv_cache=recipe.kv_cache is not None,
                            options=options)
    if probs:
        more = f" (and {len(probs) - 4} more)" if len(probs) > 4 else ""
        raise QuantkitError(
            f"recipe {recipe.name!r} cannot be saved in the {layout} layout: {'; '.join(probs[:4])}{more}. Save it "
            f"with --layout native (layout='native'), or change the recipe; docs/EXPORT.md lists what each layout "
            f"holds")


# ---- from a name or folder alone ---------------------------------------------------------------------
def skeleton(name_or_path: str) -> nn.Module:
    """The model of a bundled name or HF folder on the meta device (config.json only, no weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .models.integrity import check_config
    from .models.sources import resolve_model_dir

    path = resolve_model_dir(name_or_path)
    check_config(path)
    try:
        cfg = AutoConfig.from_pretrained(path)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(cfg)
    except Exception as e:  # noqa: BLE001 - whatever a bad config makes transformers raise
        raise ModelSourceError(f"{path}/config.json: cannot build the model ({type(e).__name__}: "
                               f"{str(e)[:300]})") from None


def preflight(model: str | nn.Module, recipe: str | dict | Recipe, *, layout: str | None = None,
              export_options: dict[str, Any] | None = None, device: str | None = None, streamed: bool = False,
              allow_unquantized: bool = False, **calibration: Any) -> Recipe:
    """Every check that needs no weights and no data, for the CLI to call before it starts; returns the
    recipe with the calibration overrides applied. ``streamed``: the weights are read one block at a time
    (quantkit.stream), so the whole model's weights do not count against the memory."""
    recipe = with_calibration(load_recipe(recipe), **calibration)
    if layout is not None:
        from .registry import get

        get("layout", layout)  # an unknown layout name fails first
    from .accounting import check_coverage
    from .moe import prepare

    if recipe.calibration.path:  # the user's calibration file: readable and well-formed, before any work
        from .data import read_calibration_file

        read_calibration_file(recipe.calibration.path, recipe.calibration.field)
    m = skeleton(model) if isinstance(model, str) else model
    check_float(m)
    prepare(m, recipe.ignore)  # MoE: expert containers become per-expert linears (quantize does the same)
    check_targets(m, recipe)
    check_coverage(m, recipe, allow_unquantized)
    from .pipeline import is_data_free

    if not is_data_free(m, recipe):
        c = recipe.calibration
        check_fits(m, recipe, c.samples, c.seq_len, device, loaded=isinstance(model, nn.Module) or streamed)
    if layout is not None:
        check_layout(m, recipe, layout, export_options)
    return recipe


# ---- results files -------------------------------------------------------------------------------------
def check_results(obj: Any, path: str) -> None:
    """A results.json written by ``quantkit run``: an object with a list of runs, each with a name and a
    perplexity record."""
    runs = obj.get("runs") if isinstance(obj, dict) else None
    ok = isinstance(runs, list) and runs and all(
        isinstance(r, dict) and isinstance(r.get("name"), str) and isinstance(r.get("eval"), dict)
        and isinstance(r["eval"].get("ppl"), (int, float)) for r in runs)
    if not ok:
        raise QuantkitError(f"{path} is not a results file written by `quantkit run` (expected an object with "
                            f"\"runs\": [{{\"name\", \"eval\": {{\"ppl\"}}, ...}}]); pass a run folder or its "
                            f"results.json")


def float_bits(model: nn.Module) -> float:
    """Storage bits per weight of a float model's linear layers (32 for float32, 16 for bf16/fp16)."""
    _, lin = _linears(model)
    ws = [m.weight for m in lin.values()] or [p for p in model.parameters()]
    n = sum(w.numel() for w in ws)
    return float(sum(w.numel() * w.element_size() * 8 for w in ws) / n) if n else math.nan
