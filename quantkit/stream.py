"""Models larger than memory (issue 17): read each decoder block from the checkpoint's shards when the
pipeline reaches it, and write each quantized block to the output as soon as it is done.

* :class:`StreamSource` — the model skeleton on the meta device; the tensors outside the decoder blocks
  (embeddings, final norm, ``lm_head`` — tied or in another shard) read at once; each block's tensors
  read by :meth:`StreamSource.fetch` (``safe_open``, only that block's keys, in the requested dtype) when
  the pipeline reaches it. Sharded folders (``model.safetensors.index.json``) and single files both work.
* :class:`StreamWriter` — a block observer (quantkit.pipeline.BlockObserver) that writes every finished
  block's tensors (native layout names) into its own shard of a temporary output folder and then
  releases the block (its tensors go to the meta device); :meth:`StreamWriter.finish` writes the other
  tensors (those still as the source read them copied from its shards in pieces,
  :meth:`StreamSource.rest_pieces`: the lazily mapped embeddings are not paged in whole at the end),
  ``config.json`` and ``model.safetensors.index.json`` and renames the folder into place
  (checkpoint.io.atomic_output_dir). With a resume dir, a block's shard is a hard link of the block file
  the resume observer committed (one copy on disk; a copy only across file systems).

Under torchrun every rank reads its own copy of each block (``dist_read="all"``, the default: the ranks
of a host share one page cache, and safetensors pages in only what is touched) or rank 0 reads it and
broadcasts it (``"rank0"``, :class:`RankZeroReader`); docs/perf/stream-dist-2026-12-06.md compares them.

Peak CPU memory: one float block (two while the next one is prefetched to a GPU) + the calibration
activations (+ the packed blocks so far when the output is not streamed) + the quantizer's working set;
the float tensors outside the blocks (embeddings, final norm, lm_head) are in memory only to capture the
first block's inputs and again at the end (:meth:`StreamSource.release_rest` / :meth:`~StreamSource.restore_rest`,
called by quantkit.pipeline). docs/PERFORMANCE.md ("Streaming") has the measurement.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import weakref
from typing import Any

import torch
from torch import nn

from .errors import CheckpointError, QuantkitError
from .models.discovery import find_blocks
from .moe import Experts, load_fused, unfuse_experts
from .moe.names import from_checkpoint
from .nn import QuantLinear
from .pipeline import BlockObserver, PipelineReport, Restored
from .shards import INDEX_FILE, _corrupt, stored_key_files, where, write_shard
from .shards import shard_pieces as _shard_pieces
from .solve import Block, release_freed_memory

_IGNORABLE = re.compile(r"(^|\.)(rotary_emb\.inv_freq|attn\.masked_bias|attn\.bias|position_ids)$")


def read_tensors(files: dict[str, list[str]], dtype: torch.dtype, strip: str = "") -> dict[str, torch.Tensor]:
    """The named tensors of each file (``{file: [keys]}``), float ones cast to ``dtype``."""
    from safetensors import SafetensorError, safe_open

    out = {}
    for fp, keys in files.items():
        try:
            with safe_open(fp, framework="pt") as f:
                for k in keys:
                    t = f.get_tensor(k)
                    out[k[len(strip):]] = t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise _corrupt(fp, e) from None
    return out


DIST_READS = ("all", "rank0")
PIECE_BYTES = 256 << 20  # --dist-read rank0: a tensor is broadcast in pieces of at most this many bytes


def check_dist_read(value) -> str:
    """``value`` if it is one of :data:`DIST_READS`, else one clear error."""
    if value not in DIST_READS:
        raise QuantkitError(f"dist_read={value!r}: use 'all' (under torchrun every rank reads its own copy of each "
                            f"block from the shards; the default) or 'rank0' (rank 0 reads each block and broadcasts "
                            f"it to the other ranks); on the command line --dist-read all|rank0")
    return value


class RankZeroReader:
    """``--dist-read rank0``: rank 0 alone opens the shards; every read is broadcast to the other ranks,
    first the names, dtypes and shapes (or rank 0's error, which every rank then raises), then each
    tensor's bytes in pieces of at most :data:`PIECE_BYTES`. Receiving ranks allocate each tensor from
    the broadcast shape and receive straight into it (gloo), or through one staging buffer of at most a
    piece on the rank's GPU (NCCL), so a huge tensor never needs a second full-size buffer. The
    broadcasts run in a process group of their own: the GPU prefetch reads the next block from a
    helper thread while the main thread's collectives run in the default group."""

    def __init__(self, d):
        import torch.distributed as dist

        self.d = d
        self.comm = d.comm_device
        self.group = dist.new_group(backend=d.backend)  # every rank makes it, in the same order (open_model)
        self.seconds = 0.0  # spent in this rank's reads and broadcasts
        self.bytes = 0

    def read(self, read_fn, what: str) -> dict[str, torch.Tensor]:
        import time

        import torch.distributed as dist

        t0 = time.perf_counter()
        d, tensors, err, layout = self.d, None, None, None
        if d.is_main:
            try:
                tensors = read_fn()
                layout = [(k, str(t.dtype).replace("torch.", ""), list(t.shape)) for k, t in tensors.items()]
            except Exception as e:  # noqa: BLE001 - sent to every rank, then re-raised
                err = e
        obj = [(None if err is None else f"{type(err).__name__}: {err}", layout)]
        ctx = torch.cuda.device(self.comm) if self.comm.type == "cuda" else contextlib.nullcontext()
        with ctx, d._guard(f"reading {what} on rank 0 (--dist-read rank0)"):
            dist.broadcast_object_list(obj, src=0, group=self.group, device=self.comm)
        msg, layout = obj[0]
        if err is not None:
            raise err
        if msg is not None:
            raise CheckpointError(f"rank 0 could not read {what} for every rank (--dist-read rank0): {msg}")
        out = {}
        with ctx, d._guard(f"broadcasting {what} from rank 0 (--dist-read rank0)"):
            biggest = max((_nbytes(dt, sh) for _, dt, sh in layout), default=0)
            stage = (torch.empty(min(biggest, PIECE_BYTES), dtype=torch.uint8, device=self.comm)
                     if self.comm.type != "cpu" and biggest else None)
            for name, dt, shape in layout:
                t = tensors.pop(name).contiguous() if d.is_main else torch.empty(shape, dtype=_dtype(dt))
                b = t.reshape(-1).view(torch.uint8)  # bytes of the tensor itself (no copy)
                for off in range(0, b.numel(), PIECE_BYTES):
                    piece = b[off:off + PIECE_BYTES]
                    if stage is None:
                        dist.broadcast(piece, src=0, group=self.group)
                    else:
                        buf = stage[:piece.numel()]
                        if d.is_main:
                            buf.copy_(piece)
                        dist.broadcast(buf, src=0, group=self.group)
                        if not d.is_main:
                            piece.copy_(buf)
                out[name] = t
                self.bytes += b.numel()
        self.seconds += time.perf_counter() - t0
        return out


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def _nbytes(dt: str, shape: list[int]) -> int:
    return math.prod(int(s) for s in shape) * _dtype(dt).itemsize


def _meta_names(module: nn.Module) -> list[str]:
    return [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.device.type == "meta"]


class StreamSource:
    """A float model folder opened for streaming: ``model`` is the skeleton with every tensor outside the
    decoder blocks loaded and the blocks on the meta device until :meth:`fetch`.

    Raises :class:`StreamUnsupported` (the caller then loads the model whole) when the stored tensor names
    are not exactly the model's own (transformers would rename or initialise some).

    Mixture-of-experts: the skeleton's fused expert containers (those ``ignore`` does not name) are split
    into per-expert linears on the meta device first (``moe_found``). A checkpoint that stores the experts
    one by one under those names (Qwen2/3-MoE, OLMoE, DeepSeek-V3) is read directly; one that stores them
    fused, as the model holds them (gpt-oss), is read fused and split as each block is fetched. Stored names
    that are the hub's, not the modules' (Mixtral's ``block_sparse_moe.experts.{i}.w1``), are mapped to the
    module names by quantkit.moe.names (``key_file`` is keyed on module names, ``stored`` maps them back)."""

    def __init__(self, path: str, dtype: torch.dtype = torch.float32, ignore: list[str] | None = None,
                 dist=None, dist_read: str = "all"):
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        self.path, self.dtype = path, dtype
        # --dist-read rank0 under a group of 2+ ranks: rank 0 reads, the others receive (RankZeroReader)
        self.reader = RankZeroReader(dist) if check_dist_read(dist_read) == "rank0" and dist is not None \
            and dist.world > 1 else None
        files = stored_key_files(path)
        try:
            cfg = AutoConfig.from_pretrained(path)
            with init_empty_weights(include_buffers=False):
                model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        except Exception as e:  # noqa: BLE001 - whatever a bad config makes transformers raise
            raise CheckpointError(f"{path}/config.json: cannot build the model ({type(e).__name__}: "
                                  f"{str(e)[:300]})") from None
        model.eval()
        if getattr(model.config, "tie_word_embeddings", False):
            model.tie_weights()  # from_config under init_empty_weights leaves them untied
        mt = getattr(cfg, "model_type", None)
        self.stored = {from_checkpoint(k, mt): k for k in files}  # module name -> stored name
        if len(self.stored) != len(files):
            raise StreamUnsupported("two stored tensor names map to one module name")
        self.key_file = {k: files[v] for k, v in self.stored.items()}
        self.model = model
        self.blocks_name, self.blocks = find_blocks(model)
        self._index = {id(b): i for i, b in enumerate(self.blocks)}
        self.moe_found: list[str] = []
        self._fused_on_disk = False
        try:
            self._check_names()  # the names as transformers builds the model (fused experts, if any)
            fused_ok = True
        except StreamUnsupported as e:
            fused_ok, why = False, e
        from .recipe import matches

        self.moe_found = unfuse_experts(model, skip=lambda n: matches(ignore or [], n))  # MoE: split on meta
        if self.moe_found and fused_ok:
            self._fused_on_disk = True  # _wanted: the fused names as stored, split in fetch
        elif self.moe_found:
            self._check_names()  # experts stored one by one under the split names
        elif not fused_ok:
            raise why
        # the stored tensors outside the decoder blocks (embeddings, final norm, an untied lm_head)
        self._rest = [k for k in self.key_file if not k.startswith(self.blocks_name + ".") and k in self._wanted]
        self.rest_released = False
        self._load_rest()

    def _load_rest(self) -> None:
        model = self.model
        tensors = self._read(self._rest, what="the tensors outside the decoder blocks")
        model.load_state_dict(tensors, strict=False, assign=True)
        del tensors
        if getattr(model.config, "tie_word_embeddings", False):
            model.tie_weights()
        left = [n for n in _meta_names(model) if not n.startswith(self.blocks_name + ".")]
        if left:
            raise CheckpointError(f"{self.path}: tensors missing from the checkpoint: {', '.join(left[:5])}")
        # where each tensor read from the shards lives: StreamWriter.finish copies these from the shards
        sd = model.state_dict()
        self._rest_at = {where(sd[k]): k for k in self._rest if k in sd}
        _SOURCES[model] = weakref.ref(self)  # weakly: the source holds the model

    def rest_pieces(self, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        """For each of ``tensors`` that is one the shards' tensors outside the blocks as this source read it
        (the same storage: nothing replaced it since), a function yielding its bytes as the model holds
        them, read from the shard in pieces of at most :data:`PIECE_BYTES` (cast to the model's dtype
        piece by piece, as the read casts the whole): StreamWriter.finish writes those instead of the
        tensor's own memory. safetensors maps a shard's tensors into memory lazily, so writing a 3B
        model's 0.73 GiB embedding from the tensor would page all of it into this process's RSS at the end
        of the run; read with ``pread`` it passes through the page cache only. Under ``--dist-read rank0``
        (rank 0 received nothing it could re-read on the others) and after :meth:`release_rest`: none."""
        if self.reader is not None or self.rest_released:
            return {}
        out = {}
        for name, t in tensors.items():
            k = self._rest_at.get(where(t))
            if k is not None:
                out[name] = _shard_pieces(self.key_file[k], self.stored[k], t.dtype, tuple(t.shape), PIECE_BYTES // 16)
        return out

    def release_rest(self) -> None:
        """The tensors read from the shards outside the decoder blocks (embeddings, final norm, an untied
        ``lm_head``) go to the meta device (tied ones stay tied), so they leave memory while the block loop
        runs: the pipeline needs them only to capture the first block's inputs. Read in the dtype they are
        stored in, safetensors maps them lazily and only the pages touched are in RSS (the capture's rows);
        cast on reading (a bf16 checkpoint read in the default float32) they are a full copy in memory, a
        3B model's tied embeddings 1.47 GiB. :meth:`restore_rest` reads them back (the same values, in the
        same dtype); the pipeline does so before it returns, so the model it hands back holds its weights."""
        if self.rest_released:
            return
        model = self.model
        ids: set[int] = set()
        for k in self._rest:
            mod_name, _, leaf = k.rpartition(".")
            owner = model.get_submodule(mod_name) if mod_name else model
            t = owner._parameters.get(leaf) if leaf in owner._parameters else owner._buffers.get(leaf)
            if t is not None and t.device.type != "meta":
                ids.add(id(t))
        blocks = self.blocks_name + "."
        repl: dict[int, torch.Tensor] = {}  # one meta tensor per released one: ties survive
        for name, m in model.named_modules():
            if (name + ".").startswith(blocks):
                continue
            for store in (m._parameters, m._buffers):
                for leaf, t in list(store.items()):
                    if t is None or id(t) not in ids:
                        continue
                    if id(t) not in repl:
                        meta = torch.empty_like(t, device="meta")
                        repl[id(t)] = nn.Parameter(meta, requires_grad=t.requires_grad) \
                            if isinstance(t, nn.Parameter) else meta
                    store[leaf] = repl[id(t)]
        del repl, ids
        self.rest_released = True
        release_freed_memory()

    def restore_rest(self) -> None:
        """Read back what :meth:`release_rest` sent to the meta device (nothing if it did not)."""
        if not self.rest_released:
            return
        self._load_rest()
        self.rest_released = False

    def _check_names(self) -> None:
        sd = self.model.state_dict()
        groups: dict[int, set[str]] = {}  # tied weights: one parameter under several names
        named = list(self.model.named_parameters(remove_duplicate=False)) + list(
            self.model.named_buffers(remove_duplicate=False))
        for k, t in named:
            groups.setdefault(id(t), set()).add(k)
        owner = {k: id(t) for k, t in named}
        stored = set(self.key_file)
        missing = [k for k in sd if not (groups.get(owner.get(k), {k}) & stored)]
        unexpected = [k for k in stored - set(sd) if not _IGNORABLE.search(k)]
        if missing or unexpected:
            raise StreamUnsupported(f"stored tensor names differ from the model's (missing {missing[:3]}, "
                                    f"unexpected {unexpected[:3]})")
        self._wanted = set(sd)

    def _read(self, keys, strip: str = "", what: str = "tensors") -> dict[str, torch.Tensor]:
        """The tensors of module names ``keys`` (read under their stored names), ``strip`` cut off; with
        ``--dist-read rank0`` read by rank 0 and broadcast to the others."""
        by_file: dict[str, list[str]] = {}
        for k in keys:
            by_file.setdefault(self.key_file[k], []).append(self.stored[k])
        back = {self.stored[k]: k for k in keys}

        def read():
            return {back[k][len(strip):]: t for k, t in read_tensors(by_file, self.dtype).items()}
        return read() if self.reader is None else self.reader.read(read, what)

    def fetch(self, module: nn.Module) -> None:
        """Read decoder block ``module``'s tensors from the shards (nothing if it holds none on meta)."""
        if not _meta_names(module):
            return
        bi = self._index.get(id(module))
        if bi is None:
            raise QuantkitError("internal: StreamSource.fetch was given a module that is not one of its blocks")
        prefix = f"{self.blocks_name}.{bi}."
        keys = [k for k in self.key_file if k.startswith(prefix) and k in self._wanted]
        release_freed_memory()  # what was freed since the last block (the first time: the capture's) goes first
        tensors = self._read(keys, prefix, what=f"block {bi}")
        module.load_state_dict(tensors, strict=False, assign=True)
        if self._fused_on_disk:  # MoE: each split container filled from its fused tensors as stored
            for name, ex in module.named_modules():
                if isinstance(ex, Experts) and _meta_names(ex):
                    load_fused(ex, {k[len(name) + 1:]: t for k, t in tensors.items()
                                    if k.startswith(name + ".") and "." not in k[len(name) + 1:]}, prefix + name)
        left = _meta_names(module)
        if left:
            raise CheckpointError(f"{self.path}: tensors missing from the checkpoint: "
                                  f"{', '.join(prefix + n for n in left[:5])}")

    def fingerprint(self) -> str:
        """The resume fingerprint of the model: config.json, and every shard's header, size and mtime
        (hashing 100+ GB of weights at every start would cost minutes; a rewritten shard changes its mtime)."""
        import struct

        h = hashlib.sha256()
        with open(os.path.join(self.path, "config.json"), "rb") as f:
            cfg = json.loads(f.read())
        h.update(json.dumps({k: v for k, v in cfg.items() if k not in ("_name_or_path", "transformers_version")},
                            sort_keys=True).encode())
        h.update(str(self.dtype).encode())
        for fp in sorted(set(self.key_file.values())):
            st = os.stat(fp)
            with open(fp, "rb") as f:
                n = struct.unpack("<Q", f.read(8))[0]
                h.update(f.read(min(n, 100_000_000)))
            h.update(f"{os.path.basename(fp)}:{st.st_size}:{st.st_mtime_ns}".encode())
        return "stream-" + h.hexdigest()[:20]


# model -> weak reference to the StreamSource that read it (StreamWriter.finish asks it for rest_pieces)
_SOURCES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class StreamUnsupported(Exception):
    """This folder cannot be streamed (the reason is the message); it is loaded whole instead."""


def native_block_tensors(module: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """A module's state as the native layout names it (a QuantLinear buffer's ``__`` back to ``.``)."""
    ql = {n for n, m in module.named_modules() if isinstance(m, QuantLinear)}
    out = {}
    for k, v in module.state_dict().items():
        mod, _, leaf = k.rpartition(".")
        out[prefix + (f"{mod}.{leaf.replace('__', '.')}" if mod in ql else k)] = v.detach().contiguous().cpu()
    return out


def _save_shard(fp: str, tensors: dict[str, torch.Tensor], pieces: dict[str, Any] | None = None) -> None:
    """``tensors`` into safetensors file ``fp``; ``pieces`` (StreamSource.rest_pieces): those tensors' bytes
    are copied from the source shards piece by piece (quantkit.shards.write_shard)."""
    write_shard(fp, tensors, {"format": "pt", "quantkit": "1"}, pieces)


class StreamWriter(BlockObserver):
    """Writes the native layout while the pipeline runs (see the module docstring). A context manager:
    entering opens the temporary output folder (checks ``overwrite``/``protect`` first); leaving with an
    error removes it and leaves ``path`` as it was; :meth:`finish` completes and renames it into place.
    ``resume_dir``: the resume observer's committed block files are linked instead of written again."""

    def __init__(self, path: str, model: nn.Module, *, overwrite: bool = False, protect: tuple = (),
                 resume_dir: str | None = None, main: bool = True):
        self.path, self.model, self.overwrite, self.protect = os.path.abspath(path), model, overwrite, protect
        self.resume_dir, self.main = resume_dir, main
        self.blocks_name, blocks = find_blocks(model)
        self.n_blocks = len(blocks)
        self.n_files = self.n_blocks + 1
        self.weight_map: dict[str, str] = {}
        self.layers: dict[str, Any] = {}
        self.total = 0
        self._cm = None
        self.tmp: str | None = None

    def __enter__(self) -> StreamWriter:
        if self.main:
            from .checkpoint.io import atomic_output_dir

            self._cm = atomic_output_dir(self.path, overwrite=self.overwrite, protect=self.protect)
            self.tmp = self._cm.__enter__()
        return self

    def __exit__(self, et, ev, tb) -> None:
        if self._cm is not None and et is not None:
            cm, self._cm = self._cm, None
            cm.__exit__(et, ev, tb)

    def _file(self, k: int) -> str:
        return f"model-{k + 1:05d}-of-{self.n_files:05d}.safetensors"

    def _record(self, fn: str, tensors: dict[str, torch.Tensor]) -> None:
        for k, v in tensors.items():
            self.weight_map[k] = fn
            self.total += v.numel() * v.element_size()

    def _specs(self, module: nn.Module, prefix: str) -> None:
        for n, m in module.named_modules():
            if isinstance(m, QuantLinear):
                self.layers[prefix + n] = {**m.spec, "shape": list(m.shape)}

    def restored(self, restored: Restored | None) -> None:
        """Blocks an earlier run committed to the resume dir: linked into the output, released here."""
        if restored is None:
            return
        blocks = find_blocks(self.model)[1]
        for bi in range(restored.start_block):
            self._add_block(Block(bi, blocks[bi], f"{self.blocks_name}.{bi}.", {}))

    def on_block_done(self, block: Block, report: PipelineReport, inputs: list[torch.Tensor],
                      float_inputs: list[torch.Tensor] | None = None) -> None:
        self._add_block(block)

    def _add_block(self, block: Block) -> None:
        self._specs(block.module, block.prefix)
        if self.main:
            tensors = native_block_tensors(block.module, block.prefix)
            fn = self._file(block.index)
            dst = os.path.join(self.tmp, fn)
            src = os.path.join(self.resume_dir, f"block-{block.index:05d}.safetensors") if self.resume_dir else None
            if src is not None and os.path.exists(src) and _same_keys(src, tensors):
                try:
                    os.link(src, dst)  # the resume dir's committed block file is the shard: one copy on disk
                except OSError:
                    shutil.copyfile(src, dst)
            else:
                _save_shard(dst, tensors)
            self._record(fn, {k: v for k, v in tensors.items()})
            del tensors
        block.module.to("meta")  # the block leaves memory
        release_freed_memory()


    def finish(self, meta: dict[str, Any], write_extra) -> str:
        """Write the tensors outside the blocks, config.json and the index; ``write_extra(tmp)`` adds the
        tokenizer and run records; then the folder is renamed into place. Returns the output path."""
        from .checkpoint.hf import dedupe_tied
        from .checkpoint.native import native_config

        model = self.model
        rest_mods = {n: m for n, m in model.named_modules() if not (n + ".").startswith(self.blocks_name + ".")}
        for n, m in rest_mods.items():
            if isinstance(m, QuantLinear):
                self.layers[n] = {**m.spec, "shape": list(m.shape)}
        if self.main:
            sd = {}
            for k, v in model.state_dict().items():
                if k.startswith(self.blocks_name + "."):
                    continue
                mod, _, leaf = k.rpartition(".")
                sd[f"{mod}.{leaf.replace('__', '.')}" if mod in self.layers else k] = v
            sd = dedupe_tied(sd)
            fn = self._file(self.n_blocks)
            src = _SOURCES.get(model)  # streamed: the tensors as read from the shards are copied from there
            src = src() if src is not None else None
            _save_shard(os.path.join(self.tmp, fn), sd, src.rest_pieces(sd) if src is not None else None)
            self._record(fn, sd)
            from .checkpoint.io import write_json

            write_json(os.path.join(self.tmp, INDEX_FILE),
                       {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(self.weight_map.items()))})
            write_json(os.path.join(self.tmp, "config.json"), native_config(model, meta, self.layers))
            write_extra(self.tmp)
            cm, self._cm = self._cm, None
            cm.__exit__(None, None, None)
        return self.path


def _same_keys(fp: str, tensors: dict[str, torch.Tensor]) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(fp, framework="pt") as f:
            return set(f.keys()) == set(tensors)
    except (OSError, ValueError, RuntimeError):
        return False


class Observers(BlockObserver):
    """Several observers in order; where to start comes from the first (the resume observer); the
    stream writer is told about restored blocks."""

    def __init__(self, first: BlockObserver | None, writer: StreamWriter):
        self.first, self.writer = first, writer

    def restored(self) -> Restored | None:
        r = self.first.restored() if self.first is not None else None
        self.writer.restored(r)
        return r

    def on_block_done(self, block: Block, report: PipelineReport, inputs: list[torch.Tensor],
                      float_inputs: list[torch.Tensor] | None = None) -> None:
        if self.first is not None:
            self.first.on_block_done(block, report, inputs, float_inputs)
        self.writer.on_block_done(block, report, inputs, float_inputs)


LOADS = ("stream", "whole")


def open_model(name_or_path: str, load: str | None, dtype: torch.dtype | None, ignore: list[str] | None = None,
               dist=None, dist_read: str = "all"):
    """(LoadedModel, StreamSource or None, what was done) for a bundled name or a model folder.

    ``load``: ``"stream"`` (the default for a folder), ``"whole"`` (the default for a bundled name:
    ``from_pretrained`` of everything). A folder whose stored names are not the model's own (transformers
    renames them) or that misses tensors is loaded whole, and the reason recorded. ``dist`` (the group,
    quantkit.distributed.Dist) and ``dist_read`` ("all" or "rank0": :class:`RankZeroReader`) say how a
    streamed folder is read under torchrun; in one process, or for a whole load, ``dist_read`` changes
    nothing (the record says so)."""
    from .models.integrity import _ALLOWED, check_config
    from .models.sources import LoadedModel, load_float_model, load_tokenizer, read_source, resolve_model_dir

    if load is not None and load not in LOADS:
        raise QuantkitError(f"load={load!r}: use 'stream' (read each block when it is reached) or 'whole' "
                            f"(load the model first); --load stream|whole")
    dtype = dtype or torch.float32
    is_dir = os.path.isdir(name_or_path)
    load = load or ("stream" if is_dir else "whole")
    info: dict[str, Any] = {"load": load, "dtype": str(dtype).replace("torch.", "")}
    if load == "stream":
        path = resolve_model_dir(name_or_path)
        check_config(path)
        if _ALLOWED.get():
            info.update(load="whole", why_not_streamed="--allow-missing given: missing tensors are initialised by "
                                                       "transformers, which needs the whole load")
        else:
            try:
                src = StreamSource(path, dtype, ignore, dist=dist, dist_read=dist_read)
            except StreamUnsupported as e:
                info.update(load="whole", why_not_streamed=str(e))
            else:
                if dist is not None and dist.world > 1:
                    info["dist_read"] = dist_read
                elif dist_read != "all":
                    info["dist_read"] = f"{dist_read} (ignored: one process)"
                tok = load_tokenizer(path)
                return LoadedModel(src.model, tok, path, read_source(path, tok)), src, info
    if dist_read != "all":
        info["dist_read"] = f"{dist_read} (ignored: the model is loaded whole by every rank)"
    return load_float_model(name_or_path, dtype), None, info
