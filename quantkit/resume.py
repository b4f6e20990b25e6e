"""Resumable quantization: an interrupted run picks up after the last finished decoder block.

``quantize_resumable(model, recipe, work_dir)`` runs :func:`quantkit.pipeline.quantize_model` and, after
every block, commits to ``work_dir``:

* ``block-<k>.safetensors``: block k's whole state after quantization (its quantized layers' packed
  tensors and biases, and whatever else a block plugin changed, e.g. norm weights);
* ``acts-<k+1>.safetensors``: the hidden states entering block k+1 (the quantized block k's outputs),
  keyed by global calibration batch; under torch.distributed each rank writes its own batches to
  ``acts-<k+1>-rank<r>of<n>.safetensors`` (a resume may use another number of ranks);
* ``state.json``: the fingerprint of the run, the next block, the specs of the quantized layers and
  the pipeline report so far. It is replaced last, with an atomic rename: it is the commit record, so
  a run killed at any moment leaves a consistent state (at worst the block in flight is redone).

Run again with the same model, calibration data, recipe and run options (their fingerprints decide)
and it restores blocks ``0..k`` from disk, recomputes the other inputs of the first block (masks,
positions, rotary tables: deterministic functions of the token ids and the float embeddings), reloads
the saved hidden states and continues at block k+1. The result is bit-identical to an uninterrupted
run (the test kills a real process). A changed input starts afresh and says which one changed.

Data-free recipes (RTN into plain INT, no block plugins) have no blocks to resume; they just run.
Under torch.distributed rank 0 holds the lock, decides whether to resume and writes the block files
and state.json; state.json is committed only after every rank has written its activations.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import torch
from torch import nn

from . import __version__
from .errors import CheckpointError, QuantkitError
from .models.discovery import find_blocks, set_module
from .nn import QuantLinear
from .pipeline import PipelineReport, capture_block_inputs, is_data_free, quantize_model
from .recipe import Recipe

STATE_FILE = "state.json"
LOCK_FILE = "lock"
STATE_VERSION = 1

# test hook: called after a block's files are written and before state.json commits them
_before_commit: Callable[[int], None] | None = None


# ---- fingerprints ---------------------------------------------------------------------------------------
def _hash_tensor(h, t: torch.Tensor) -> None:
    t = t.detach().contiguous().cpu()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    if t.numel():
        h.update(memoryview(t.view(torch.uint8).reshape(-1).numpy()))


def model_fingerprint(model: nn.Module) -> str:
    """sha256 over the config (minus its path) and every distinct tensor of the state dict."""
    h = hashlib.sha256()
    cfg = getattr(model, "config", None)
    if cfg is not None:
        d = {k: v for k, v in cfg.to_dict().items() if k not in ("_name_or_path", "transformers_version")}
        h.update(json.dumps(d, sort_keys=True, default=str).encode())
    seen = set()
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        h.update(name.encode())
        if key in seen:
            h.update(b"tied")
            continue
        seen.add(key)
        _hash_tensor(h, t)
    return h.hexdigest()[:20]


def data_fingerprint(ids: torch.Tensor) -> str:
    h = hashlib.sha256()
    _hash_tensor(h, ids.long())
    return h.hexdigest()[:20]


def recipe_fingerprint(recipe: Recipe) -> str:
    return hashlib.sha256(json.dumps(recipe.model_dump(), sort_keys=True, default=str).encode()).hexdigest()[:20]


def run_fingerprint(model: nn.Module, recipe: Recipe, ids: torch.Tensor, device: torch.device) -> dict[str, Any]:
    parts = {
        "model": model_fingerprint(model),
        "data": data_fingerprint(ids),
        "recipe": recipe_fingerprint(recipe),
        "options": hashlib.sha256(json.dumps({"device": device.type, "quantkit": __version__,
                                              "torch": torch.__version__}).encode()).hexdigest()[:20],
    }
    parts["run"] = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]
    return parts


_WHAT = {"model": "the model (config or weights)", "data": "the calibration data", "recipe": "the recipe",
         "options": "the run options (device type, quantkit or torch version)"}


def _why_different(old: dict[str, Any], new: dict[str, Any]) -> str:
    diff = [k for k in ("model", "data", "recipe", "options") if old.get(k) != new.get(k)]
    if not diff:
        return "the saved state is from another quantkit state format"
    return "; ".join(f"{_WHAT[k]} changed ({old.get(k)} -> {new[k]})" for k in diff)


# ---- files ------------------------------------------------------------------------------------------------
def _fsync_write(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _save_tensors(path: str, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    tmp = path + ".tmp"
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _load_tensors(path: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: unreadable resume file ({e})") from None


def read_state(work_dir: str) -> dict[str, Any] | None:
    """The committed state in ``work_dir``, or None (no state, or one that cannot be used)."""
    p = os.path.join(work_dir, STATE_FILE)
    if not os.path.exists(p):
        return None
    try:
        with open(p) as f:
            st = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(st, dict) or st.get("version") != STATE_VERSION:
        return None
    return st


def clear_state(work_dir: str) -> None:
    """Remove every resume file quantkit wrote in ``work_dir`` (other files are left alone)."""
    for pat in (STATE_FILE, "block-*.safetensors", "acts-*.safetensors", "*.tmp"):
        for p in glob.glob(os.path.join(work_dir, pat)):
            os.remove(p)


class _Lock:
    """One run per work dir: a lock file holding the owner's pid; a dead owner's lock is taken over."""

    def __init__(self, work_dir: str):
        self.path = os.path.join(work_dir, LOCK_FILE)

    def __enter__(self):
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    pid = int(open(self.path).read().strip() or 0)
                except (OSError, ValueError):
                    pid = 0
                if pid and pid != os.getpid() and _alive(pid):
                    raise QuantkitError(f"{os.path.dirname(self.path)} is in use by process {pid}; wait for it "
                                        f"or pass another resume directory") from None
                os.remove(self.path)  # stale: its owner is gone
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            return self
        raise QuantkitError(f"cannot take the lock {self.path}")

    def __exit__(self, *exc):
        try:
            os.remove(self.path)
        except OSError:
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---- restore ----------------------------------------------------------------------------------------------
def _restore_block(model: nn.Module, path: str, specs: dict[str, Any], prefix: str) -> None:
    tensors = _load_tensors(path)
    mine = {n: s for n, s in specs.items() if n.startswith(prefix)}
    for name, spec in mine.items():
        p = name + "."
        packed = {k[len(p):].replace("__", "."): tensors.pop(k) for k in list(tensors)
                  if k.startswith(p) and k != p + "bias"}
        bias = tensors.pop(p + "bias", None)
        out, inn = spec["shape"]
        ql = QuantLinear(inn, out, {k: v for k, v in spec.items() if k != "shape"}, packed, bias)
        set_module(model, name, ql)
    res = model.load_state_dict(tensors, strict=False)
    if res.unexpected_keys:
        raise CheckpointError(f"{path}: tensors {res.unexpected_keys[:3]} do not belong to this model")


def _report_from(d: dict[str, Any]) -> PipelineReport:
    return PipelineReport(layers=dict(d.get("layers", {})), blocks=list(d.get("blocks", [])),
                          seconds=float(d.get("seconds", 0.0)), calibration_tokens=int(d.get("calibration_tokens", 0)),
                          device=str(d.get("device", "cpu")))


def _merge(old: PipelineReport, new: PipelineReport) -> PipelineReport:
    return PipelineReport(layers={**old.layers, **new.layers}, blocks=old.blocks + new.blocks,
                          seconds=old.seconds + new.seconds, calibration_tokens=new.calibration_tokens,
                          device=new.device)


def _stderr(msg: str) -> None:
    print(f"quantkit: {msg}", file=sys.stderr, flush=True)


# ---- the entry point --------------------------------------------------------------------------------------
def quantize_resumable(model_or_name, recipe: str | dict | Recipe = "w4a16-gptq", work_dir: str = "",
                       calibration=None, *, tokenizer=None, device: str | None = None, samples: int | None = None,
                       seq_len: int | None = None, seed: int | None = None, batch_size: int | None = None,
                       progress: bool = True, offload_activations: bool = False,
                       on_block_done: Callable | None = None, log: Callable[[str], None] | None = None):
    """Like :func:`quantkit.quantize`, but resumable through ``work_dir`` (see the module docstring).

    Returns a :class:`quantkit.api.QuantizedModel`; its ``meta["resume"]`` says whether and from which
    block it resumed, or why it started afresh. ``on_block_done(block, model, report, state)`` is called
    after each block is committed.
    """
    from . import api

    if not work_dir:
        raise QuantkitError("quantize_resumable needs a work_dir (e.g. --resume-dir DIR)")
    log = log or _stderr
    recipe, dist, device, lm, ids, calib_info = api._prepare(model_or_name, recipe, calibration, tokenizer, device,
                                                            samples, seq_len, seed, batch_size)
    model = lm.model
    bs = recipe.calibration.batch_size
    store = torch.device("cpu") if offload_activations else device
    t0 = time.time()
    data_free = is_data_free(model, recipe)

    info: dict[str, Any] = {"work_dir": os.path.abspath(work_dir), "resumed_from_block": None,
                            "restart_reason": None}
    if data_free:
        info["restart_reason"] = "data-free recipe: no blocks to resume, ran directly"
        report = quantize_model(model, recipe, ids, device=device, batch_size=bs, progress=progress,
                                offload_activations=offload_activations, dist=dist)
    else:
        os.makedirs(work_dir, exist_ok=True)
        # one run per work dir: rank 0 holds the lock for the whole group
        with (_Lock(work_dir) if dist is None or dist.is_main else contextlib.nullcontext()):
            report = _run(model, recipe, ids, device, store, bs, work_dir, progress, offload_activations,
                          on_block_done, log, info, dist)
    return api._finish(lm, recipe, report, calib_info, device, dist, t0, progress, {"resume": info})


def _act_file(bi: int, dist) -> str:
    if dist is None:
        return f"acts-{bi:05d}.safetensors"
    return f"acts-{bi:05d}-rank{dist.rank}of{dist.world}.safetensors"


def _load_acts(work_dir: str, files: list[str], want: list[int], store) -> list[torch.Tensor]:
    """The saved hidden states of global batches ``want`` (files may come from any number of ranks)."""
    from safetensors import safe_open

    found: dict[int, torch.Tensor] = {}
    need = {f"h.{j}" for j in want}
    for fn in files:
        path = os.path.join(work_dir, fn)
        try:
            with safe_open(path, framework="pt") as f:
                for k in f.keys():
                    if k in need:
                        found[int(k[2:])] = f.get_tensor(k)
        except (OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{path}: unreadable resume file ({e})") from None
    missing = [j for j in want if j not in found]
    if missing:
        raise CheckpointError(f"{work_dir}: the saved activations lack batches {missing[:5]}; remove the work dir "
                              f"to start afresh")
    return [found[j].to(store) for j in want]


def _run(model, recipe, ids, device, store, bs, work_dir, progress, offload, user_cb, log, info,
         dist=None) -> PipelineReport:
    fp = run_fingerprint(model, recipe, ids, device)
    blocks_name, blocks = find_blocks(model)
    n_blocks = len(blocks)
    all_batches = list(ids.split(bs))
    mine = dist.shard(len(all_batches)) if dist is not None else list(range(len(all_batches)))
    main = dist is None or dist.is_main
    # rank 0 reads the state and decides; the other ranks follow its decision
    decision: dict[str, Any] = {"resume": False}
    if main:
        state = read_state(work_dir)
        if state is not None and state.get("fingerprint", {}).get("run") == fp["run"] \
                and state.get("n_blocks") == n_blocks:
            acts = state["acts"]
            decision = {"resume": True, "start": int(state["next_block"]), "specs": dict(state["specs"]),
                        "report": state["report"], "acts": [acts] if isinstance(acts, str) else list(acts),
                        "blocks": list(state["blocks"])}
        else:
            if state is not None:
                reason = _why_different(state.get("fingerprint", {}), fp)
                decision["reason"] = reason
                log(f"{work_dir} holds another run: {reason}; starting afresh")
            elif os.path.exists(os.path.join(work_dir, STATE_FILE)):
                decision["reason"] = "the saved state is unreadable"
                log(f"{work_dir}/{STATE_FILE} is unreadable; starting afresh")
            clear_state(work_dir)
    if dist is not None:
        decision = dist.agree(None, "reading the resume state", decision)[0]
    start, prev, specs, act_files, block_files = 0, PipelineReport(), {}, [], []
    if decision["resume"]:
        start, specs, act_files, block_files = (decision["start"], decision["specs"], decision["acts"],
                                                decision["blocks"])
        prev = _report_from(decision["report"])
        for bi, fn in enumerate(block_files):
            _restore_block(model, os.path.join(work_dir, fn), specs, f"{blocks_name}.{bi}.")
        inputs = _load_acts(work_dir, act_files, mine, store)
        _, kwargs_list = capture_block_inputs(model, blocks, [all_batches[j] for j in mine], device, store)
        info["resumed_from_block"] = start
        if main:
            log(f"resuming from block {start} of {n_blocks} (work dir {work_dir})")
        pipeline_state = (inputs, kwargs_list)
    else:
        info["restart_reason"] = decision.get("reason")
        pipeline_state = None

    def commit(bi: int, mdl: nn.Module, report: PipelineReport, st: tuple) -> None:
        inputs, _ = st
        prefix = f"{blocks_name}.{bi}."
        block = blocks[bi]
        for n, m in block.named_modules():
            if isinstance(m, QuantLinear):
                specs[prefix + n] = {**m.spec, "shape": list(m.shape)}
        bfile = f"block-{bi:05d}.safetensors"
        err = None
        try:
            if main:
                _save_tensors(os.path.join(work_dir, bfile), {prefix + k: v for k, v in block.state_dict().items()})
            afile = _act_file(bi + 1, dist)
            _save_tensors(os.path.join(work_dir, afile), {f"h.{j}": h for j, h in zip(mine, inputs)})
        except Exception as e:  # noqa: BLE001 - shared with the other ranks first
            err = e
        afiles = dist.agree(err, f"saving block {bi}'s resume files", afile) if dist is not None else [afile]
        if err is not None:
            raise err
        if _before_commit is not None:
            _before_commit(bi)
        nonlocal act_files
        merged = _merge(prev, report)
        if main:
            new_state = {"version": STATE_VERSION, "fingerprint": fp, "n_blocks": n_blocks, "next_block": bi + 1,
                         "blocks": block_files + [bfile], "acts": afiles, "specs": specs,
                         "report": asdict(merged)}
            _fsync_write(os.path.join(work_dir, STATE_FILE), json.dumps(new_state, default=str).encode())
            for old in act_files:
                if old not in afiles:
                    try:
                        os.remove(os.path.join(work_dir, old))
                    except OSError:
                        pass
        block_files.append(bfile)
        act_files = afiles
        if user_cb is not None:
            user_cb(bi, mdl, merged, st)

    report = quantize_model(model, recipe, ids, device=device, batch_size=bs, progress=progress,
                            offload_activations=offload, start_block=start, state=pipeline_state,
                            on_block_done=commit, dist=dist)
    return _merge(prev, report)


__all__ = ["clear_state", "model_fingerprint", "quantize_resumable", "read_state", "run_fingerprint"]
