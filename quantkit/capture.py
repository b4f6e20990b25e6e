"""Step 1 of the pipeline: what the decoder blocks receive, captured once.

The first block's hidden states for every calibration batch (the model run up to that block), and
every block's keyword arguments (masks, position ids, rotary embeddings, ...): models whose layers
differ by type (Gemma 2/3: local and global attention) give each type its own, and a block
calibrated with another type's arguments would be a different model.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from .errors import QuantkitError


class _Stop(Exception):
    pass


def tree_map_tensors(fn, obj: Any) -> Any:
    """``fn`` applied to every tensor in nested tuples, lists and dicts (a block's keyword arguments);
    anything else is returned as it is."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(tree_map_tensors(fn, o) for o in obj)
    if isinstance(obj, list):
        return [tree_map_tensors(fn, o) for o in obj]
    if isinstance(obj, dict):
        return {k: tree_map_tensors(fn, v) for k, v in obj.items()}
    return obj


def _tree_to(obj: Any, device) -> Any:
    return tree_map_tensors(lambda t: t.to(device), obj)


def _block_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def run_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    return _block_output(block(hidden, **kwargs))


def _block_kwargs(kwargs: dict, device) -> dict:
    """A block's keyword arguments as the pipeline replays them: no hidden states, no cache, on device."""
    kw = {k: v for k, v in kwargs.items()
          if k not in ("hidden_states", "past_key_values", "past_key_value", "layer_past")}
    kw["use_cache"] = False
    return _tree_to(kw, device)


def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, batches: list[torch.Tensor], device,
                         store_device) -> tuple[list[torch.Tensor], list[dict]]:
    """Run the model up to the first block for each batch; return its hidden states and kwargs."""
    hiddens, kwargs_list = [], []

    def hook(_mod, args, kwargs):
        h = args[0] if args else kwargs.pop("hidden_states")
        hiddens.append(h.detach().to(store_device))
        kwargs_list.append(_block_kwargs(kwargs, device))
        raise _Stop

    # everything but the blocks goes to the device for the capture
    block_ids = {id(m) for b in blocks for m in b.modules()}
    saved = _move_direct(model, block_ids, device)
    h = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for ids in batches:
                try:
                    model(input_ids=ids.to(device), use_cache=False)
                except _Stop:
                    pass
    finally:
        h.remove()
        _restore(saved)  # the untouched originals come back: no copy back from the device
    if len(hiddens) != len(batches):
        raise QuantkitError("the first decoder block was never reached: the model's forward does not "
                            "call its blocks in order; this architecture is not supported")
    return hiddens, kwargs_list


def _move_direct(model: nn.Module, skip_ids: set[int], device) -> list[tuple]:
    """Move the parameters/buffers of every module not in ``skip_ids``, in place (ties survive);
    returns what :func:`_restore` needs to put the original tensors back."""
    saved: list[tuple] = []
    dev = torch.device(device)
    for m in model.modules():
        if id(m) in skip_ids:
            continue
        for p in m._parameters.values():
            if p is not None and p.device != dev:
                saved.append((p, None, p.data))
                p.data = p.data.to(dev)
        for n, b in list(m._buffers.items()):
            if b is not None and b.device != dev:
                saved.append((m, n, b))
                m._buffers[n] = b.to(dev)
    return saved


def _restore(saved: list[tuple]) -> None:
    for owner, name, t in saved:
        if name is None:
            owner.data = t
        else:
            owner._buffers[name] = t


def _same_tree(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and a.device == b.device and bool(torch.equal(a, b)))
    if isinstance(a, (tuple, list)) or isinstance(b, (tuple, list)):
        return (type(a) is type(b) and len(a) == len(b)) and all(_same_tree(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) or isinstance(b, dict):
        return (isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys()
                and all(_same_tree(a[k], b[k]) for k in a))
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - objects without a plain ==: not provably the same
        return a is b


def capture_blocks(model: nn.Module, blocks: nn.ModuleList, batches: list[torch.Tensor], device,
                   store_device) -> tuple[list[torch.Tensor], list[list[dict]]]:
    """The first block's hidden states for every batch and every block's keyword arguments
    (``[block][batch]``), in one pass over the model per batch. Models whose layers differ by type give
    each type its own arguments (Gemma 2/3: local or global RoPE and a sliding-window or full mask per
    layer; GPT-OSS: sliding and full attention): calibrating every block with the first block's would
    run the global layers with the local RoPE, a model the user does not have. Every block's forward is
    replaced by a recorder that returns its input (so no block computes; the pass stops at the last
    block); the first one also keeps the hidden states; arguments equal to an earlier block's are not
    stored twice. Where that pass cannot run (a model that needs its blocks' real outputs between them),
    the model is run to its first block only (:func:`capture_block_inputs`) and the first block's
    arguments serve every block, unless the config names several layer types (then refused)."""
    n = len(blocks)
    per: list[list[dict | None]] = [[None] * len(batches) for _ in range(n)]
    hiddens: list[torch.Tensor | None] = [None] * len(batches)
    uniq: list[list[dict]] = [[] for _ in batches]  # per batch: the distinct argument dicts seen
    state = {"batch": 0}

    def recorder(i):
        def forward(*args, **kwargs):
            h = args[0] if args else kwargs.get("hidden_states")
            b = state["batch"]
            if i == 0:
                hiddens[b] = h.detach().to(store_device)
            kw = _block_kwargs(kwargs, device)
            per[i][b] = next((u for u in uniq[b] if _same_tree(u, kw)), None)
            if per[i][b] is None:
                uniq[b].append(kw)
                per[i][b] = kw
            if i == n - 1:
                raise _Stop
            return h
        return forward

    block_ids = {id(m) for b in blocks for m in b.modules()}
    saved = _move_direct(model, block_ids, device)
    had = [b.__dict__.get("forward") for b in blocks]
    for i, b in enumerate(blocks):
        b.forward = recorder(i)
    failed = None
    try:
        with torch.no_grad():
            for j, ids in enumerate(batches):
                state["batch"] = j
                try:
                    model(input_ids=ids.to(device), use_cache=False)
                except _Stop:
                    pass
    except Exception as e:  # noqa: BLE001 - reported below, with the fallback
        failed = e
    finally:
        for b, f in zip(blocks, had):
            if f is None:
                b.__dict__.pop("forward", None)
            else:
                b.forward = f
        _restore(saved)
    if failed is None and all(kw is not None for row in per for kw in row):
        return hiddens, per
    inputs, first = capture_block_inputs(model, blocks, batches, device, store_device)
    if n > 1:
        types = set(getattr(getattr(model, "config", None), "layer_types", None) or [])
        text_cfg = getattr(getattr(model, "config", None), "text_config", None)
        types |= set(getattr(text_cfg, "layer_types", None) or [])
        if len(types) > 1:
            raise QuantkitError(
                f"this model's layers take different arguments by layer type ({', '.join(sorted(types))}) and "
                f"quantkit could not record each block's (the model's forward failed with its blocks skipped: "
                f"{failed!r:.200}); quantizing it with the first block's arguments everywhere would calibrate "
                f"a different model. Please report the architecture")
        warnings.warn(f"could not record each block's arguments ({failed!r:.200}); the first block's serve "
                      f"every block (the model's config names no per-layer attention types)", stacklevel=3)
    return inputs, [list(first) for _ in range(n)]
