"""Block-by-block sequential calibration. Nothing here knows any algorithm.

:func:`quantize_model` runs four steps, each a function below:

1. :func:`capture` (once, quantkit.capture): the first decoder block's hidden states, and the keyword
   arguments the architecture passes each block (masks, position ids, rotary embeddings, ...; per
   layer type where they differ).
2. :func:`calibrate` (per block, on the compute device): each linear's input statistics, gathered with
   hooks (XᵀX, Σx², max|x|; linears that share an input share one accumulator).
3. ``solver.solve`` (quantkit.solve): the recipe's transforms and quantizer on every linear; the
   pipeline swaps in the returned :class:`QuantLinear` layers.
4. :func:`propagate`: the block plugins, then the block's outputs recomputed with the quantized
   weights: they are the next block's inputs.

Two seams: the *solver* (one process, or ``quantkit.distributed.DistributedSolver`` for a group) and
the *observer* (:class:`BlockObserver`: where to start, told after each block; quantkit.resume).
Only the current block and the activations live on the compute device; the rest stays on CPU.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .capture import capture_blocks, run_block
from .errors import NumericalError, QuantkitError
from .models.discovery import find_blocks, find_linears, linear_weight, set_module
from .moe.calibration import expert_calibration, fallback_schemes
from .nn import QuantLinear
from .quantizers.base import LayerStats
from .recipe import Recipe, Scheme
from .solve import Block, LocalSolver, quantize_linear
from .stats import _StatsCollector
from .transforms.base import block_plugin_from_spec

REF_BATCHES = 4  # calibration batches (per rank) whose float block outputs are kept for block_rel_err


@dataclass
class PipelineReport:
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> spec + metrics
    blocks: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    calibration_tokens: int = 0
    device: str = "cpu"
    world_size: int = 1  # ranks that shared the calibration (quantkit.distributed)
    capture_seconds: float = 0.0  # running the model up to the first block
    experts: dict[str, list[int]] = field(default_factory=dict)  # MoE: container -> routed tokens per expert

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PipelineReport:
        """The report ``dataclasses.asdict`` wrote (e.g. into a resume state): every field it holds."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class Restored:
    """Where an interrupted run stands: the blocks before ``start_block`` are quantized in the model."""

    start_block: int
    inputs: list[torch.Tensor]  # hidden states entering start_block: this process's batches, in shard order
    report: PipelineReport  # the report of the finished blocks; the run goes on adding to it
    float_inputs: list[torch.Tensor] | None = None  # the float stream's hidden states, when a plugin uses it


class BlockObserver:
    """Watches the block loop; quantkit.resume commits every block through one. The pipeline asks it
    once where to start (:meth:`restored`) and tells it after every finished block."""

    def restored(self) -> Restored | None:
        return None

    def on_block_done(self, block: Block, report: PipelineReport, inputs: list[torch.Tensor],
                      float_inputs: list[torch.Tensor] | None = None) -> None:
        """``block`` is quantized and back on CPU; ``inputs`` are the next block's hidden states and
        ``float_inputs`` the float stream's (None unless a block plugin uses it)."""


def is_data_free(model: nn.Module, recipe: Recipe) -> bool:
    """No block plugin and no scheme needs activations: the recipe runs without calibration."""
    return not recipe.block_plugins and not any(
        s.needs_calibration for n in find_linears(model) if (s := recipe.scheme_for(n)) is not None)


def quantize_data_free(model: nn.Module, recipe: Recipe, report: PipelineReport, device, progress: bool,
                       t0: float, source=None, observer: BlockObserver | None = None) -> PipelineReport:
    """No scheme needs activations (e.g. RTN into INT): quantize every targeted linear directly.
    With a block ``source`` (quantkit.stream) it goes block by block: read, quantize, tell ``observer``."""
    report.calibration_tokens = 0
    if source is not None:
        _release_rest(source)  # no capture: the tensors outside the blocks are not needed by the loop
        blocks_name, blocks = find_blocks(model)
        for bi in tqdm(range(len(blocks)), desc="quantize (data-free)", unit="block", disable=not progress):
            module = blocks[bi]
            source.fetch(module)
            prefix = f"{blocks_name}.{bi}."
            for n, mod in find_linears(module, prefix).items():
                if (scheme := recipe.scheme_for(n)) is not None:
                    report.layers[n] = _data_free_layer(model, n, mod, scheme, device)
            if observer is not None:
                observer.on_block_done(Block(bi, module, prefix, {}), report, [])
        _restore_rest(source)  # read back before a linear outside the blocks (e.g. lm_head) is quantized
    linears = {n: m for n, m in find_linears(model).items() if recipe.scheme_for(n) is not None}
    for n in tqdm(linears, desc="quantize (data-free)", unit="layer", disable=not progress or source is not None):
        report.layers[n] = _data_free_layer(model, n, linears[n], recipe.scheme_for(n), device)
    report.seconds = time.time() - t0
    return report


def _data_free_layer(model: nn.Module, n: str, mod: nn.Module, scheme: Scheme, device) -> dict[str, Any]:
    w_dev = linear_weight(mod).device
    mod.to(device)
    ql, info = quantize_linear(n, mod, scheme, LayerStats())
    ql.dense_weight = None
    set_module(model, n, ql.to(w_dev))
    return info


class _Prefetch:
    """Copies a block's weights to the GPU on a side stream from a helper thread, so the copy from
    (pageable) CPU memory overlaps the previous block's work; wait() hands it to the main stream.
    offload() moves a finished block back the same way (pageable device-to-host copies are slow)."""

    def __init__(self, device: torch.device, first: nn.Module, fetch=None):
        self.device = device
        self.fetch = fetch  # reads a streamed block's weights from disk first (quantkit.stream)
        self.stream = torch.cuda.Stream(device)
        self.out_stream = torch.cuda.Stream(device)
        self.out_thread = None
        self.out_error: BaseException | None = None
        self.thread = None
        self.module: nn.Module | None = None
        self.error: BaseException | None = None
        self.start(first)

    def _copy(self, module: nn.Module) -> None:
        try:
            if self.fetch is not None:
                self.fetch(module)
            with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
                module.to(self.device, non_blocking=True)
        except BaseException as e:  # noqa: BLE001 - re-raised by wait()
            self.error = e

    def start(self, module: nn.Module) -> None:
        self.module, self.error = module, None
        self.thread = threading.Thread(target=self._copy, args=(module,), daemon=True)
        self.thread.start()

    def offload(self, module: nn.Module) -> None:
        """Move a finished block back to CPU from a helper thread on another side stream, after the
        main stream's work on it; :meth:`drain` waits for it."""
        self.drain()
        main = torch.cuda.current_stream(self.device)
        done = torch.cuda.Event()
        done.record(main)
        for t in list(module.parameters()) + list(module.buffers()):
            if t.is_cuda:  # read by the copy on the side stream: not reused before it is done
                t.record_stream(self.out_stream)

        def work():
            try:
                with torch.cuda.device(self.device), torch.cuda.stream(self.out_stream):
                    self.out_stream.wait_event(done)
                    module.to("cpu")
            except BaseException as e:  # noqa: BLE001 - re-raised by drain()
                self.out_error = e

        self.out_thread = threading.Thread(target=work, daemon=True)
        self.out_thread.start()

    def drain(self) -> None:
        if self.out_thread is not None:
            self.out_thread.join()
            self.out_thread = None
        if self.out_error is not None:
            e, self.out_error = self.out_error, None
            raise e

    def wait(self, module: nn.Module) -> None:
        if self.module is not module:  # not the one prefetched: plain copy
            if self.fetch is not None:
                self.fetch(module)
            module.to(self.device)
            return
        self.thread.join()
        if self.error is not None:
            raise self.error
        main = torch.cuda.current_stream(self.device)
        main.wait_stream(self.stream)
        for t in list(module.parameters()) + list(module.buffers()):
            if t.is_cuda:  # allocated on the side stream, used (and later freed) on the main one
                t.record_stream(main)
        self.module = None


def _clock(device: torch.device) -> float:
    """Phase times per block, in the report (the device's queue drained first)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def quantize_model(model: nn.Module, recipe: Recipe, calibration: torch.Tensor, *,
                   device: str | torch.device = "cpu", batch_size: int = 8, progress: bool = True,
                   solver=None, observer: BlockObserver | None = None, source=None) -> PipelineReport:
    """Quantize ``model`` in place with ``recipe``, calibrated on token ids ``calibration`` [N, L].

    Block by block: :func:`capture` (once), then :func:`calibrate` -> ``solver.solve`` -> :func:`propagate`.
    ``solver`` (default :class:`quantkit.solve.LocalSolver`) decides which calibration batches this
    process runs, how statistics are combined and where each linear is solved; a
    ``quantkit.distributed.DistributedSolver`` shares the work among the ranks of a group. ``observer``
    (e.g. quantkit.resume's) may restore finished blocks and is told after every block. ``source``
    (quantkit.stream.StreamSource) reads each block's weights when it is reached (``source.fetch(module)``);
    the tensors outside the blocks (embeddings, final norm, lm_head) are sent to the meta device once the
    first block's inputs are captured and read back from the shards before this returns (also on the
    data-free path, where nothing is captured), so they are not in memory during the block loop. If the
    loop raises, they stay on meta (``source.restore_rest()`` reads them back).
    """
    t0 = time.time()
    device = torch.device(device)
    solver = solver if solver is not None else LocalSolver()
    restored = observer.restored() if observer is not None else None
    report = restored.report if restored is not None else PipelineReport()
    prior_seconds = report.seconds
    report.device, report.calibration_tokens, report.world_size = str(device), int(calibration.numel()), solver.world
    blocks_name, blocks = find_blocks(model)
    if is_data_free(model, recipe):
        return quantize_data_free(model, recipe, report, device, progress, t0, source, observer)
    if recipe.block_plugins and solver.world > 1:
        kinds = ", ".join(str(p.get("type", p)) for p in recipe.block_plugins)
        raise QuantkitError(f"{recipe.source}: block_plugins ({kinds}) "
                            f"train on all calibration batches in sequence and do not run on several ranks yet; "
                            f"run this recipe in one process (without torchrun)")
    plugins = [block_plugin_from_spec(p, f"{recipe.source}: block_plugins[{i}]")
               for i, p in enumerate(recipe.block_plugins)]
    acc = {"float32": torch.float32, "float64": torch.float64}[recipe.calibration.accumulate]
    batches = solver.shard(list(calibration.split(batch_size)))
    progress = progress and solver.is_main
    t_cap = time.time()
    inputs, block_kwargs = capture(model, blocks, batches, device)
    report.capture_seconds += time.time() - t_cap
    if source is not None:  # streamed: the embeddings etc. leave memory until the loop is done
        _release_rest(source)
    start = 0
    # the float model's own hidden states, carried beside the quantized ones when a plugin trains on them
    float_stream = any(p.uses_float_stream for p in plugins)
    fp_inputs = list(inputs) if float_stream else None
    if restored is not None:  # the saved hidden states replace the captured ones (the kwargs are the same)
        start, inputs = restored.start_block, [h.to(device) for h in restored.inputs]
        if float_stream and restored.float_inputs is None:
            raise QuantkitError(f"the resume state of this run holds no float-stream activations, which "
                                f"{recipe.source}'s block plugins need; remove the resume dir to start afresh")
        fp_inputs = [h.to(device) for h in restored.float_inputs] if float_stream else None

    prefetch = None
    if device.type == "cuda" and start < len(blocks) and os.environ.get("QUANTKIT_PREFETCH", "1") != "0":
        prefetch = _Prefetch(device, blocks[start], source.fetch if source is not None else None)
    bar = tqdm(range(start, len(blocks)), desc="quantize", unit="block", disable=not progress)
    for bi in bar:
        t_block = _clock(device)
        module = blocks[bi]
        if prefetch is not None:
            prefetch.wait(module)
            if bi + 1 < len(blocks):  # the next block's weights travel while this one is worked on
                prefetch.start(blocks[bi + 1])
        else:
            if source is not None:
                source.fetch(module)
            module.to(device)
        prefix = f"{blocks_name}.{bi}."
        block = Block(bi, module, prefix, find_linears(module, prefix))
        kwargs_list = block_kwargs[bi]
        schemes = _schemes(recipe, block)
        # plugins train on every float output; otherwise only the first REF_BATCHES are kept, for the
        # block error estimate (keeping all would hold a second copy of the activations)
        n_ref = len(inputs) if any(not p.uses_float_stream for p in plugins) else min(len(inputs), REF_BATCHES)
        # MoE: routed-token counts per expert; all-expert statistics unless the recipe turns them off
        with expert_calibration(module, prefix, recipe.moe.calibrate_all_experts) as counts:
            stats, float_outs, t_reduce = calibrate(block, schemes, inputs, kwargs_list, device, acc, n_ref, solver)
        counts = {c: [int(v) for v in solver.reduce_sums([float(x) for x in t.tolist()], f"{c} routed tokens")]
                  for c, t in counts.items()}
        schemes, moe_notes = fallback_schemes(schemes, stats, counts, recipe.moe)  # MoE: few-token experts
        report.experts.update(counts)
        fp_outs = float_forward(module, fp_inputs, kwargs_list, device) if float_stream else None
        for p in plugins:  # e.g. reconstruction keeps the float weights the solve replaces
            p.before_solve(module, {n: linear_weight(block.linears[n]) for n in schemes}, prefix)
        t_solve = _clock(device)
        if solver.world == 1:
            _park_hessians(stats, list(schemes))
        solved = solver.solve(block, schemes, stats)
        errs = []
        for n, (ql, info) in solved.items():
            set_module(model, n, ql.to(device))
            report.layers[n] = {**info, **moe_notes.get(n, {})}
            errs.append(info.get("rel_err", 0.0))
        del stats, solved
        binfo: dict[str, float] = {"block": bi, "calibrate_s": t_solve - t_block, "solve_s": _clock(device) - t_solve,
                                   "reduce_s": t_solve - t_reduce}  # reduce_s: the statistics' all-reduce
        t_prop = _clock(device)
        plugin_metrics, block_rel_err = propagate(block, plugins, inputs, kwargs_list, float_outs, device, solver,
                                                  fp_outs)
        del float_outs
        if float_stream:
            fp_inputs, fp_outs = fp_outs, None
        binfo.update(plugin_metrics)
        binfo["propagate_s"] = _clock(device) - t_prop
        binfo["block_rel_err"] = block_rel_err
        binfo["mean_layer_rel_err"] = sum(errs) / max(len(errs), 1)
        report.blocks.append(binfo)
        if prefetch is not None:
            prefetch.offload(module)
        else:
            module.to("cpu")
        bar.set_postfix(layer_err=f"{binfo['mean_layer_rel_err']:.2e}", block_err=f"{binfo['block_rel_err']:.2e}")
        binfo["finish_s"] = _clock(device) - t_prop - binfo["propagate_s"]  # moving the block back, bookkeeping
        if observer is not None:
            if prefetch is not None:
                prefetch.drain()  # the observer may read the block (resume saves it)
            report.seconds = prior_seconds + time.time() - t0
            observer.on_block_done(block, report, inputs, fp_inputs)
    if prefetch is not None:
        prefetch.drain()
    if device.type == "cuda":  # cached blocks are reused block after block; released once, at the end
        torch.cuda.empty_cache()
    if source is not None:
        _restore_rest(source)  # the model handed back holds its embeddings, final norm and lm_head again
    report.seconds = prior_seconds + time.time() - t0
    return report


def _park_hessians(collector: _StatsCollector, names: list[str]) -> None:
    """Large CPU Hessians that only a later linear of the block reads leave memory until it is solved
    (quantkit.quantizers.gptq.park_hessian: an unlinked temporary file, read back bit for bit on first use),
    instead of waiting through the solves of the linears before it (a 3B model's down_proj: 256 MiB through
    q/k/v, o, gate and up). The first linear solved keeps its own."""
    from .quantizers.gptq import park_hessian

    first = collector.alias.get(names[0], names[0]) if names else None
    for owner, st in collector.stats.items():
        if owner != first and st.hessian is not None and not st.hessian_parked:
            park_hessian(st)


def _release_rest(source) -> None:
    """A streamed model's tensors outside the decoder blocks (embeddings, final norm, lm_head) leave memory
    (quantkit.stream.StreamSource.release_rest) until :func:`_restore_rest` reads them back from the shards:
    the block loop needs none of them once the first block's inputs are captured. A source without the
    pair of methods keeps them."""
    if hasattr(source, "release_rest") and hasattr(source, "restore_rest"):
        source.release_rest()


def _restore_rest(source) -> None:
    if hasattr(source, "restore_rest"):
        source.restore_rest()


def capture(model: nn.Module, blocks: nn.ModuleList, batches: list[torch.Tensor], device
            ) -> tuple[list[torch.Tensor], list[list[dict]]]:
    """Step 1, once: the first block's hidden states for every batch, and every block's keyword
    arguments for every batch (``[block][batch]``; blocks whose arguments equal another's share its dicts)."""
    return capture_blocks(model, blocks, batches, device, device)


def _schemes(recipe: Recipe, block: Block) -> dict[str, Scheme]:
    """The recipe's scheme of each of the block's linears that it quantizes."""
    schemes = {n: recipe.scheme_for(n) for n in block.linears}
    schemes = {n: s for n, s in schemes.items() if s is not None}
    for n in schemes:  # a broken weight is named as such, not as bad activations downstream
        if not torch.isfinite(linear_weight(block.linears[n])).all():
            raise NumericalError(f"{n}: the weight holds NaN/inf; the model is broken")
    return schemes


def calibrate(block: Block, schemes: dict[str, Scheme], inputs: list[torch.Tensor], kwargs_list: list[dict],
              device: torch.device, acc: torch.dtype, n_ref: int, solver
              ) -> tuple[_StatsCollector, list[torch.Tensor], float]:
    """Step 2: run the float block on every batch, gathering each linear's input statistics (combined
    across processes by the solver) and keeping the first ``n_ref`` float outputs. Returns the
    statistics, those outputs and the time the combining started."""
    need_h = {n for n, s in schemes.items() if s.needs_hessian}
    collector = _StatsCollector({n: block.linears[n] for n in schemes}, need_h, acc)
    float_outs = []
    err: BaseException | None = None
    try:
        with torch.no_grad():
            for j, (h, kw) in enumerate(zip(inputs, kwargs_list)):
                collector.new_batch()
                out = run_block(block.module, h.to(device), kw)
                if j < n_ref:
                    float_outs.append(out.to(device))
    except Exception as e:  # noqa: BLE001 - shared with the other processes by the solver, then re-raised
        err = e
    finally:
        collector.remove()
    t_reduce = _clock(device)
    solver.reduce_stats(collector, f"block {block.index} calibration", err)
    collector.finish()
    return collector, float_outs, t_reduce


def float_forward(module: nn.Module, fp_inputs: list[torch.Tensor], kwargs_list: list[dict], device
                  ) -> list[torch.Tensor]:
    """The float block on the float stream's hidden states (before the block is quantized): the float
    model's hidden states after this block, the targets of plugins that train on the float stream."""
    with torch.no_grad():
        return [run_block(module, h.to(device), kw).to(device) for h, kw in zip(fp_inputs, kwargs_list)]


def propagate(block: Block, plugins: list, inputs: list[torch.Tensor], kwargs_list: list[dict],
              float_outs: list[torch.Tensor], device: torch.device, solver,
              fp_outs: list[torch.Tensor] | None = None) -> tuple[dict[str, float], float]:
    """Step 4: run the block plugins (against ``fp_outs``, the float stream, if they use it, else
    ``float_outs``), then the quantized block on every batch: its outputs replace ``inputs`` (the next
    block's). Returns the plugins' metrics and the block's relative output error against the kept
    float outputs (summed over the processes)."""
    metrics: dict[str, float] = {}
    for p in plugins:
        targets = fp_outs if p.uses_float_stream else float_outs
        metrics.update(p.after_block(block.module, inputs, kwargs_list, targets, run_block) or {})
    with torch.no_grad():
        nd = torch.zeros(2, dtype=torch.float64, device=device)
        for j, (h, kw) in enumerate(zip(inputs, kwargs_list)):
            out = run_block(block.module, h.to(device), kw)
            if j < len(float_outs):
                ref = float_outs[j].to(device).float()
                nd[0] += (out.float() - ref).pow(2).sum()
                nd[1] += ref.pow(2).sum()
            inputs[j] = out.to(device)
        num, den = solver.reduce_sums(nd.tolist(), f"block {block.index} output error")
    for m in block.module.modules():
        if isinstance(m, QuantLinear):
            m.dense_weight = None
    return metrics, num / max(den, 1e-30)
