"""Distributed calibration on torch.distributed: NCCL on GPUs, gloo on CPU, launched by torchrun.

``torchrun --nproc-per-node N --no-python quantkit quantize MODEL -r RECIPE -o OUT`` runs the same command on
N ranks. Every rank loads the model and the calibration ids, then for each decoder block
(:func:`quantkit.pipeline.quantize_model` does the steps, this module the communication):

1. **data parallel statistics**: rank r runs calibration batches r, r+N, r+2N, ... through the float
   block; each linear's statistics are summed across ranks (``all_reduce``): XᵀX and Σx² in the
   recipe's ``calibration.accumulate`` dtype (float32, or float64, in which the per-batch float32
   partial sums add exactly, so the result does not depend on how batches were split), max|x| by max
   and token counts as int64;
2. **split solves**: :func:`plan_solves` gives each linear, or a range of rows of a large one, to
   one rank, balancing an estimate of the solve's cost; owners quantize their pieces, then every
   piece is broadcast (one flat byte buffer each) so every rank holds the whole quantized block;
3. each rank runs its batches through the quantized block: the inputs of the next block.

Rank 0 alone writes checkpoints and resume state. Every collective runs under a timeout
(``QUANTKIT_DIST_TIMEOUT`` seconds, default 1800); a failure on one rank is shared with the others at
the next agreement point so every rank stops with the same error; a rank that dies makes the others
fail at their next collective after the timeout, naming it, instead of hanging.
"""

from __future__ import annotations

import atexit
import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from . import solve as _solve  # solve_linear looked up at call time (tests wrap it)
from .errors import NumericalError, QuantkitError
from .formats.base import packed_bits_per_weight
from .models.discovery import linear_weight
from .quantizers.base import output_error_terms

DEFAULT_TIMEOUT_S = 1800.0
_BUCKET_ELEMS = 1 << 26  # all-reduce small statistics together, up to 64 Mi elements per call


def _timeout_s() -> float:
    raw = os.environ.get("QUANTKIT_DIST_TIMEOUT", "")
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        v = float(raw)
    except ValueError:
        raise QuantkitError(f"QUANTKIT_DIST_TIMEOUT={raw!r} is not a number of seconds") from None
    if v <= 0:
        raise QuantkitError(f"QUANTKIT_DIST_TIMEOUT must be > 0 seconds, got {raw}")
    return v


@dataclass
class Dist:
    """This process's place in the group, and the collectives quantkit uses."""

    rank: int
    world: int
    comm_device: torch.device  # where tensors must be for the backend (cuda for NCCL, cpu for gloo)
    timeout_s: float
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, n: int) -> list[int]:
        """Indices of the ``n`` calibration batches this rank runs (round-robin)."""
        return list(range(self.rank, n, self.world))

    @contextlib.contextmanager
    def _guard(self, what: str) -> Iterator[None]:
        import torch.distributed as dist

        try:
            yield
        except (RuntimeError, dist.DistError) as e:
            raise QuantkitError(
                f"distributed {what} failed on rank {self.rank} of {self.world}: {str(e).splitlines()[0][:300]}. "
                f"Another rank has most likely died or stalled (its own log says why); collectives time out "
                f"after {self.timeout_s:g} s (QUANTKIT_DIST_TIMEOUT)") from None

    # ---- collectives ------------------------------------------------------------------------------
    def gather_objects(self, obj: Any, what: str) -> list[Any]:
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        with self._guard(what):
            dist.all_gather_object(out, obj)
        return out

    def agree(self, err: BaseException | None, what: str, payload: Any = None) -> list[Any]:
        """Every rank calls this after a step that may fail locally: if any rank failed, every rank
        raises (the failed rank its own error); otherwise returns every rank's ``payload``."""
        msg = None if err is None else f"{type(err).__name__}: {err}"
        got = self.gather_objects((msg, payload), what)
        if err is not None:
            raise err
        for r, (m, _) in enumerate(got):
            if m is not None:
                raise QuantkitError(f"rank {r} failed during {what}: {m} (every rank stops)")
        return [p for _, p in got]

    def all_reduce(self, tensors: list[torch.Tensor], op: str, what: str) -> None:
        """In-place sum/max of ``tensors`` across ranks (small ones bucketed into one call)."""
        import torch.distributed as dist

        rop = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]
        buckets: list[list[torch.Tensor]] = []
        cur: list[torch.Tensor] = []
        size = 0
        for t in tensors:
            if cur and (size + t.numel() > _BUCKET_ELEMS or t.dtype != cur[0].dtype or t.device != cur[0].device):
                buckets.append(cur)
                cur, size = [], 0
            cur.append(t)
            size += t.numel()
        if cur:
            buckets.append(cur)
        with self._guard(what):
            for b in buckets:
                if len(b) == 1 and b[0].is_contiguous():
                    buf = b[0].to(self.comm_device)
                    dist.all_reduce(buf, op=rop)
                    if buf.data_ptr() != b[0].data_ptr():
                        b[0].copy_(buf)
                    continue
                flat = torch.cat([t.reshape(-1) for t in b]).to(self.comm_device)
                dist.all_reduce(flat, op=rop)
                off = 0
                for t in b:
                    t.copy_(flat[off:off + t.numel()].view_as(t))
                    off += t.numel()

    def broadcast_tensors(self, tensors: dict[str, torch.Tensor] | None, layout: list[tuple[str, str, list[int]]],
                          src: int, device: torch.device, what: str) -> dict[str, torch.Tensor]:
        """Send ``tensors`` from ``src`` to every rank as one byte buffer; ``layout`` (known to all
        ranks) lists (name, dtype, shape) in buffer order. Returns the tensors on ``device``."""
        import torch.distributed as dist

        sizes = [_nbytes(dt, shape) for _, dt, shape in layout]
        total = sum(sizes)
        if self.rank == src:
            assert tensors is not None
            buf = torch.cat([_as_bytes(tensors[n]) for n, _, _ in layout]) if layout else \
                torch.empty(0, dtype=torch.uint8)
            buf = buf.to(self.comm_device)
        else:
            buf = torch.empty(total, dtype=torch.uint8, device=self.comm_device)
        if total:
            with self._guard(what):
                dist.broadcast(buf, src=src)
        out, off = {}, 0
        for (n, dt, shape), nb in zip(layout, sizes):
            piece = buf[off:off + nb].to(device)
            out[n] = piece.view(_dtype(dt)).reshape(shape).clone()
            off += nb
        return out


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name.replace("torch.", ""))


def _nbytes(dt: str, shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n * torch.empty(0, dtype=_dtype(dt)).element_size()


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().contiguous().reshape(-1)
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    return t.view(torch.uint8)


def layout_of(tensors: dict[str, torch.Tensor]) -> list[tuple[str, str, list[int]]]:
    return [(n, str(t.dtype).replace("torch.", ""), list(t.shape)) for n, t in sorted(tensors.items())]


# ---- set-up ---------------------------------------------------------------------------------------
_STATE: dict[str, Any] = {}


def launched() -> bool:
    """True when this process was started by torchrun (or another launcher that sets RANK/WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def current() -> Dist | None:
    """The group quantkit works in: the default process group once initialised, else None."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    backend = str(dist.get_backend())
    comm = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    return Dist(dist.get_rank(), dist.get_world_size(), comm, _STATE.get("timeout", DEFAULT_TIMEOUT_S), backend)


def setup(device: str | torch.device | None) -> tuple[Dist | None, str | torch.device | None]:
    """Join the process group the launcher describes (if any) and pick this rank's device.

    Under torchrun a CUDA device becomes ``cuda:LOCAL_RANK``; NCCL is used when the device is CUDA,
    gloo otherwise. Outside a launcher (and with no group already made by the caller) nothing
    happens: ``(None, device)``.
    """
    import torch.distributed as dist

    if not dist.is_available():
        return None, device
    if dist.is_initialized():
        d = current()
        if d is not None and d.backend == "nccl" and (device is None or torch.device(device).type == "cuda"):
            device = d.comm_device
        return d, device
    if not launched():
        return None, device
    want_cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    if want_cuda and not torch.cuda.is_available():
        raise QuantkitError("--device cuda was asked for but this machine has no CUDA GPU")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    timeout = _timeout_s()
    _STATE["timeout"] = timeout
    if want_cuda:
        n = torch.cuda.device_count()
        if local >= n:
            raise QuantkitError(f"LOCAL_RANK {local} but this machine has {n} GPU(s): start at most {n} "
                                f"processes per node (torchrun --nproc-per-node {n})")
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
        dist.init_process_group("nccl", timeout=timedelta(seconds=timeout), device_id=dev)
        device = dev
    else:
        dist.init_process_group("gloo", timeout=timedelta(seconds=timeout))
        device = torch.device("cpu") if device is None else device
    atexit.register(shutdown)
    return current(), device


def exit_now(code: int) -> None:
    """Leave a process that is part of a failed group at once (streams flushed): a graceful
    teardown of a group whose peers are gone or stuck can hang or abort in the backend's threads."""
    import sys

    for f in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            f.flush()
    os._exit(code)


def shutdown() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


# ---- planning the solves ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Piece:
    name: str
    rank: int
    rows: tuple[int, int] | None  # None: the whole linear
    cost: float


def solve_cost(rows: int, cols: int, needs_hessian: bool) -> float:
    """Rough flops of one solve without the Hessian factorisation (:func:`factor_cost`): GPTQ-like
    updates rows·cols²; otherwise a per-weight fit (RTN, k-means) of a few dozen operations."""
    if needs_hessian:
        return float(rows) * cols * cols
    return 64.0 * rows * cols


def factor_cost(cols: int) -> float:
    """Cholesky, inverse and Cholesky again of a cols² Hessian (done once per shared input)."""
    return 4.0 * cols ** 3 / 3.0


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _lpt(units: list[tuple[float, tuple]], world: int) -> tuple[float, list[int]]:
    """Largest first onto the least-loaded rank: (makespan, rank of each unit)."""
    order = sorted(range(len(units)), key=lambda i: (-units[i][0], units[i][1]))
    load, where = [0.0] * world, [0] * len(units)
    for i in order:
        r = min(range(world), key=lambda k: (load[k], k))
        load[r] += units[i][0]
        where[i] = r
    return max(load), where


def plan_solves(items: list[tuple], world: int, align: int = 16, split_rows: str = "auto") -> list[Piece]:
    """Assign each linear, or row ranges of one, to a rank; every rank computes the same plan.

    ``items``: (name, rows, cols, needs_hessian, row_splittable[, group]). Linears of one group read the
    same statistics (q/k/v) and go to one rank, which factors their Hessian once. A lone
    row-splittable linear is cut into ``world`` row ranges (multiples of ``align``; each range
    repeats the factorisation) when that lowers the largest rank's estimated cost. Units are placed
    largest first on the least-loaded rank. ``split_rows``: "auto" (as above), "always" (cut every
    lone row-splittable linear) or "never".
    """
    if split_rows not in ("auto", "always", "never"):
        raise QuantkitError(f"QUANTKIT_SPLIT_ROWS={split_rows!r}: use auto, always or never")
    groups: dict[str, list[tuple]] = {}
    for it in items:
        n, r, c, h, split = it[:5]
        groups.setdefault(it[5] if len(it) > 5 else n, []).append((n, r, c, h, split))

    def unit_cost(members, rows_of=None) -> float:
        cost = sum(solve_cost(rows_of or r, c, h) for _, r, c, h, _ in members)
        if any(h for *_, h, _ in members):
            cost += factor_cost(members[0][2])
        return cost

    keys = sorted(groups)
    split: set[str] = set()

    def units_for(split_set):
        units, who = [], []
        for k in keys:
            ms = groups[k]
            if k in split_set:
                r = ms[0][1]
                step = _cdiv(_cdiv(r, world), align) * align  # rows per rank, rounded up to align
                for r0 in range(0, r, step):
                    r1 = min(r0 + step, r)
                    units.append((unit_cost(ms, r1 - r0), (k, r0)))
                    who.append((k, (r0, r1)))
            else:
                units.append((unit_cost(ms), (k, 0)))
                who.append((k, None))
        return units, who

    best, _ = _lpt(units_for(split)[0], world)
    cands = [k for k in keys if len(groups[k]) == 1 and groups[k][0][4] and groups[k][0][1] >= world * align]
    if world > 1 and split_rows == "always":
        split = set(cands)
    elif world > 1 and split_rows == "auto":
        for k in sorted(cands, key=lambda k: -unit_cost(groups[k])):
            span, _ = _lpt(units_for(split | {k})[0], world)
            if span < best * 0.999:
                best, split = span, split | {k}
    units, who = units_for(split)
    _, where = _lpt(units, world)
    out = []
    for (cost, _), (k, rows), r in zip(units, who, where):
        for n, *_ in groups[k]:
            out.append(Piece(n, r, rows, cost / len(groups[k])))
    return out


# ---- one block's solves --------------------------------------------------------------------------------
def row_splittable(scheme) -> bool:
    """A scheme whose rows may be solved in ranges: no transforms (they may mix rows), a quantizer
    that rounds rows apart, and a format that packs row ranges."""
    return (not scheme.transforms and getattr(scheme.quantizer, "rows_independent", False)
            and scheme.fmt.row_tensors() is not None)


class DistributedSolver:
    """The pipeline's solver under torch.distributed (quantkit.solve has the one-process one): this rank
    runs its share of the calibration batches, statistics are summed over the ranks, each block's
    solves are planned over the ranks (:func:`plan_solves`) and broadcast, so every rank ends with the
    same, bit-identical, quantized block."""

    def __init__(self, d: Dist, device: torch.device):
        self.d, self.device = d, torch.device(device)

    @property
    def world(self) -> int:
        return self.d.world

    @property
    def is_main(self) -> bool:
        return self.d.is_main

    def shard(self, batches: list[torch.Tensor]) -> list[torch.Tensor]:
        """This rank's calibration batches: r, r + N, r + 2N, ..."""
        if len(batches) < self.d.world:
            raise QuantkitError(f"{len(batches)} calibration batches for {self.d.world} ranks: every rank needs at "
                                f"least one; use more samples or a smaller calibration.batch_size")
        return [batches[j] for j in self.d.shard(len(batches))]

    def reduce_stats(self, collector, what: str, err: BaseException | None) -> None:
        """Sum (max) every statistic of ``collector`` (quantkit.pipeline's) across the ranks; ``err``, this
        rank's failure in the forward, is shared first (every rank then raises)."""
        d = self.d
        names = sorted(collector.stats)
        views = d.agree(err, what, (names, sorted(collector.alias.items()),
                                    [collector.stats[n].nsamples for n in names]))
        counts = [sum(v[2][i] for v in views) for i in range(len(names))]
        views = [v[:2] for v in views]
        if any(v != views[0] for v in views):
            raise QuantkitError(f"{what}: the ranks saw different layer inputs ({views[0][0][:3]}... on rank 0 vs "
                                f"others); the block's forward is not the same on every rank")
        st = collector.stats
        d.all_reduce([st[n].hessian if st[n].hessian is not None else st[n].act_sqsum for n in names], "sum", what)
        d.all_reduce([st[n].act_absmax for n in names], "max", what)
        for n, c in zip(names, counts):
            st[n].nsamples = int(c)

    def reduce_sums(self, values: list[float], what: str) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64)
        self.d.all_reduce([t], "sum", what)
        return t.tolist()

    def solve(self, block, schemes: dict, stats) -> dict[str, tuple]:
        """Quantize the block's linears split across the ranks; every rank returns every layer's
        ``(QuantLinear, report entry)``, bit-identical on all ranks (the owners' results, broadcast)."""
        d, bi, linears, device = self.d, block.index, block.linears, self.device
        items = []
        for n, s in schemes.items():
            rows, cols = linear_weight(linears[n]).shape
            s.fmt.check_shape((rows, cols), where=n)
            items.append((n, rows, cols, s.needs_hessian, row_splittable(s), stats.alias.get(n, n)))
        plan = plan_solves(items, d.world, split_rows=os.environ.get("QUANTKIT_SPLIT_ROWS", "auto"))
        local: dict[tuple, tuple[dict, dict]] = {}
        err: BaseException | None = None
        try:
            for p in plan:
                if p.rank == d.rank:
                    local[(p.name, p.rows)] = _solve_piece(p, linears[p.name], schemes[p.name], stats.get(p.name), bi)
        except Exception as e:  # noqa: BLE001 - shared with every rank by agree(), then re-raised
            err = NumericalError(f"{p.name}: {e}") if isinstance(e, NumericalError) and p.name not in str(e) else e
        metas: dict[tuple, dict] = {}
        for m in d.agree(err, f"block {bi} solves", {k: v[1] for k, v in local.items()}):
            metas.update(m)
        got = {}
        for p in plan:
            key = (p.name, p.rows)
            mine = local[key][0] if p.rank == d.rank else None
            got[key] = d.broadcast_tensors(mine, metas[key]["layout"], p.rank, device,
                                           f"block {bi}: sending {p.name} from rank {p.rank}")
        local.clear()
        out = {}
        for n, s in schemes.items():
            parts = sorted((p for p in plan if p.name == n), key=lambda p: p.rows or (0, 0))
            sol = _joined(n, s, parts, got, metas, tuple(linear_weight(linears[n]).shape))
            out[n] = (sol.build(linears[n]), sol.info)
        return out


def _solve_piece(p: Piece, mod, scheme, stats, bi: int) -> tuple[dict, dict]:
    """This rank's piece of the plan: the tensors to broadcast and what the other ranks need to know."""
    if p.rows is None:
        sol = _solve.solve_linear(p.name, mod, scheme, stats, seed=bi)
        tensors = {**{"p." + k: v for k, v in sol.packed.items()}, "dense": sol.dense}
        meta = {"spec": sol.spec, "info": sol.info}
    else:
        r0, r1 = p.rows
        w = linear_weight(mod).detach().float()[r0:r1]
        res = scheme.quantizer.quantize(w, scheme.fmt, stats)
        num, den = output_error_terms(w, res.weight, stats)
        tensors = {**{"p." + k: v for k, v in res.packed.items()}, "dense": res.weight.to(linear_weight(mod).dtype)}
        meta = {"metrics": {k: v for k, v in res.metrics.items() if k != "rel_err"}, "num": num, "den": den}
    return tensors, {**meta, "layout": layout_of(tensors)}


def _joined(name: str, scheme, parts: list[Piece], got: dict, metas: dict, shape: tuple[int, int]) -> _solve.Solution:
    """One linear's :class:`quantkit.solve.Solution` from the broadcast pieces (whole, or row ranges)."""
    if parts[0].rows is None:
        t, meta = got[(name, None)], metas[(name, None)]
        return _solve.Solution(meta["spec"], {k[2:]: v for k, v in t.items() if k != "dense"}, t["dense"],
                               meta["info"])
    packs = [{k[2:]: v for k, v in got[(name, p.rows)].items() if k != "dense"} for p in parts]
    spec = {**scheme.spec(), "transforms": []}
    packed = {k: v.contiguous() for k, v in scheme.fmt.concat_rows(packs).items()}
    ms = [metas[(name, p.rows)] for p in parts]
    info = {**spec, "bits_per_weight": packed_bits_per_weight(packed, shape), "shape": list(shape),
            **ms[0]["metrics"], "rel_err": sum(m["num"] for m in ms) / max(sum(m["den"] for m in ms), 1e-30),
            "row_ranges": len(parts)}
    return _solve.Solution(spec, packed, torch.cat([got[(name, p.rows)]["dense"] for p in parts], 0), info)


__all__ = [
    "Dist",
    "DistributedSolver",
    "Piece",
    "current",
    "exit_now",
    "factor_cost",
    "launched",
    "layout_of",
    "plan_solves",
    "row_splittable",
    "setup",
    "shutdown",
    "solve_cost",
]
