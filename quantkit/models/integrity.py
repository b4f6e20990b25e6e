"""Is a float model folder complete? Every tensor the model needs is stored, nothing stored is left over.

transformers initialises a weight that is missing from the checkpoint at random and reports it only
in its load report (which ``TRANSFORMERS_VERBOSITY=error`` hides); a model whose
``quantization_config`` was removed loads its packed tensors as "unexpected" and runs on random
layers. Here both become one error naming the tensors, from two sources:

* transformers' own load report (``output_loading_info=True``): missing, unexpected, mismatched keys;
* an independent comparison of the safetensors headers with the model's state dict (when the stored
  names are the model's names, i.e. transformers renamed nothing): a parameter that is stored under
  none of the names sharing its storage (tied weights such as ``lm_head`` / ``embed_tokens``) is missing.

Known leftovers that carry no weights (``rotary_emb.inv_freq``, GPT-2's ``attn.bias`` /
``attn.masked_bias`` masks, a class's ``_keys_to_ignore_on_load_unexpected``) are not errors. Tensors
known to be absent can be allowed explicitly: ``allow_missing=["lm_head.weight"]`` (glob patterns on
the full tensor name) or ``quantkit ... --allow-missing PATTERN``.
"""

from __future__ import annotations

import contextlib
import contextvars
import fnmatch
import json
import os
import re
from collections.abc import Iterable, Iterator
from typing import Any

from ..errors import CheckpointError, ModelSourceError

_ALLOWED: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("quantkit_allow_missing", default=())
# stored tensors that are not weights of any model (buffers older transformers saved)
_IGNORABLE = [re.compile(p) for p in (r"(^|\.)rotary_emb\.inv_freq$", r"(^|\.)attn\.masked_bias$",
                                      r"(^|\.)attn\.bias$", r"(^|\.)position_ids$")]
# tensor names that only quantized checkpoints hold
_QUANTIZED_SUFFIXES = (".qweight", ".qzeros", ".scales", ".g_idx", ".weight_packed", ".weight_scale",
                       ".weight_zero_point", ".weight_shape", ".zeros", ".lut", ".input_scale")


@contextlib.contextmanager
def allow_missing(patterns: Iterable[str] | None) -> Iterator[None]:
    """Within the block, float model loads accept missing/unexpected tensors matching ``patterns``."""
    tok = _ALLOWED.set(tuple(_ALLOWED.get()) + tuple(patterns or ()))
    try:
        yield
    finally:
        _ALLOWED.reset(tok)


def check_config(path: str) -> dict[str, Any]:
    """config.json of a float model folder, refused if it says the folder is a quantized checkpoint."""
    p = os.path.join(path, "config.json")
    try:
        with open(p) as f:
            cfg = json.load(f)
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise ModelSourceError(f"{p}: cannot read it as JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ModelSourceError(f"{p}: expected a JSON object")
    if "quantization_config" in cfg:
        qc = cfg["quantization_config"]
        if not isinstance(qc, dict):
            raise CheckpointError(f"{p}: quantization_config must be a mapping with a quant_method, got "
                                  f"{type(qc).__name__} {str(qc)[:60]!r}; restore the quantization_config the "
                                  f"checkpoint was written with, or delete the key if the weights are float")
        qm = qc.get("quant_method")
        if qm != "gguf":  # the bundled GGUF conversions drop it; a leftover gguf tag is harmless
            raise CheckpointError(f"{path} is a quantized checkpoint (quantization_config.quant_method {qm!r}), not "
                                  f"a float model: load it with quantkit.load / `quantkit eval`, and quantize its "
                                  f"float source instead of it")
    return cfg


def stored_keys(path: str) -> set[str]:
    """Names of the tensors in the folder's safetensors files (headers only)."""
    from safetensors import safe_open

    keys: set[str] = set()
    for fn in sorted(os.listdir(path)):
        if fn.endswith(".safetensors"):
            with safe_open(os.path.join(path, fn), framework="pt") as f:
                keys.update(f.keys())
    return keys


def _allowed(key: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


def _names(keys: Iterable[str], n: int = 6) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def check_loaded(model, path: str, info: dict[str, Any], allow: Iterable[str] | None = None) -> None:
    """Raise if ``model`` (just loaded from ``path`` with ``info``, transformers' load report) lacks a
    stored tensor for any weight, or the folder holds tensors the model has no place for."""
    allow = tuple(allow or ()) + tuple(_ALLOWED.get())
    ignore = _IGNORABLE + [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])]
    stored = stored_keys(path)
    sd = model.state_dict()
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    groups: dict[tuple, set[str]] = {}
    for k, t in sd.items():
        groups.setdefault((t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)), set()).add(k)
    alias = {k: g for g in groups.values() for k in g}

    def ignorable(k: str) -> bool:
        return any(r.search(k) for r in ignore)

    r_missing = set(info.get("missing_keys") or ())
    r_unexpected = {k for k in (info.get("unexpected_keys") or ()) if not ignorable(k)}
    mismatched = [m for m in (info.get("mismatched_keys") or ()) if not _allowed(str(m[0] if isinstance(m, (
        tuple, list)) else m), allow)]
    by_name_unexpected = {k for k in stored - set(sd) if not ignorable(k)}
    renamed = not by_name_unexpected <= r_unexpected  # transformers mapped stored names onto other names
    by_name_missing = set() if renamed else {k for k in sd if k in params and not (alias.get(k, {k}) & stored)}
    missing = {k for k in r_missing | by_name_missing if not _allowed(k, allow)}
    unexpected = {k for k in (r_unexpected | (set() if renamed else by_name_unexpected)) if not _allowed(k, allow)}
    if not (missing or unexpected or mismatched):
        return
    quantized = sorted(k for k in unexpected if k.endswith(_QUANTIZED_SUFFIXES))
    if quantized:
        raise CheckpointError(
            f"{path} holds quantized tensors ({_names(quantized, 3)}) but its config.json has no "
            f"quantization_config: loading it as a float model would run randomly initialised layers. The "
            f"quantization_config was removed or damaged; restore it (the config.json quantkit wrote) and load the "
            f"folder as a quantized checkpoint")
    parts = []
    if missing:
        parts.append(f"missing (they would be randomly initialised): {_names(missing)}")
    if unexpected:
        parts.append(f"stored but not part of a {type(model).__name__}: {_names(unexpected)}")
    if mismatched:
        parts.append("of the wrong shape: " + ", ".join(
            f"{m[0]} {tuple(m[1])} (model {tuple(m[2])})" if isinstance(m, (tuple, list)) and len(m) == 3 else str(m)
            for m in mismatched[:6]))
    raise ModelSourceError(
        f"{path}: the weights do not match the model of its config.json; tensors {'; '.join(parts)}. The folder is "
        f"incomplete or its config.json belongs to another model: re-export it. If these tensors are known to be "
        f"absent or unused, allow them explicitly with --allow-missing PATTERN (allow_missing=[...] in Python)")
