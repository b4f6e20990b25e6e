"""The weight-format interface every quantizer rounds into.

A format is created from its recipe/checkpoint spec (a dict with ``type`` and the format's own
keys, validated by the format's pydantic ``Config``). A quantizer drives it like this::

    layer = fmt.begin_layer(W, col_weight, stats)   # layer-level params (e.g. a LUT per row)
    for each group of columns:
        params = fmt.fit_group(W[:, cols], col_weight[cols], layer)
        codes, deq = fmt.quantize(W[:, cols], params)   # any subset of the group's columns
    packed = fmt.pack(codes, layer, group_params, g_idx)

``pack`` returns the tensors that go to disk; ``unpack(packed, shape)`` gives the dequantized
weight back, and ``linear(x, packed, shape)`` is the plain-PyTorch forward used on CPU.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict

from ..errors import CheckpointError, QuantkitError, RecipeError
from ..registry import from_spec

Params = dict[str, torch.Tensor]


class FormatConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: str
    # Columns per quantization group along the input dimension; None/-1 = one group per row.
    group_size: int | None = None

    def groups(self, cols: int) -> list[tuple[int, int]]:
        g = self.group_size if self.group_size and self.group_size > 0 else cols
        return [(s, min(s + g, cols)) for s in range(0, cols, g)]


def column_groups(cols: int, group_size: int | None, device=None) -> torch.Tensor:
    """The group of each of ``cols`` input columns, ``j // group_size`` (one group when ``group_size`` is
    None or <= 0): how every format, quantizer and layout maps a column to its group."""
    g = group_size if group_size and group_size > 0 else cols
    return torch.arange(cols, device=device) // max(g, 1)


def group_index(cfg: FormatConfig, cols: int, g_idx: torch.Tensor | None, device) -> torch.Tensor:
    """The group of each column: a stored ``g_idx`` (act-order), else :func:`column_groups`."""
    if g_idx is not None:
        return g_idx.to(device=device, dtype=torch.long)
    return column_groups(cols, cfg.group_size, device)


def check_groups(cfg: FormatConfig, shape: tuple[int, int], where: str) -> None:
    """Refuse a weight whose columns are not whole groups when the format says ``last_group: error``."""
    g = cfg.group_size
    if g is not None and g > 0 and shape[1] % g and getattr(cfg, "last_group", "partial") == "error":
        raise RecipeError(
            f"{where}: group_size {g} does not divide the {shape[1]} input columns of a "
            f"{tuple(shape)} weight; choose a divisor of {shape[1]} or set last_group: partial "
            f"(the last group then holds {shape[1] % g} columns)")


def expect(packed: dict[str, torch.Tensor], key: str, shape: tuple[int, ...], dtype: torch.dtype | None,
           what: str) -> torch.Tensor:
    """The packed tensor ``key``, checked for its shape (and dtype): a checkpoint that does not fit its
    format spec fails here with the tensor's name."""
    t = packed.get(key)
    if t is None:
        raise CheckpointError(f"{what}: tensor '{key}' is missing")
    if tuple(t.shape) != tuple(shape) or (dtype is not None and t.dtype != dtype):
        raise CheckpointError(
            f"{what}: tensor '{key}' has shape {tuple(t.shape)} dtype {t.dtype}, expected "
            f"{tuple(shape)}{'' if dtype is None else f' dtype {dtype}'}")
    return t


class WeightFormat(ABC):
    """Base class of a weight format. Subclasses set ``Config`` and implement the methods."""

    Config: ClassVar[type[FormatConfig]] = FormatConfig
    registry_name: ClassVar[str]

    def __init__(self, cfg: FormatConfig):
        self.cfg = cfg

    # ---- identity -------------------------------------------------------------------------
    def spec(self) -> dict[str, Any]:
        return self.cfg.model_dump()

    @property
    def group_size(self) -> int | None:
        g = self.cfg.group_size
        return g if g and g > 0 else None

    def describe(self) -> str:
        return self.registry_name

    @property
    def needs_calibration(self) -> bool:
        """True if fitting uses activation statistics (then RTN into it still calibrates)."""
        return False

    def check_shape(self, shape: tuple[int, int], where: str = "") -> None:
        """Raise a clear error if this format cannot hold a weight of ``shape``."""

    def affine_maxq(self) -> int | None:
        """Capability: ``maxq`` when this format rounds column groups onto the affine grid
        ``q = clamp(round(w / scale) + zero, 0, maxq)``, ``w ≈ (q - zero) * scale``, with group params
        ``scale`` and ``zero`` [rows, 1] (GPTQ's Triton loop computes exactly that); None otherwise."""
        return None

    # ---- rounding -------------------------------------------------------------------------
    def begin_layer(self, w: torch.Tensor, col_weight: torch.Tensor | None, stats: Any = None) -> Params:
        """Layer-level parameters (default: none). ``col_weight`` [cols] is the mean squared input
        activation per column; ``stats`` the layer's full :class:`LayerStats` (act_absmax, ...) or None."""
        return {}

    @abstractmethod
    def fit_group(self, w: torch.Tensor, col_weight: torch.Tensor | None, layer: Params) -> Params:
        """Parameters of one group, from its columns ``w`` [rows, k] (float32)."""

    @abstractmethod
    def quantize(self, w: torch.Tensor, params: Params, layer: Params) -> tuple[torch.Tensor, torch.Tensor]:
        """Round columns ``w`` [rows, k] with one group's params: (integer codes, dequantized)."""

    # ---- storage --------------------------------------------------------------------------
    @abstractmethod
    def pack(self, codes: torch.Tensor, layer: Params, groups: list[Params],
             g_idx: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Tensors to store for a weight with integer ``codes`` [rows, cols]."""

    @abstractmethod
    def unpack(self, packed: dict[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
        """The dequantized weight [rows, cols] in float32."""

    def linear(self, x: torch.Tensor, packed: dict[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
        """Plain-PyTorch forward ``x @ W^T`` (no bias). Activation-quantizing formats override."""
        w = self.unpack(packed, shape).to(x.dtype)
        return torch.nn.functional.linear(x, w)

    def bits_per_weight(self, packed: dict[str, torch.Tensor], shape: tuple[int, int]) -> float:
        return packed_bits_per_weight(packed, shape)

    # ---- row ranges (distributed solves) --------------------------------------------------
    def row_tensors(self) -> frozenset[str] | None:
        """Names of the packed tensors indexed by output row along dim 0 (the others are per layer
        and equal for every row range); None if a weight cannot be packed in row ranges."""
        return None

    def concat_rows(self, parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Join the packed tensors of consecutive row ranges of one weight into the whole weight's."""
        rows = self.row_tensors()
        if rows is None:
            raise QuantkitError(f"format {self.describe()} cannot be packed in row ranges")
        keys = set(parts[0])
        if any(set(p) != keys for p in parts):
            raise QuantkitError(f"format {self.describe()}: row ranges packed different tensors "
                                f"({[sorted(p) for p in parts]})")
        out = {}
        for k in sorted(keys):
            if k in rows:
                out[k] = torch.cat([p[k] for p in parts], 0)
            else:
                if any(not torch.equal(p[k], parts[0][k]) for p in parts[1:]):
                    raise QuantkitError(f"format {self.describe()}: per-layer tensor {k!r} differs between row "
                                        f"ranges; this quantizer's rows are not independent")
                out[k] = parts[0][k]
        return out


def static_input_scale(what: str, stats: Any, act_max: float, device) -> dict[str, torch.Tensor]:
    """Layer params of a static (calibrated) activation scale: max |x| over the calibration data,
    mapped to the activation format's largest value ``act_max``."""
    from ..errors import NumericalError

    amax = None if stats is None else stats.act_absmax
    if amax is None or getattr(stats, "nsamples", 0) == 0:
        raise NumericalError(f"{what}: static activation quantization needs calibration statistics "
                             f"(act_absmax) and got none; calibrate, or use activations: dynamic")
    m = float(amax.float().max())
    s = m / act_max if m > 0 else 1.0
    return {"input_scale": torch.tensor([[s]], dtype=torch.float32, device=device)}


def packed_bits_per_weight(packed: dict[str, torch.Tensor], shape: tuple[int, int]) -> float:
    """True storage cost: every stored byte (codes, scales, zeros, tables, g_idx) per weight."""
    nbits = sum(t.numel() * t.element_size() * 8 for t in packed.values())
    return nbits / (shape[0] * shape[1])


def format_from_spec(spec: dict[str, Any] | FormatConfig, where: str = "format") -> WeightFormat:
    """Build a format from a dict like ``{"type": "int", "bits": 4, "group_size": 128}``."""
    if isinstance(spec, FormatConfig):
        spec = spec.model_dump()
    return from_spec("format", spec, where, example="int", names=False)
