"""Safe reading and atomic writing shared by every layout."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator

import torch

from ..errors import CheckpointError


@contextlib.contextmanager
def atomic_output_dir(path: str, overwrite: bool = False) -> Iterator[str]:
    """Yield a temporary folder next to ``path``; on success it replaces ``path`` in one rename.

    On any error the temporary folder is removed and ``path`` is left exactly as it was. An
    existing ``path`` is only replaced with ``overwrite=True`` (moved aside first, deleted after).
    """
    path = os.path.abspath(path)
    if os.path.exists(path) and not overwrite:
        raise CheckpointError(f"{path} already exists; choose another output folder or pass --overwrite")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        yield tmp
        for fn in os.listdir(tmp):  # flush file data before the rename makes it visible
            fp = os.path.join(tmp, fn)
            if os.path.isfile(fp):
                with open(fp, "rb") as f:
                    os.fsync(f.fileno())
        if os.path.exists(path):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=parent)
            os.rename(path, os.path.join(old, "x"))
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and not isinstance(e, CheckpointError):
            why = "the disk is full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else (e.strerror or str(e))
            raise CheckpointError(f"writing {path} failed: {why} ({e}); nothing was changed at {path} (an "
                                  f"existing checkpoint there is intact); free space or fix the folder and retry"
                                  ) from e
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
