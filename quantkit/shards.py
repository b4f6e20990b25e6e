"""Safetensors shards at the byte level, for streaming (quantkit.stream, issue 17): which file holds which
tensor (:func:`stored_key_files`), and a tensor copied from a shard to a new shard in pieces read with
``os.pread`` (:func:`shard_pieces`, :func:`write_shard`), so that a large tensor which safetensors maps into
memory lazily (the embeddings) is never paged into the process whole just to be written out again."""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from .errors import CheckpointError, QuantkitError

INDEX_FILE = "model.safetensors.index.json"


def stored_key_files(path: str) -> dict[str, str]:
    """Every stored tensor name -> the safetensors file holding it (the index when there is one, else
    the headers of every ``*.safetensors`` file in the folder). Every shard's header is checked here."""
    idx = os.path.join(path, INDEX_FILE)
    if os.path.exists(idx):
        try:
            with open(idx) as f:
                wm = json.load(f)["weight_map"]
            if not isinstance(wm, dict):
                raise TypeError("weight_map is not a mapping")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{idx}: unreadable shard index ({e}); re-export the model or pass "
                                  f"load='whole' (--load whole)") from None
        out = {}
        for k, fn in wm.items():
            fp = os.path.join(path, fn) if isinstance(fn, str) else ""
            if not isinstance(fn, str) or os.path.dirname(fn) or not os.path.exists(fp):
                raise CheckpointError(f"{idx}: tensor {k!r} is in shard {fn!r}, which is not a file in {path}")
            out[k] = fp
        for fp in sorted(set(out.values())):  # a truncated shard fails now, not when its block is reached
            keys = _shard_keys(fp)
            listed = [k for k, f in out.items() if f == fp and k not in keys]
            if listed:
                raise CheckpointError(f"{fp}: the index {INDEX_FILE} places tensor {listed[0]!r} in this shard but the "
                                      f"shard does not hold it; re-download or re-export the checkpoint (the index "
                                      f"and the shards must come from the same save)")
        return out
    out = {}
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no .safetensors file (pickle files are never loaded)")
    for fn in files:
        fp = os.path.join(path, fn)
        for k in _shard_keys(fp):
            if k in out:
                raise CheckpointError(f"{fp}: tensor {k!r} appears in two files ({out[k]} too); remove the stray "
                                      f"file or re-export the checkpoint")
            out[k] = fp
    return out


def _corrupt(fp: str, e: BaseException) -> CheckpointError:
    return CheckpointError(f"{fp}: corrupt or truncated safetensors file ({type(e).__name__}: {str(e)[:200]}); "
                           f"re-download or re-export this shard (an interrupted copy or download leaves it short: "
                           f"compare its size with the source's)")


def _shard_keys(fp: str) -> set[str]:
    """The tensor names in one safetensors file (its header only; safetensors checks the header's
    offsets against the file's size, so a truncated file fails here)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(fp, framework="pt") as f:
            return set(f.keys())
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise _corrupt(fp, e) from None


def where(t: torch.Tensor) -> tuple:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)


_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}
_FROM_ST = {v: k for k, v in _ST_DTYPES.items()}


def shard_layout(fp: str) -> tuple[int, dict]:
    """(where the data of safetensors file ``fp`` starts, its header)."""
    with open(fp, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return 8 + n, json.loads(f.read(n))


def shard_pieces(fp: str, stored: str, dtype: torch.dtype, shape: tuple, piece_bytes: int = 16 << 20):
    """A function yielding tensor ``stored`` of shard ``fp``'s bytes as ``dtype`` (a float cast piece by
    piece, each piece a whole number of elements of at most ``piece_bytes``), read with ``os.pread`` (no
    memory map: the bytes pass through the page cache, not the process's RSS)."""

    def pieces():
        start, header = shard_layout(fp)
        spec = header[stored]
        src = _FROM_ST.get(spec["dtype"])
        if src is None or tuple(spec["shape"]) != shape:
            raise CheckpointError(f"{fp}: tensor {stored!r} changed on disk while the model was quantized")
        b0, b1 = spec["data_offsets"]
        item = src.itemsize
        step = max(item, piece_bytes // item * item)
        fd = os.open(fp, os.O_RDONLY)
        try:
            for off in range(b0, b1, step):
                raw = os.pread(fd, min(step, b1 - off), start + off)
                if len(raw) != min(step, b1 - off):
                    raise CheckpointError(f"{fp}: truncated while tensor {stored!r} was copied from it")
                if src != dtype:
                    t = torch.frombuffer(bytearray(raw), dtype=src).to(dtype)
                    raw = t.view(torch.uint8).numpy().tobytes()
                yield raw
        finally:
            os.close(fd)
    return pieces


def write_shard(fp: str, tensors: dict[str, torch.Tensor], meta: dict[str, str], pieces: dict[str, Any] | None = None
                ) -> None:
    """``tensors`` into safetensors file ``fp`` (metadata ``meta``). ``pieces`` (name -> a function yielding
    the tensor's bytes, :func:`shard_pieces`): those tensors' bytes come from there, written piece by piece,
    not from their memory; the file is then written here in safetensors' own layout (header, then the
    tensors by decreasing element size and name). Without ``pieces``: safetensors' ``save_file``."""
    if not pieces:
        from safetensors.torch import save_file

        return save_file(tensors, fp, metadata=meta)
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header: dict[str, Any] = {"__metadata__": meta}
    off = 0
    for k in order:
        t = tensors[k]
        if t.dtype not in _ST_DTYPES:
            raise QuantkitError(f"internal: cannot write tensor {k!r} of dtype {t.dtype}")
        nb = t.numel() * t.element_size()
        header[k] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + nb]}
        off += nb
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(fp, "wb") as f:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        for k in order:
            t, want = tensors[k], header[k]["data_offsets"][1] - header[k]["data_offsets"][0]
            if k in pieces:
                got = 0
                for b in pieces[k]():
                    f.write(b)
                    got += len(b)
                if got != want:
                    raise CheckpointError(f"{fp}: tensor {k!r}: {got} bytes copied from its shard, {want} expected")
            elif want:
                f.write(memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()))
