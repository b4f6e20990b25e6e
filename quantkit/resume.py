"""Resumable quantization: an interrupted run picks up after the last finished decoder block.

``quantkit.quantize(model, recipe, resume_dir=work_dir)`` hands the pipeline a :class:`ResumeObserver`
(quantkit.pipeline.BlockObserver): it restores what an earlier run committed and, after every block,
commits to ``work_dir``:

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

import glob
import hashlib
import json
import os
import sys
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import torch
from torch import nn

from .errors import CheckpointError, QuantkitError
from .models.discovery import find_blocks, set_module
from .nn import QuantLinear, make_quantlinear
from .pipeline import BlockObserver, PipelineReport, Restored
from .recipe import Recipe
from .solve import Block
from .stream import native_block_tensors
from .version import __version__

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


def run_fingerprint(model: nn.Module, recipe: Recipe, ids: torch.Tensor, device: torch.device,
                    model_fp: str | None = None) -> dict[str, Any]:
    parts = {
        "model": model_fp or model_fingerprint(model),
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


# ---- the observer ---------------------------------------------------------------------------------------
def _stderr(msg: str) -> None:
    print(f"quantkit: {msg}", file=sys.stderr, flush=True)


def _act_file(bi: int, dist) -> str:
    if dist is None:
        return f"acts-{bi:05d}.safetensors"
    return f"acts-{bi:05d}-rank{dist.rank}of{dist.world}.safetensors"


def _load_acts(work_dir: str, files: list[str], want: list[int], key: str = "h") -> list[torch.Tensor]:
    """The saved hidden states of global batches ``want`` (files may come from any number of ranks);
    ``key`` "h": the quantized model's, "f": the float stream's."""
    from safetensors import safe_open

    found: dict[int, torch.Tensor] = {}
    need = {f"{key}.{j}" for j in want}
    for fn in files:
        path = os.path.join(work_dir, fn)
        try:
            with safe_open(path, framework="pt") as f:
                for k in f.keys():
                    if k in need:
                        found[int(k[len(key) + 1:])] = f.get_tensor(k)
        except (OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{path}: unreadable resume file ({e})") from None
    missing = [j for j in want if j not in found]
    if missing:
        raise CheckpointError(f"{work_dir}: the saved activations lack batches {missing[:5]}; remove the work dir "
                              f"to start afresh")
    return [found[j] for j in want]


def _restore_block(model: nn.Module, path: str, specs: dict[str, Any], prefix: str) -> None:
    tensors = _load_tensors(path)
    mine = {n: s for n, s in specs.items() if n.startswith(prefix)}
    for name, spec in mine.items():
        p = name + "."
        packed = {k[len(p):].replace("__", "."): tensors.pop(k) for k in list(tensors)
                  if k.startswith(p) and k != p + "bias"}
        bias = tensors.pop(p + "bias", None)
        set_module(model, name, make_quantlinear(tuple(spec["shape"]), {k: v for k, v in spec.items() if k != "shape"},
                                                 packed, bias, checkpoint=path, name=name))
    meta = any(t.device.type == "meta" for t in model.get_submodule(prefix.rstrip(".")).state_dict().values())
    res = model.load_state_dict(tensors, strict=False, assign=meta)  # a streamed block is still on meta
    if res.unexpected_keys:
        raise CheckpointError(f"{path}: tensors {res.unexpected_keys[:3]} do not belong to this model")


class ResumeObserver(BlockObserver):
    """Commits every finished block to ``work_dir`` and restores an earlier run's committed blocks.

    Used as a context manager around the pipeline: entering takes the work dir's lock (rank 0 for the
    whole group), reads the state, decides whether to resume (rank 0; the others follow) and restores
    the committed blocks into ``model``; :attr:`info` then says whether and from which block it
    resumed, or why it started afresh. ``dist`` is the group (quantkit.distributed.Dist) or None;
    ``log`` gets the messages (default: stderr)."""

    def __init__(self, work_dir: str, model: nn.Module, recipe: Recipe, ids: torch.Tensor, device: torch.device,
                 dist=None, log: Callable[[str], None] | None = None, model_fp: str | None = None):
        if not work_dir:
            raise QuantkitError("resume_dir must name a folder (e.g. --resume-dir DIR)")
        self.work_dir, self.model, self.dist, self.log = work_dir, model, dist, log or _stderr
        self.main = dist is None or dist.is_main
        self.fp = run_fingerprint(model, recipe, ids, device, model_fp)  # model_fp: a streamed model's
        self.blocks_name, blocks = find_blocks(model)
        self.n_blocks = len(blocks)
        n_batches = len(ids.split(recipe.calibration.batch_size))
        self.mine = dist.shard(n_batches) if dist is not None else list(range(n_batches))
        self.info: dict[str, Any] = {"work_dir": os.path.abspath(work_dir), "resumed_from_block": None,
                                     "restart_reason": None}
        self.specs: dict[str, Any] = {}
        self.act_files: list[str] = []
        self.block_files: list[str] = []
        self._restored: Restored | None = None
        self._lock = None

    # ---- the lock and the decision ------------------------------------------------------------------
    def __enter__(self) -> ResumeObserver:
        os.makedirs(self.work_dir, exist_ok=True)
        if self.main:  # one run per work dir: rank 0 holds the lock for the whole group
            self._lock = _Lock(self.work_dir).__enter__()
        try:
            self._decide_and_restore()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self._lock is not None:
            self._lock.__exit__(*exc)
            self._lock = None

    def _decide_and_restore(self) -> None:
        work_dir, fp, dist = self.work_dir, self.fp, self.dist
        # rank 0 reads the state and decides; the other ranks follow its decision
        decision: dict[str, Any] = {"resume": False}
        if self.main:
            state = read_state(work_dir)
            if state is not None and state.get("fingerprint", {}).get("run") == fp["run"] \
                    and state.get("n_blocks") == self.n_blocks:
                acts = state["acts"]
                decision = {"resume": True, "start": int(state["next_block"]), "specs": dict(state["specs"]),
                            "report": state["report"], "acts": [acts] if isinstance(acts, str) else list(acts),
                            "blocks": list(state["blocks"]), "float_stream": bool(state.get("float_stream"))}
            else:
                if state is not None:
                    reason = _why_different(state.get("fingerprint", {}), fp)
                    decision["reason"] = reason
                    self.log(f"{work_dir} holds another run: {reason}; starting afresh")
                elif os.path.exists(os.path.join(work_dir, STATE_FILE)):
                    decision["reason"] = "the saved state is unreadable"
                    self.log(f"{work_dir}/{STATE_FILE} is unreadable; starting afresh")
                clear_state(work_dir)
        if dist is not None:
            decision = dist.agree(None, "reading the resume state", decision)[0]
        if not decision["resume"]:
            self.info["restart_reason"] = decision.get("reason")
            return
        start = decision["start"]
        self.specs, self.act_files, self.block_files = decision["specs"], decision["acts"], decision["blocks"]
        for bi, fn in enumerate(self.block_files):
            _restore_block(self.model, os.path.join(work_dir, fn), self.specs, f"{self.blocks_name}.{bi}.")
        inputs = _load_acts(work_dir, self.act_files, self.mine)
        floats = _load_acts(work_dir, self.act_files, self.mine, "f") if decision.get("float_stream") else None
        self.info["resumed_from_block"] = start
        if self.main:
            self.log(f"resuming from block {start} of {self.n_blocks} (work dir {work_dir})")
        self._restored = Restored(start, inputs, PipelineReport.from_dict(decision["report"]), floats)

    # ---- the observer ---------------------------------------------------------------------------------
    def restored(self) -> Restored | None:
        return self._restored

    def on_block_done(self, block: Block, report: PipelineReport, inputs: list[torch.Tensor],
                      float_inputs: list[torch.Tensor] | None = None) -> None:
        """Commit ``block``: its state (rank 0), this rank's activations (and the float stream's, when
        there is one), then state.json (rank 0)."""
        work_dir, dist, bi = self.work_dir, self.dist, block.index
        for n, m in block.module.named_modules():
            if isinstance(m, QuantLinear):
                self.specs[block.prefix + n] = {**m.spec, "shape": list(m.shape)}
        bfile = f"block-{bi:05d}.safetensors"
        afile = _act_file(bi + 1, dist)
        err = None
        try:
            if self.main:
                # native layout names: a streamed save links this file as the block's shard (quantkit.stream)
                _save_tensors(os.path.join(work_dir, bfile), native_block_tensors(block.module, block.prefix))
            acts = {f"h.{j}": h for j, h in zip(self.mine, inputs)}
            if float_inputs is not None:
                acts.update({f"f.{j}": h for j, h in zip(self.mine, float_inputs)})
            _save_tensors(os.path.join(work_dir, afile), acts)
        except Exception as e:  # noqa: BLE001 - shared with the other ranks first
            err = e
        afiles = dist.agree(err, f"saving block {bi}'s resume files", afile) if dist is not None else [afile]
        if err is not None:
            raise err
        if _before_commit is not None:
            _before_commit(bi)
        if self.main:
            new_state = {"version": STATE_VERSION, "fingerprint": self.fp, "n_blocks": self.n_blocks,
                         "next_block": bi + 1, "blocks": self.block_files + [bfile], "acts": afiles,
                         "specs": self.specs, "report": asdict(report), "float_stream": float_inputs is not None}
            _fsync_write(os.path.join(work_dir, STATE_FILE), json.dumps(new_state, default=str).encode())
            for old in self.act_files:
                if old not in afiles:
                    try:
                        os.remove(os.path.join(work_dir, old))
                    except OSError:
                        pass
        self.block_files.append(bfile)
        self.act_files = afiles


__all__ = ["ResumeObserver", "clear_state", "model_fingerprint", "read_state", "run_fingerprint"]
