"""Safe reading and atomic writing shared by every layout."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator

import torch

from ..errors import CheckpointError


@contextlib.contextmanager
def atomic_output_dir(path: str, overwrite: bool = False, protect: tuple = ()) -> Iterator[str]:
    """Yield a temporary folder next to ``path``; on success it replaces ``path`` in one rename.

    On any error the temporary folder is removed and ``path`` is left exactly as it was. An
    existing ``path`` is only replaced with ``overwrite=True``, and only if it is an empty folder or
    a quantkit checkpoint (never one of the ``protect`` folders; see checkpoint/safety.py). Stale
    temporary folders of dead processes writing the same ``path`` are removed first.
    """
    from .safety import check_replaceable, clean_stale_temps, temp_prefix, write_failure, write_owner

    path = os.path.abspath(path)
    check_replaceable(path, overwrite, protect)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    clean_stale_temps(path)
    tmp = tempfile.mkdtemp(prefix=temp_prefix(path), dir=parent)
    try:
        write_owner(tmp)
        yield tmp
        os.remove(os.path.join(tmp, ".quantkit-owner.json"))
        for fn in os.listdir(tmp):  # flush file data before the rename makes it visible
            fp = os.path.join(tmp, fn)
            if os.path.isfile(fp):
                with open(fp, "rb") as f:
                    os.fsync(f.fileno())
        if os.path.exists(path):
            old = tempfile.mkdtemp(prefix=temp_prefix(path, "old"), dir=parent)
            write_owner(old)
            os.rename(path, os.path.join(old, "x"))
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        err = write_failure(e, path)
        if err is not None:
            raise err from e
        raise


def write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False, default=str)
        f.write("\n")


def read_config(path: str) -> dict:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such checkpoint folder")
    if not os.path.exists(cfg_path):
        raise CheckpointError(f"{path}: config.json is missing; this is not a model/checkpoint folder")
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{cfg_path}: expected a JSON object")
    return cfg


def safetensors_files(path: str) -> list[str]:
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        bins = [f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth", ".pkl"))]
        extra = f" (found {', '.join(bins)}: pickle files are never loaded)" if bins else ""
        raise CheckpointError(f"{path}: no .safetensors file{extra}")
    return [os.path.join(path, f) for f in files]


def safe_load_tensors(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of every .safetensors file in ``path`` (validated, never unpickled)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for fp in safetensors_files(path):
        size = os.path.getsize(fp)
        if size < 8:
            raise CheckpointError(f"{fp}: truncated ({size} bytes); re-create the checkpoint")
        try:
            tensors = load_file(fp)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{fp}: corrupt or truncated safetensors file ({e}); re-create the "
                                  f"checkpoint") from None
        dup = set(tensors) & set(out)
        if dup:
            raise CheckpointError(f"{fp}: tensor {sorted(dup)[0]!r} appears in two files")
        out.update(tensors)
    return out
