"""The solve seam: one decoder block's linears and their statistics in, quantized layers out.

The pipeline (quantkit.pipeline) is given a *solver* and calls, for every block,
``solver.solve(block, schemes, stats) -> {name: (QuantLinear, report entry)}``. Two implement it:

* :class:`LocalSolver` (here): every linear in this process;
* ``quantkit.distributed.DistributedSolver``: the linears (or row ranges of large ones) split over
  the ranks of a torch.distributed group, the results broadcast to every rank.

A solver also owns what differs between one process and a group for the rest of the block loop:
which calibration batches this process runs (:meth:`LocalSolver.shard`), how statistics and the block
error are summed (:meth:`LocalSolver.reduce_stats`, :meth:`LocalSolver.reduce_sums`). A solve's result
is a :class:`Solution`; :meth:`Solution.build` is where it becomes a :class:`QuantLinear` (through
:func:`quantkit.nn.make_quantlinear`, the one constructor every layout and resume use too).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .errors import NumericalError
from .formats.base import packed_bits_per_weight
from .models.discovery import linear_weight
from .nn import QuantLinear, make_quantlinear
from .quantizers.base import LayerStats, all_finite
from .transforms.base import LayerContext

if TYPE_CHECKING:
    from .recipe import Scheme


@dataclass
class Block:
    """The decoder block being quantized: its index, module, name prefix and float linears by full name."""

    index: int
    module: nn.Module
    prefix: str
    linears: dict[str, nn.Module]


@dataclass
class Solution:
    """One linear's solve result: what its QuantLinear is built from, and its entry in the report."""

    spec: dict[str, Any]  # quantizer, format and the transforms' run-time steps
    packed: dict[str, torch.Tensor]  # the tensors that go to disk
    dense: torch.Tensor | None  # the dequantized weight, in the float weight's dtype
    info: dict[str, Any]  # spec, bits_per_weight, shape and the quantizer's metrics

    def build(self, mod: nn.Module) -> QuantLinear:
        """The QuantLinear replacing the float linear ``mod`` (its bias copied)."""
        w = linear_weight(mod)
        bias = mod.bias.detach().clone() if getattr(mod, "bias", None) is not None else None
        return make_quantlinear(tuple(w.shape), self.spec, self.packed, bias, dense_weight=self.dense)


def solve_linear(name: str, mod: nn.Module, scheme: Scheme, stats: LayerStats, seed: int = 0,
                 drop_float: bool = False) -> Solution:
    """Run ``scheme``'s transforms and quantizer on the float linear ``mod`` (statistics ``stats``).
    ``drop_float``: once its float32 copy is made, ``mod``'s weight goes to the meta device (see
    :func:`drop_float_weight`); the QuantLinear that replaces ``mod`` is built from the solution."""
    w = linear_weight(mod).detach().float()
    if not all_finite(w):
        raise NumericalError(f"{name}: the weight holds NaN/inf; the model is broken")
    if drop_float:
        drop_float_weight(mod)
    scheme.fmt.check_shape(tuple(w.shape), where=name)
    ctx = LayerContext(name, w, stats, seed)
    for t in scheme.transforms:
        t.before(ctx)
    try:
        res = scheme.quantizer.quantize(ctx.weight, scheme.fmt, ctx.stats)
    except NumericalError as e:
        raise NumericalError(f"{name}: {e}") from None
    packed = {k: v.contiguous() for k, v in {**res.packed, **ctx.tensors}.items()}
    spec = {**scheme.spec(), "transforms": ctx.runtime}
    info = {**spec, "bits_per_weight": packed_bits_per_weight(packed, tuple(w.shape)), "shape": list(w.shape),
            **res.metrics}
    return Solution(spec, packed, res.weight.to(linear_weight(mod).dtype), info)


def drop_float_weight(mod: nn.Module) -> None:
    """``mod``'s weight replaced by one on the meta device (same shape and dtype, no values): the float
    linear being solved is replaced by its QuantLinear, which needs only its shape, dtype and bias; on a
    CPU run its weight would otherwise stay in memory until the block is done (with the earlier
    linears' dequantized copies and the largest linear's solve)."""
    p = getattr(mod, "weight", None)
    if isinstance(p, nn.Parameter) and p.device.type != "meta":
        mod.weight = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)


def quantize_linear(name: str, mod: nn.Module, scheme: Scheme, stats: LayerStats, seed: int = 0,
                    drop_float: bool = False) -> tuple[QuantLinear, dict[str, Any]]:
    """One linear, solved here: (its QuantLinear, with ``dense_weight`` set; its report entry)."""
    sol = solve_linear(name, mod, scheme, stats, seed, drop_float=drop_float)
    return sol.build(mod), sol.info


class LocalSolver:
    """Every linear of the block in this process (no torch.distributed group)."""

    world = 1
    is_main = True

    def shard(self, batches: list[torch.Tensor]) -> list[torch.Tensor]:
        """The calibration batches this process runs: all of them."""
        return batches

    def reduce_stats(self, collector, what: str, err: BaseException | None) -> None:
        """Combine the block's statistics across processes: nothing to combine; a failure is raised."""
        if err is not None:
            raise err

    def reduce_sums(self, values: list[float], what: str) -> list[float]:
        return values

    def solve(self, block: Block, schemes: dict[str, Scheme], stats) -> dict[str, tuple[QuantLinear, dict]]:
        """``stats.get(name)`` gives each linear's :class:`LayerStats`; the seed is the block index. Where
        ``stats`` has ``release(name, later)`` (the pipeline's collector), each linear's statistics are
        handed back once no later linear reads them: the Hessians are freed one by one, not with the block.
        On CPU each float linear's weight goes to the meta device once its float32 copy is made (the
        pipeline replaces the linear by its QuantLinear after this; nothing reads the float values)."""
        out = {}
        names = list(schemes)
        release = getattr(stats, "release", None)
        for i, n in enumerate(names):
            cpu = linear_weight(block.linears[n]).device.type == "cpu"
            out[n] = quantize_linear(n, block.linears[n], schemes[n], stats.get(n), seed=block.index,
                                     drop_float=cpu)
            if release is not None:
                release(n, names[i + 1:])
            if cpu:
                release_freed_memory()  # a linear's freed working copies, handed back before the next one's
        return out


def _libc():
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def release_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc ``malloc_trim``; nothing elsewhere): temporaries under
    glibc's mmap threshold (32 MiB once raised) otherwise stay in the process's RSS. Called after each
    solved linear on CPU and around each streamed block (quantkit.stream)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


__all__ = ["Block", "LocalSolver", "Solution", "drop_float_weight", "quantize_linear", "release_freed_memory",
           "solve_linear"]
