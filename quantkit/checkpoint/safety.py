"""What an output folder may replace, stale temporary folders, and failed writes in plain words.

* ``--overwrite`` / ``save(overwrite=True)`` replaces only an empty folder or a folder that is
  recognisably a quantkit checkpoint (``config.json`` with a ``quantization_config`` of a layout
  quantkit writes, ``quantkit_source.json``, and nothing but files quantkit writes), and never the
  folder of the input model (or a folder that holds it).
* Every temporary folder quantkit creates is named ``.<out>.tmp-<pid>-<random>`` (and, while an old
  checkpoint is moved aside, ``.<out>.old-<pid>-<random>``) and holds an owner file with the pid,
  the host and the process start time. A later write to the same ``<out>`` removes those whose
  process is gone (same host, pid dead or reused); a live one is left alone.
* A write that fails (disk full, file too large, permission) becomes one ``CheckpointError``
  saying what happened; safetensors' own ``SafetensorError`` included.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import socket

from ..errors import CheckpointError

log = logging.getLogger("quantkit")

OWNER_FILE = ".quantkit-owner.json"
# files quantkit writes into a checkpoint folder (any layout); anything else means it is not only ours
_CHECKPOINT_FILES = {"config.json", "model.safetensors", "quantize_config.json", "quantkit_source.json",
                     "quantkit_run.json", "generation_config.json", "special_tokens_map.json", "vocab.json",
                     "merges.txt", "chat_template.jinja", "chat_template.json", "added_tokens.json", "spiece.model",
                     "sentencepiece.bpe.model", "model.safetensors.index.json"}
# a streamed save's shards (quantkit.stream): model-00001-of-00029.safetensors
_SHARD = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
_TEMP = re.compile(r"^\.(?P<base>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-[^/]*$")


# ---- what may be replaced --------------------------------------------------------------------------------
def _quant_methods() -> set[str]:
    from ..registry import get, names

    return {getattr(get("layout", n), "QUANT_METHOD", n) for n in names("layout")}


def _is_tokenizer_file(fn: str) -> bool:
    return fn.startswith("tokenizer") and "/" not in fn


def describe_checkpoint(path: str) -> str | None:
    """A short description if ``path`` is a quantkit checkpoint folder, else None."""
    try:
        with open(os.path.join(path, "config.json")) as f:
            cfg = json.load(f)
        with open(os.path.join(path, "quantkit_source.json")) as f:
            json.load(f)
    except (OSError, ValueError):
        return None
    qc = cfg.get("quantization_config") if isinstance(cfg, dict) else None
    if not isinstance(qc, dict) or qc.get("quant_method") not in _quant_methods():
        return None
    what = qc.get("recipe_name")
    return f"a quantkit checkpoint ({qc['quant_method']} layout{f', recipe {what}' if what else ''})"


def _inside(child: str, parent: str) -> bool:
    child, parent = os.path.realpath(child), os.path.realpath(parent)
    return child == parent or child.startswith(parent.rstrip(os.sep) + os.sep)


def check_replaceable(path: str, overwrite: bool, protect: list[str | None] | tuple = ()) -> str | None:
    """Raise unless writing to ``path`` is safe; return what would be replaced (None: nothing).

    ``protect``: folders that must survive (the input model's folder): ``path`` may be neither one of
    them nor a folder that holds one."""
    for p in protect:
        if p and os.path.exists(p) and _inside(p, path):
            same = os.path.realpath(p) == os.path.realpath(path)
            raise CheckpointError(
                f"{path} {'is' if same else 'holds'} the input model's folder ({p}); writing the checkpoint there "
                f"would destroy the model being quantized. Choose another output folder")
    if not os.path.lexists(path):
        return None
    if not overwrite:
        raise CheckpointError(f"{path} already exists; choose another output folder or pass --overwrite")
    if not os.path.isdir(path) or os.path.islink(path):
        raise CheckpointError(f"{path} exists and is not a folder; --overwrite only replaces a quantkit checkpoint "
                              f"folder; remove it yourself or choose another output folder")
    entries = sorted(os.listdir(path))
    if not entries:
        return "an empty folder"
    desc = describe_checkpoint(path)
    if desc is None:
        raise CheckpointError(
            f"{path} is not a quantkit checkpoint (no config.json with a quantkit-written quantization_config and "
            f"quantkit_source.json); --overwrite only replaces quantkit checkpoints or empty folders. Remove it "
            f"yourself if you mean it, or choose another output folder")
    foreign = [e for e in entries if not (e in _CHECKPOINT_FILES or _is_tokenizer_file(e) or _SHARD.match(e))
               or not os.path.isfile(os.path.join(path, e))]
    if foreign:
        raise CheckpointError(
            f"{path} is {desc} but also holds {', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''}, which "
            f"quantkit did not write; --overwrite would delete them. Move them away or choose another output folder")
    return desc


# ---- temporary folders -----------------------------------------------------------------------------------
def _start_time(pid: int) -> float | None:
    try:
        import psutil

        return psutil.Process(pid).create_time()
    except Exception:  # noqa: BLE001 - no psutil, or the process is gone
        return None


def _alive(pid: int, started: float | None) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    if started is not None:
        now = _start_time(pid)
        if now is not None and abs(now - started) > 1.0:
            return False  # the pid was reused by a later process
    return True


def write_owner(tmp: str) -> None:
    with open(os.path.join(tmp, OWNER_FILE), "w") as f:
        json.dump({"pid": os.getpid(), "host": socket.gethostname(), "started": _start_time(os.getpid())}, f)


def temp_prefix(path: str, kind: str = "tmp") -> str:
    return f".{os.path.basename(path)}.{kind}-{os.getpid()}-"


def clean_stale_temps(path: str) -> list[str]:
    """Remove ``.<out>.tmp-<pid>-*`` / ``.<out>.old-<pid>-*`` folders next to ``path`` whose process is gone."""
    path = os.path.abspath(path)
    parent, base = os.path.dirname(path), os.path.basename(path)
    removed = []
    try:
        entries = os.listdir(parent)
    except OSError:
        return removed
    for e in entries:
        m = _TEMP.match(e)
        if not m or m.group("base") != base:
            continue
        full = os.path.join(parent, e)
        if not os.path.isdir(full) or os.path.islink(full):
            continue
        pid, host, started = int(m.group("pid")), None, None
        try:
            with open(os.path.join(full, OWNER_FILE)) as f:
                owner = json.load(f)
            pid, host, started = int(owner.get("pid", pid)), owner.get("host"), owner.get("started")
        except (OSError, ValueError, TypeError, AttributeError):
            pass
        if host is not None and host != socket.gethostname():
            continue  # another machine's process (shared file system): cannot tell, leave it
        if pid == os.getpid() or _alive(pid, started):
            continue
        moved = os.path.join(full, "x")  # an .old- folder: the previous checkpoint, moved aside
        if m.group("kind") == "old" and os.path.isdir(moved) and not os.path.lexists(path):
            os.rename(moved, path)  # the process died between the two renames: put it back
            log.warning("quantkit: restored %s from %s (left by process %d, which is gone)", path, full, pid)
        shutil.rmtree(full, ignore_errors=True)
        if not os.path.exists(full):
            removed.append(full)
            log.warning("quantkit: removed %s, a temporary folder left by process %d, which is gone", full, pid)
    return removed


# ---- failed writes ---------------------------------------------------------------------------------------
_REASONS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
            errno.EFBIG: "a file grew beyond the allowed file size", errno.EROFS: "the file system is read-only",
            errno.EACCES: "permission denied", errno.EPERM: "permission denied"}


def write_failure(e: BaseException, path: str) -> CheckpointError | None:
    """The CheckpointError for an exception raised while writing ``path`` (None: not a write failure)."""
    if isinstance(e, CheckpointError):
        return None
    code = e.errno if isinstance(e, OSError) else None
    if code is None:
        try:
            from safetensors import SafetensorError
        except ImportError:  # pragma: no cover
            return None
        if not isinstance(e, SafetensorError):
            return None
        text = str(e)
        m = re.search(r"(?:code: |os error )(\d+)", text)
        code = int(m.group(1)) if m else None
        if code is None and "No space left" in text:
            code = errno.ENOSPC
    why = _REASONS.get(code, (e.strerror if isinstance(e, OSError) and e.strerror else None) or
                       "the write failed")
    return CheckpointError(f"writing {path} failed: {why} ({type(e).__name__}: {str(e)[:200]}); nothing was changed "
                           f"at {path} (an existing checkpoint there is intact) and no temporary folder is left; "
                           f"free space or fix the folder and retry")
