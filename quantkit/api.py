"""The public Python API: quantize, load, evaluate. The CLI is a thin layer over these."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from dataclasses import asdict
from typing import Any

import torch
from torch import nn

from .accounting import Accounting, account
from .checkpoint.io import atomic_output_dir, read_config, write_json
from .checks import check_model, check_token_ids, with_calibration
from .data import calibration_batch, read_calibration_file, text_calibration_batch
from .distributed import DistributedSolver, current, exit_now, setup
from .errors import CheckpointError, QuantkitError
from .models.sources import (
    LoadedModel,
    copy_source_files,
    load_float_model,
    load_tokenizer,
    read_source,
)
from .moe import prepare as prepare_moe
from .nn import QuantLinear, cached_dequant
from .pipeline import PipelineReport, is_data_free, quantize_model
from .recipe import Recipe, load_recipe
from .registry import get as _get
from .registry import names as _names
from .resume import ResumeObserver, clear_state
from .solve import LocalSolver
from .version import __version__

RUN_FILE = "quantkit_run.json"
__all__ = ["QuantizedModel", "cached_dequant", "default_device", "evaluate", "exit_if_distributed", "load",
           "load_any", "quantize"]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def git_commit() -> str | None:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


class QuantizedModel:
    """A quantized (or loaded) causal LM with its tokenizer and the record of how it was made."""

    def __init__(self, model: nn.Module, tokenizer, source: dict[str, Any], source_dir: str | None,
                 meta: dict[str, Any] | None = None, report: PipelineReport | None = None,
                 resume_dir: str | None = None):
        self.model, self.tokenizer, self.source, self.source_dir = model, tokenizer, source, source_dir
        self.meta = meta or {}
        self.report = report
        self.resume_dir = resume_dir  # where quantize(resume_dir=...) committed its blocks
        self.streamed_to: str | None = None  # quantize(save_to=...) wrote it while quantizing; blocks released
        self.saved_to: str | None = None  # where quantize(save_to=...) saved it (streamed or at the end)

    # ---- conveniences ------------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.model.generate(*args, **kwargs)

    @property
    def bos_token_id(self) -> int | None:
        return self.tokenizer.bos_token_id if self.source.get("add_bos") and self.tokenizer is not None else None

    def quantized_layers(self) -> dict[str, QuantLinear]:
        return {n: m for n, m in self.model.named_modules() if isinstance(m, QuantLinear)}

    def accounting(self) -> Accounting:
        """Every parameter, by group (decoder blocks, embeddings, lm_head, other): quantkit.accounting."""
        return account(self.model)

    def bits_per_weight(self) -> float:
        """Storage bits per weight over *every* parameter of the decoder blocks: quantized linears at their
        packed bits (codes + scales + zeros + tables), everything else (float experts, routers, norms,
        biases) at its dtype's bits. Embeddings and lm_head are counted apart (:meth:`accounting`)."""
        return self.accounting().blocks.bits_per_weight

    def size_bytes(self) -> int:
        seen, total = set(), 0
        for t in list(self.model.parameters()) + list(self.model.buffers()):
            key = t.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += t.numel() * t.element_size()
        return total

    @property
    def is_main_process(self) -> bool:
        """False on the ranks other than 0 under torch.distributed: they neither write nor report."""
        d = current()
        return d is None or d.is_main

    def clear_resume_state(self) -> None:
        """Remove the resume files ``quantize(resume_dir=...)`` committed (once the result is saved);
        other files in that folder are left alone. Rank 0 only; nothing without a resume dir."""
        if self.resume_dir and self.is_main_process:
            clear_state(self.resume_dir)

    # ---- persistence ---------------------------------------------------------------------------
    def save(self, path: str, *, overwrite: bool = False, layout: str = "native") -> str:
        """Write the checkpoint atomically; an existing folder is replaced only with overwrite.

        Under torch.distributed only rank 0 writes (every rank holds the same quantized model)."""
        lay = _get("layout", layout)
        if self.streamed_to is not None:
            if os.path.abspath(path) == self.streamed_to and layout == "native":
                return self.streamed_to
            raise QuantkitError(f"this model was written to {self.streamed_to} while it was quantized (streamed) and "
                                f"its blocks are no longer in memory; copy that folder, or quantize with "
                                f"load='whole' / without save_to to save it elsewhere or in another layout")
        if not self.is_main_process:
            return os.path.abspath(path)
        with atomic_output_dir(path, overwrite=overwrite, protect=(self.source_dir,)) as tmp:
            lay.save(self.model, tmp, self.meta)
            self._write_extras(tmp)
        return os.path.abspath(path)

    def _write_extras(self, tmp: str) -> None:
        """Tokenizer and source files, the source record and the run record, next to the weights."""
        if self.source_dir:
            copy_source_files(self.source_dir, tmp)
        elif self.tokenizer is not None:
            self.tokenizer.save_pretrained(tmp)
        write_json(os.path.join(tmp, "quantkit_source.json"), self.source)
        if self.report is not None:
            write_json(os.path.join(tmp, RUN_FILE), {"meta": self.meta, "report": asdict(self.report)})


def _as_loaded(model_or_name, tokenizer=None) -> LoadedModel:
    if isinstance(model_or_name, LoadedModel):
        return model_or_name
    if isinstance(model_or_name, QuantizedModel):
        raise QuantkitError("this model is already quantized; pass the float model or its name")
    if isinstance(model_or_name, str):
        return load_float_model(model_or_name)
    if isinstance(model_or_name, nn.Module):
        src = {"name": getattr(model_or_name.config, "_name_or_path", "") or type(model_or_name).__name__,
               "add_bos": False}
        if tokenizer is not None:
            src = read_source("/nonexistent", tokenizer) | {"name": src["name"]}
        return LoadedModel(model_or_name, tokenizer, getattr(model_or_name.config, "_name_or_path", ""), src)
    raise QuantkitError(f"quantize() takes a bundled model name, a model folder or a transformers model, "
                        f"got {type(model_or_name).__name__}")


def _calibration_ids(lm: LoadedModel, recipe: Recipe, calibration) -> tuple[torch.Tensor, dict]:
    c = recipe.calibration
    if isinstance(calibration, (str, os.PathLike)):  # a file: as the recipe's calibration.path
        c, calibration = c.model_copy(update={"path": os.fspath(calibration)}), None
    source = {"corpus": "user text"}
    if calibration is None and c.path:
        calibration = read_calibration_file(c.path, c.field)
        source = {"corpus": f"file {os.path.basename(c.path)}", "path": os.path.abspath(c.path)}
        if isinstance(calibration, torch.Tensor):
            source["corpus"] += " (token ids as given)"
    if calibration is None:
        if lm.tokenizer is None:
            raise QuantkitError("the model has no tokenizer: pass calibration= as a tensor of token ids [N, L]")
        ids = calibration_batch(lm.tokenizer, c.samples, c.seq_len, c.seed, c.corpus, lm.bos_token_id)
        return ids, {"corpus": c.corpus, "split": "calibration (even-numbered articles)", "samples": c.samples,
                     "seq_len": c.seq_len, "seed": c.seed, "bos": lm.bos_token_id is not None}
    if isinstance(calibration, torch.Tensor):
        if calibration.dim() != 2 or calibration.dtype not in (torch.int32, torch.int64):
            raise QuantkitError(f"calibration tensor must be integer token ids of shape [N, L], got "
                                f"{calibration.dtype} {tuple(calibration.shape)}")
        src = source if "path" in source else {"corpus": "user tensor"}
        return calibration.long(), {**src, "samples": calibration.shape[0], "seq_len": calibration.shape[1]}
    if isinstance(calibration, (list, tuple)) and calibration and all(isinstance(t, str) for t in calibration):
        if lm.tokenizer is None:
            raise QuantkitError("text calibration needs a tokenizer")
        what = f"calibration data {source['path']}" if "path" in source else "the calibration text"
        ids, used = text_calibration_batch(lm.tokenizer, list(calibration), c.samples, c.seq_len, c.seed,
                                           lm.bos_token_id, what)
        return ids, {**source, "samples": c.samples, "seq_len": c.seq_len, "seed": c.seed,
                     "bos": lm.bos_token_id is not None, **used}
    raise QuantkitError("calibration= takes None (the recipe's corpus or calibration.path), a file path (.txt, "
                        ".jsonl, .json, .safetensors), a [N, L] tensor of token ids or a non-empty list of strings")


def quantize(model_or_name, recipe: str | dict | Recipe = "w4a16-gptq", calibration=None, *,
             tokenizer=None, device: str | None = None, samples: int | None = None, seq_len: int | None = None,
             seed: int | None = None, batch_size: int | None = None, progress: bool = True,
             resume_dir: str | None = None, allow_unquantized: bool = False, load: str | None = None,
             dtype: torch.dtype | None = None, save_to: str | None = None, overwrite: bool = False,
             dist_read: str = "all", deterministic: bool = False) -> QuantizedModel:
    """Quantize a model (bundled name, HF folder, LoadedModel or transformers model) with a recipe.

    **In place**: a transformers model passed in is modified (its linears are replaced by quantized
    ones) and returned inside the QuantizedModel, so its float weights are gone afterwards; keep a float
    copy (``copy.deepcopy(model)``, or pass the name/folder and reload the float model) to compare with.
    An already quantized model is refused (quantize a fresh float one). Blocks are worked on one at a
    time; only the current block is moved to ``device``. Everything that can be checked without the
    data (recipe, calibration options, targets, positions, memory, token ids) is checked before any
    calibration starts (quantkit.checks).
    With ``resume_dir`` every finished block is committed there and a rerun resumes (quantkit.resume;
    ``meta["resume"]`` says whether and from where, or why it started afresh).
    Mixture-of-experts models: each expert container becomes per-expert linears, quantized like any other
    (docs/MOE.md). A decoder-block tensor above 1% of its block that no rule quantizes and no ``ignore``
    names is an error (``allow_unquantized=True``: a warning); ``bits_per_weight()`` counts every block
    parameter.
    Started by torchrun (or inside an initialised torch.distributed group) the calibration is shared
    by all ranks (quantkit.distributed); every rank returns the same model.
    A model folder is **streamed** by default (quantkit.stream): each decoder block's weights are read
    from the shards when the pipeline reaches it (``load="whole"`` loads the model first; a bundled name
    loads whole unless ``load="stream"``); ``dtype`` is the float dtype weights are read in (default
    float32). ``save_to`` writes the native checkpoint there (``overwrite`` as in ``save``); streamed,
    each finished block is written at once and leaves memory, and the returned model's blocks stay
    released (``qm.streamed_to`` names the folder; ``qm.save`` to another place is refused).
    ``dist_read`` (streamed, under torchrun): ``"all"`` (default) every rank reads its own copy of each
    block from the shards; ``"rank0"`` rank 0 reads it and broadcasts it (quantkit.stream.RankZeroReader).
    In one process, or with a whole load, it changes nothing (``meta["load"]["dist_read"]`` says so).
    ``deterministic=True``: deterministic GPU kernels for the whole run, so two runs with the same seed give
    the same codes on the same GPU and software (quantkit.determinism; about 30 % slower on an H100; the
    CPU path is deterministic without it). ``meta["deterministic"]`` records it.
    """
    from .determinism import deterministic_algorithms

    with deterministic_algorithms(deterministic):
        qm = _quantize(model_or_name, recipe, calibration, tokenizer=tokenizer, device=device, samples=samples,
                       seq_len=seq_len, seed=seed, batch_size=batch_size, progress=progress, resume_dir=resume_dir,
                       allow_unquantized=allow_unquantized, load=load, dtype=dtype, save_to=save_to,
                       overwrite=overwrite, dist_read=dist_read, deterministic=bool(deterministic))
    return qm


def _quantize(model_or_name, recipe, calibration, *, tokenizer, device, samples, seq_len, seed, batch_size,
              progress, resume_dir, allow_unquantized, load, dtype, save_to, overwrite, dist_read,
              deterministic) -> QuantizedModel:
    if resume_dir is not None and not resume_dir:
        raise QuantkitError("resume_dir must name a folder (e.g. --resume-dir DIR)")
    from .stream import check_dist_read

    check_dist_read(dist_read)  # before joining a group: every rank fails alike
    recipe = with_calibration(load_recipe(recipe), samples=samples, seq_len=seq_len, seed=seed, batch_size=batch_size)
    dist, device = setup(device)  # under torchrun: join the group; this rank's device
    device = torch.device(device or default_device())
    source, load_info = None, None
    if isinstance(model_or_name, str):
        from .stream import open_model

        if load is None and recipe.finetune is not None:  # the stage trains the whole model: load it whole
            load = "whole"
        lm, source, load_info = open_model(model_or_name, load, dtype, recipe.ignore, dist=dist, dist_read=dist_read)
    else:
        lm = _as_loaded(model_or_name, tokenizer)
    if recipe.finetune is not None:
        _check_finetune(recipe, source, dist)
    moe_found = prepare_moe(lm.model, recipe.ignore)  # MoE: fused expert containers -> per-expert linears
    moe_found = moe_found or (source.moe_found if source is not None else [])  # streamed: split on meta
    # before any calibration (checks.py); a large block tensor no rule quantizes is an error unless allowed
    check_model(lm.model, recipe, calibration, device or default_device(), allow_unquantized)
    ids, calib_info = _calibration_ids(lm, recipe, calibration)
    check_token_ids(ids, lm.model)
    t0 = time.time()
    float_target = None
    if recipe.finetune is not None:  # the float model's final hidden states, before any block is quantized
        from .transforms.e2e import capture_float

        float_target = capture_float(lm.model, ids, recipe.finetune, device, recipe.calibration.batch_size)
    solver = LocalSolver() if dist is None else DistributedSolver(dist, device)
    observer, extra_meta = None, ({"moe_experts": moe_found} if moe_found else {})
    extra_meta["deterministic"] = deterministic
    if load_info:
        extra_meta["load"] = load_info
    if resume_dir is not None:
        if is_data_free(lm.model, recipe):
            extra_meta["resume"] = {"work_dir": os.path.abspath(resume_dir), "resumed_from_block": None,
                                    "restart_reason": "data-free recipe: no blocks to resume, ran directly"}
        else:
            observer = ResumeObserver(resume_dir, lm.model, recipe, ids, device, dist,
                                      model_fp=source.fingerprint() if source is not None else None)
    writer = None
    if save_to is not None and source is not None and recipe.kv_cache is None:  # the KV allocation runs the model
        from .stream import Observers, StreamWriter

        writer = StreamWriter(save_to, lm.model, overwrite=overwrite, protect=(lm.path,),
                              resume_dir=resume_dir if observer is not None else None,
                              main=dist is None or dist.is_main)
    with writer if writer is not None else contextlib.nullcontext(), \
            observer if observer is not None else contextlib.nullcontext():
        report = quantize_model(lm.model, recipe, ids, device=device, batch_size=recipe.calibration.batch_size,
                                progress=progress, solver=solver,
                                observer=Observers(observer, writer) if writer is not None else observer,
                                source=source)
        if float_target is not None:  # the step sizes trained end to end, codes fixed (quantkit.transforms.e2e)
            from .transforms.e2e import run_finetune

            extra_meta["finetune"] = run_finetune(lm.model, ids, float_target, recipe.finetune, device,
                                                  seed=recipe.calibration.seed, progress=progress)
            del float_target
        if observer is not None:
            extra_meta["resume"] = observer.info
        qm = _finish(lm, recipe, report, calib_info, device, dist, t0, progress, extra_meta)
        qm.resume_dir = resume_dir
        if writer is not None:
            qm.streamed_to = qm.saved_to = writer.finish(qm.meta, qm._write_extras)
    if save_to is not None and writer is None:
        qm.saved_to = qm.save(save_to, overwrite=overwrite)
    return qm


def _check_finetune(recipe: Recipe, source, dist) -> None:
    """The recipe's ``finetune`` stage trains the whole model at once: refused, before any calibration, where
    the model is not wholly in memory or the run is distributed."""
    if source is not None:
        raise QuantkitError(f"{recipe.source}: finetune (end-to-end scale tuning) needs the whole model in memory, but "
                            f"this model is streamed from disk (load='stream' was given; without it a finetune "
                            f"recipe loads whole); "
                            f"quantize with load='whole' (--load whole) or remove the recipe's finetune key")
    if dist is not None and dist.world > 1:
        raise QuantkitError(f"{recipe.source}: finetune (end-to-end scale tuning) does not run under torch.distributed "
                            f"yet; quantize in one process or remove the recipe's finetune key")


def exit_if_distributed(code: int) -> None:
    """Under torch.distributed, leave the process at once with ``code`` (streams flushed): a graceful
    teardown of a group whose peers failed can hang. Outside a group it returns (the caller exits)."""
    if current() is not None:
        exit_now(code)


def _finish(lm: LoadedModel, recipe: Recipe, report: PipelineReport, calib_info: dict, device, dist, t0: float,
            progress: bool, extra_meta: dict | None = None) -> QuantizedModel:
    """The record of the run, the KV-cache allocation."""
    if report.calibration_tokens == 0 and recipe.finetune is None:
        calib_info = {"data_free": True, "note": "no scheme needed activations; no calibration data used"}
    meta = {
        "quantkit_version": __version__,
        "quantkit_commit": git_commit(),
        "recipe": recipe.model_dump(),
        "recipe_name": recipe.name,
        "calibration": calib_info,
        "source": lm.source,
        "device": str(device),
        "seconds": round(time.time() - t0, 2),
        "torch": torch.__version__,
        **(extra_meta or {}),
    }
    meta["accounting"] = account(lm.model).summary()
    if dist is not None:
        meta["distributed"] = {"world_size": dist.world, "backend": dist.backend}
    qm = QuantizedModel(lm.model, lm.tokenizer, lm.source, lm.path if os.path.isdir(lm.path or "") else None,
                        meta, report)
    if recipe.kv_cache is not None:  # KV-cache bits, measured on the quantized model, saved in the config
        from .kv import KVConfig, attach

        alloc = KVConfig.from_recipe(recipe.kv_cache, recipe.source).build(qm, progress=progress)
        qm.meta["kv_cache"] = alloc
        attach(qm.model, alloc)
    return qm


def _layout_for(quant_method: str):
    for n in _names("layout"):
        cls = _get("layout", n)
        if getattr(cls, "QUANT_METHOD", n) == quant_method:
            return cls
    raise CheckpointError(f"quantization_config.quant_method {quant_method!r} is not a layout quantkit reads "
                          f"(known: {', '.join(_names('layout'))})")


def load(path: str) -> QuantizedModel:
    """Load a quantized checkpoint folder into a runnable model (quantized linears stay packed)."""
    import json

    cfg = read_config(path)
    qc = cfg.get("quantization_config")
    if qc is not None and not isinstance(qc, dict):
        raise CheckpointError(f"{path}/config.json: quantization_config must be a mapping with a quant_method, got "
                              f"{type(qc).__name__} {str(qc)[:60]!r}; restore the config.json the checkpoint was "
                              f"written with")
    if not isinstance(qc, dict) or "quant_method" not in qc:
        raise CheckpointError(f"{path}/config.json has no quantization_config.quant_method: not a quantized "
                              f"checkpoint (evaluate it as a float model instead)")
    model = _layout_for(qc["quant_method"]).load(path, cfg)
    model.eval()
    tok = load_tokenizer(path)
    meta = {k: v for k, v in qc.items() if k != "layers"}
    report = None
    run = os.path.join(path, RUN_FILE)
    if os.path.exists(run):
        with open(run) as f:
            report = json.load(f).get("report")
    qm = QuantizedModel(model, tok, read_source(path, tok), path, meta)
    qm.run_report = report
    if isinstance(meta.get("kv_cache"), dict):  # a saved KV allocation: generate()/forward use that cache
        from .kv import attach

        attach(model, meta["kv_cache"])
    return qm


def load_any(name_or_path: str) -> QuantizedModel:
    """A quantized checkpoint, or a float model (bundled name or HF folder) wrapped the same way."""
    if os.path.isdir(name_or_path):
        try:
            cfg = read_config(name_or_path)
        except CheckpointError:
            cfg = {}
        if isinstance(cfg.get("quantization_config"), dict) and cfg["quantization_config"].get("quant_method") \
                and cfg["quantization_config"].get("quant_method") != "gguf":
            return load(name_or_path)
    lm = load_float_model(name_or_path)
    return QuantizedModel(lm.model, lm.tokenizer, lm.source, lm.path, {"float": True})


def evaluate(model_or_path, *, corpus: str = "enwiki", seq_len: int = 512, stride: int | None = None,
             max_windows: int | None = 40, batch_size: int = 4, device: str | None = None,
             progress: bool = True) -> dict[str, Any]:
    """Token-level perplexity on the held-out evaluation split (odd-numbered articles)."""
    from .eval.corpora import evaluation_split
    from .eval.perplexity import perplexity

    qm = model_or_path if isinstance(model_or_path, QuantizedModel) else load_any(model_or_path)
    device = device or default_device()
    qm.model.to(device)
    split = evaluation_split(qm.tokenizer, corpus)
    res = perplexity(qm.model, split.ids, seq_len=seq_len, stride=stride, max_windows=max_windows,
                     bos_token_id=qm.bos_token_id, batch_size=batch_size, device=device, progress=progress)
    res.update({"corpus": corpus, "split": "evaluation (odd-numbered articles; disjoint from calibration)",
                "text_sha256": split.text_sha256, "device": str(device)})
    return res
