"""Lookup-table formats: learned per-row tables (any4 / any3 / any2) and fixed tables (NF4, FP4).

Every weight stores a b-bit index into a table of 2^b values; optionally a group scale multiplies
the looked-up value (docs/FORMAT.md, layout ``lut``)::

    w[r, j] = lut[r or 0, q[r, j]] * (scales[r, g(j)] if the format has group scales else 1)

``table: learned`` (any4, Elhoushi & Johnson 2025): each output row gets its own table of 2^b
values, learned by weighted k-means (Lloyd's algorithm in 1-D) on the row's weights. With
``group_size`` set, the weights are first divided by their group's absmax scale (stored fp16,
``scales [out, n_groups]``) and the table lives in [-1, 1]; with ``group_size: null`` there is no
scale and the table holds the weights' own values. The k-means sample weight of weight w[r, j] is
``a_j * s_{r,g(j)}^2`` where ``a_j`` is the calibration activation statistic of input column j
(``weighting: sq`` = mean x_j^2, the diagonal of the Hessian; ``rms`` = sqrt(mean x_j^2), closer
to the paper's mean |x_j|; ``none`` = 1, data-free) and ``s^2`` converts the error of the
normalized weight back to the error of the real weight. So k-means minimises
sum_j a_j (w_j - ŵ_j)^2 per row, the diagonal approximation of the layer's output error.
Plain Lloyd iterations get stuck far from the optimum on real rows (measured up to 1.9x the optimal
weighted error on smollm2-135m rows), so the main start is the dynamic-programming optimum of 1-D
k-means over 128 cut points of the sorted row (exact when the row has at most 128 values, see
:func:`quantkit.formats.kmeans.kmeans_dp_1d`); it and a weighted-quantile start are refined by Lloyd
and the better table per row is kept. Tables are rounded to fp16 *before* the final rounding so the stored
checkpoint reproduces the in-memory model bit for bit.

``table: nf4`` / ``fp4`` (bitsandbytes-style): one fixed table ``lut [1, 16]`` and an absmax
scale per group (``scales = absmax / max|table|``, fp16). NF4 is the QLoRA NormalFloat table;
FP4 is OCP E2M1 (codes in bit order s.ee.m: 0, 0.5, 1, 1.5, 2, 3, 4, 6, -0, -0.5, ..., -6).

Rounding is to the nearest table value (boundaries at the midpoints of the sorted table), both in
RTN and inside GPTQ (the quantizer feeds one column at a time; the table is learned once per layer
in ``begin_layer`` from the weights before any GPTQ update, group scales in ``fit_group``).
Own code; the any4 paper and bitsandbytes' NF4/FP4 definitions were read, no code copied.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from ..errors import CheckpointError, RecipeError
from ..registry import register
from .base import FormatConfig, Params, WeightFormat, check_groups, column_groups, expect
from .kmeans import nearest_index, weighted_kmeans_1d
from .packing import pack_codes, packed_row_bytes, unpack_codes

# QLoRA NormalFloat-4 (the values bitsandbytes uses), ascending; index = code.
NF4_TABLE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)


def e2m1_value(code: int) -> float:
    """OCP FP4 E2M1: sign bit 3, exponent bits 2..1 (bias 1), mantissa bit 0; no inf/NaN."""
    s = -1.0 if code & 8 else 1.0
    e, m = (code >> 1) & 3, code & 1
    return s * (0.5 * m if e == 0 else 2.0 ** (e - 1) * (1 + 0.5 * m))


FP4_TABLE = tuple(e2m1_value(c) for c in range(16))
FIXED_TABLES = {"nf4": NF4_TABLE, "fp4": FP4_TABLE}

class LutConfig(FormatConfig):
    type: Literal["lut"] = "lut"
    # "learned": a table per output row (any4/any3/any2); "nf4", "fp4": one fixed 16-value table
    table: Literal["learned", "nf4", "fp4"] = "learned"
    bits: int = Field(4, ge=1, le=8)
    # columns per group scale; null: learned tables have no scale, fixed tables one scale per row
    group_size: int | None = 128
    last_group: Literal["partial", "error"] = "partial"
    # k-means sample weight per input column (learned tables only): mean x^2, its sqrt, or none
    weighting: Literal["sq", "rms", "none"] = "sq"
    kmeans_iters: int = Field(40, ge=1, le=1000)
    # cut points of the dynamic-programming k-means start (exact optimum when in_features <= it;
    # 0: Lloyd from weighted quantiles only, as plain k-means)
    dp_bins: int = Field(128, ge=0, le=4096)

    @model_validator(mode="after")
    def _check(self):
        if self.table != "learned" and self.bits != 4:
            raise ValueError(f"table {self.table} is a 4-bit table; set bits: 4 (got {self.bits})")
        if self.group_size is not None and self.group_size < 1:
            self.group_size = None  # -1 = per row, like int
        return self


@register("format", "lut")
class LutFormat(WeightFormat):
    Config = LutConfig
    cfg: LutConfig

    @property
    def K(self) -> int:
        return 1 << self.cfg.bits

    @property
    def learned(self) -> bool:
        return self.cfg.table == "learned"

    @property
    def has_scales(self) -> bool:
        return not self.learned or self.cfg.group_size is not None

    @property
    def lut_rows_fixed(self) -> bool:
        return not self.learned

    def row_tensors(self) -> frozenset[str]:
        return frozenset({"qweight", "scales"} | (set() if self.lut_rows_fixed else {"lut"}))

    def describe(self) -> str:
        name = f"any{self.cfg.bits}" if self.learned else self.cfg.table
        g = self.cfg.group_size
        return f"{name}-g{g}" if g else (f"{name}-row" if self.learned else f"{name}-ch")

    @property
    def needs_calibration(self) -> bool:
        return self.learned and self.cfg.weighting != "none"

    def check_shape(self, shape, where=""):
        check_groups(self.cfg, shape, where)

    def fixed_table(self) -> torch.Tensor:
        return torch.tensor(FIXED_TABLES[self.cfg.table], dtype=torch.float16).float().unsqueeze(0)

    # ---- rounding -------------------------------------------------------------------------
    def _scale(self, w: torch.Tensor, tmax: float) -> torch.Tensor:
        """fp16-representable absmax scale [rows, 1] of columns ``w``; 1 where the group is zero."""
        amax = w.abs().amax(dim=1, keepdim=True) / tmax
        amax = amax.clamp(max=65504.0)
        s = amax.to(torch.float16).float()
        return torch.where(s > 0, s, torch.ones_like(s))

    def _table_max(self, layer: Params) -> float:
        return 1.0 if self.learned else float(layer["sorted"].abs().max())

    def begin_layer(self, w, col_weight, stats=None):
        w = w.float()
        if not self.learned:
            lut = self.fixed_table().to(w.device)
        else:
            rows, cols = w.shape
            if self.cfg.weighting == "none" or col_weight is None:
                a = torch.ones(cols, device=w.device)
            else:
                a = col_weight.float().to(w.device).clamp_min(0)
                if self.cfg.weighting == "rms":
                    a = a.sqrt()
            x, sw = w, a.unsqueeze(0).expand(rows, cols)
            if self.cfg.group_size is not None:
                scales = torch.cat([self._scale(w[:, s:e], 1.0).expand(-1, e - s)
                                    for s, e in self.cfg.groups(cols)], dim=1)
                x, sw = w / scales, sw * scales.pow(2)
            lut = weighted_kmeans_1d(x, sw, self.K, self.cfg.kmeans_iters, self.cfg.dp_bins)
            lut = lut.clamp(-65504.0, 65504.0).to(torch.float16).float()
        sorted_vals, order = lut.sort(dim=1)
        return {"lut": lut, "sorted": sorted_vals, "order": order}

    def fit_group(self, w, col_weight, layer):
        if not self.has_scales:
            return {}
        return {"scale": self._scale(w.float(), self._table_max(layer))}

    def quantize(self, w, params, layer):
        w = w.float()
        scale = params.get("scale")
        x = w / scale if scale is not None else w
        sv = layer["sorted"]
        idx = nearest_index(x, sv)
        if sv.shape[0] == 1:
            vals, codes = sv[0][idx], layer["order"][0][idx]
        else:
            vals, codes = sv.gather(1, idx), layer["order"].gather(1, idx)
        deq = vals * scale if scale is not None else vals
        return codes.to(torch.int32), deq

    # ---- storage --------------------------------------------------------------------------
    def pack(self, codes, layer, groups, g_idx):
        if g_idx is not None:
            natural = column_groups(codes.shape[1], self.cfg.group_size, g_idx.device)
            if not torch.equal(g_idx.to(torch.long), natural):
                raise RecipeError(
                    f"format {self.describe()}: the lut layout has no g_idx; GPTQ act-order needs "
                    f"static_groups: true (or act_order: false) with lut formats")
        out = {"qweight": pack_codes(codes, self.cfg.bits),
               "lut": layer["lut"].to(torch.float16).contiguous()}
        if self.has_scales:
            out["scales"] = torch.cat([g["scale"] for g in groups], dim=1).to(torch.float16).contiguous()
        return out

    def unpack(self, packed, shape):
        rows, cols = shape
        what = f"{self.describe()} weight {tuple(shape)}"
        qw = expect(packed, "qweight", (rows, packed_row_bytes(cols, self.cfg.bits)), torch.uint8, what)
        lut_rows = 1 if self.lut_rows_fixed else rows
        lut = expect(packed, "lut", (lut_rows, self.K), torch.float16, what).float()
        codes = unpack_codes(qw, self.cfg.bits, cols).long()
        w = lut[0][codes] if lut_rows == 1 else lut.gather(1, codes)
        if self.has_scales:
            ng = len(self.cfg.groups(cols))
            scales = expect(packed, "scales", (rows, ng), torch.float16, what).float()
            w = w * scales[:, column_groups(cols, self.cfg.group_size, w.device)]
        elif "scales" in packed:
            raise CheckpointError(f"{what}: tensor 'scales' is stored but {self.describe()} has no group "
                                  f"scales (group_size: null); the checkpoint and its format spec disagree")
        return w


__all__ = [
    "FP4_TABLE",
    "NF4_TABLE",
    "LutConfig",
    "LutFormat",
    "e2m1_value",
]
