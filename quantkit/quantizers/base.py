"""The quantizer interface (RTN, GPTQ, and later ones implement it)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict

from ..formats.base import Params, WeightFormat
from ..registry import from_spec


class _HessianField:
    """``LayerStats.hessian``: the tensor; or, while it is *parked* (:meth:`LayerStats.park_hessian`: kept
    out of memory by a store, e.g. GPTQ's file on disk), read back by that store on first use and kept
    again, so every reader sees the same values as if it had never left."""

    def __get__(self, obj, owner=None):
        if obj is None:
            return None  # the dataclass default
        d = obj.__dict__
        h = d.get("_hessian")
        if h is None and d.get("_parked"):
            h = d["hessian_store"].load()
            d["_hessian"], d["_parked"] = h, False
        return h

    def __set__(self, obj, value) -> None:
        obj.__dict__["_hessian"] = value
        obj.__dict__["_parked"] = False


@dataclass
class LayerStats:
    """Calibration statistics of one linear layer's input (all float32, on the compute device)."""

    nsamples: int = 0  # tokens seen
    hessian: torch.Tensor | None = _HessianField()  # sum over tokens of x x^T, [in, in] (None if not gathered)
    act_sqsum: torch.Tensor | None = None  # sum over tokens of x^2, [in]
    act_absmax: torch.Tensor | None = None  # max over tokens of |x|, [in]
    # quantities derived from these statistics that several layers fed the same input can share
    # (e.g. GPTQ's Hessian factor for q/k/v); None: not shared, nothing is kept
    cache: dict | None = None
    # what holds the Hessian while it is parked (an object with ``load() -> Tensor``); kept after it is read
    # back, so the store can tell that it still holds exactly this Hessian (GPTQ reuses its file)
    hessian_store: Any = field(default=None, repr=False, compare=False)

    def park_hessian(self, store) -> None:
        """The Hessian leaves memory: ``store`` (which holds its exact values) reads it back when
        ``hessian`` is next read."""
        self.__dict__.update(_hessian=None, _parked=True, hessian_store=store)

    @property
    def hessian_parked(self) -> bool:
        """The Hessian is out of memory, held by ``hessian_store`` (reading ``hessian`` brings it back)."""
        return bool(self.__dict__.get("_parked"))

    @property
    def col_weight(self) -> torch.Tensor | None:
        """Mean squared activation per input column: the weight of each column's error."""
        if self.hessian is not None:
            return torch.diagonal(self.hessian) / max(self.nsamples, 1)
        if self.act_sqsum is not None:
            return self.act_sqsum / max(self.nsamples, 1)
        return None


@dataclass
class QuantResult:
    packed: dict[str, torch.Tensor]  # what goes to disk (format tensors)
    weight: torch.Tensor  # the dequantized weight, float32 [out, in]
    metrics: dict[str, float] = field(default_factory=dict)


class QuantizerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Quantizer(ABC):
    Config: ClassVar[type[QuantizerConfig]] = QuantizerConfig
    needs_hessian: ClassVar[bool] = False
    needs_calibration: ClassVar[bool] = True  # False: data-free (e.g. RTN)
    # True if each output row is rounded from that row's weights and the shared statistics alone,
    # so a large layer's rows can be solved in ranges on different ranks (quantkit.distributed)
    rows_independent: ClassVar[bool] = False
    registry_name: ClassVar[str]

    def __init__(self, cfg: QuantizerConfig):
        self.cfg = cfg

    def spec(self) -> dict[str, Any]:
        return {"type": self.registry_name, **self.cfg.model_dump()}

    @abstractmethod
    def quantize(self, w: torch.Tensor, fmt: WeightFormat, stats: LayerStats) -> QuantResult:
        """Quantize ``w`` [out, in] (float32) into ``fmt``."""


def all_finite(t: torch.Tensor, chunk_bytes: int = 16 << 20) -> bool:
    """``bool(torch.isfinite(t).all())``, on CPU a few rows at a time: isfinite makes float- and bool-sized
    temporaries of its whole input (a 256 MiB Hessian: ~450 MiB more at a streamed CPU run's peak). On
    other devices one call (no sync per piece)."""
    if t.device.type != "cpu" or t.dim() < 2 or t.numel() * t.element_size() <= chunk_bytes:
        return bool(torch.isfinite(t).all())
    rows = max(1, chunk_bytes // max(1, t[0].numel() * t.element_size()))
    return all(bool(torch.isfinite(t[i:i + rows]).all()) for i in range(0, t.shape[0], rows))


def quantizer_from_spec(spec: dict[str, Any] | str, where: str = "quantizer") -> Quantizer:
    return from_spec("quantizer", spec, where, example="gptq")


def quantize_columns(w: torch.Tensor, fmt: WeightFormat, stats: LayerStats
                     ) -> tuple[torch.Tensor, torch.Tensor, Params, list[Params]]:
    """Round-to-nearest over the format's natural groups: (codes, dequantized, layer, groups)."""
    col_weight = stats.col_weight
    layer = fmt.begin_layer(w, col_weight, stats)
    codes = torch.empty(w.shape, dtype=torch.int32, device=w.device)
    deq = torch.empty_like(w)
    groups = []
    for s, e in fmt.cfg.groups(w.shape[1]):
        cw = None if col_weight is None else col_weight[s:e]
        p = fmt.fit_group(w[:, s:e], cw, layer)
        codes[:, s:e], deq[:, s:e] = fmt.quantize(w[:, s:e], p, layer)
        groups.append(p)
    return codes, deq, layer, groups


def output_error(w: torch.Tensor, q: torch.Tensor, stats: LayerStats) -> dict[str, float]:
    """Relative layer-output error ||(W-Q)X||² / ||WX||² from the Hessian (or the diagonal)."""
    num, den = output_error_terms(w, q, stats)
    return {"rel_err": num / max(den, 1e-30)}


# rows of the weight per piece of the output error: its products are [rows, in] fp32, never weight-sized
# (a streamed CPU run's peak was here for the largest linear, issue 17); a weight of at most this many rows
# is one piece, i.e. the same sums as the whole-matrix formula
OUTPUT_ERROR_ROWS = 512


def output_error_terms(
    w: torch.Tensor, q: torch.Tensor, stats: LayerStats, rows: int | None = None
) -> tuple[float, float]:
    """(||(W-Q)X||², ||WX||²): both are sums over rows, so row ranges add up.

    Computed `rows` rows of the weight at a time (default OUTPUT_ERROR_ROWS): each piece's sums in fp32
    as the whole-matrix formula makes them, the pieces' sums added in float64. No weight-sized temporary.
    """
    step = OUTPUT_ERROR_ROWS if rows is None else int(rows)
    if step < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    h = stats.hessian
    cw = stats.col_weight if h is None else None
    num = den = 0.0
    for r in range(0, w.shape[0], step):
        wr = w[r : r + step]
        d = (wr - q[r : r + step]).float()  # the difference in the weight's dtype, as the whole formula
        wf = wr.float()
        if h is not None:
            # the products multiplied in place: the same values as (d @ h) * d
            t = d @ h
            num += float(torch.sum(t.mul_(d)))
            del t
            t = wf @ h
            den += float(torch.sum(t.mul_(wf)))
            del t
        elif cw is not None:
            num += float(torch.sum(d.pow(2) * cw))
            den += float(torch.sum(wf.pow(2) * cw))
        else:
            num += float(d.pow(2).sum())
            den += float(wf.pow(2).sum())
        del wr, wf, d
    return num, den
