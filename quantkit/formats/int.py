"""Integer affine formats: INT2..INT8, symmetric or asymmetric, per channel or in groups.

w ≈ (q - z) * s, q in [0, 2^b - 1]. Symmetric: z = 2^(b-1) (not stored), s = max|w| / ((2^b-1)/2)
(``sym_range: half``, GPTQ's) or ±max|w| / 2^(b-1) (``full``: the larger end on code 0, every code used).
Asymmetric: s = (max - min) / (2^b - 1) with the range stretched to contain 0, z = round(-min/s)
stored as uint8. Scales are rounded to ``scale_dtype`` *before* rounding the weights, so the
stored checkpoint reproduces the in-memory model exactly.

Groups run along the input dimension. When ``group_size`` does not divide the columns, the last
group is shorter (``last_group: partial``, default) or the layer is refused (``last_group: error``).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from ..errors import CheckpointError
from ..registry import register
from .base import FormatConfig, Params, WeightFormat, check_groups, expect, group_index
from .packing import pack_codes, packed_row_bytes, unpack_codes

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class IntConfig(FormatConfig):
    type: Literal["int"] = "int"
    bits: int = Field(4, ge=2, le=8)
    group_size: int | None = 128
    sym: bool = False
    # symmetric grids only: "half" (GPTQ's): s = max|w| / ((2^b - 1) / 2), both ends at +-(2^b - 1)/2
    # steps, rounded; "full": s = +-max|w| / 2^(b-1) with the sign that puts the larger-magnitude end
    # exactly on code 0 (q - z = -2^(b-1)): all 2^b codes used, a grid 2^b / (2^b - 1) finer (as
    # llama.cpp and auto-round). Storage and decoding are the same; the scale may be negative.
    sym_range: Literal["half", "full"] = "half"
    last_group: Literal["partial", "error"] = "partial"
    scale_dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    # "minmax": the group's range; "mse": shrink the range (grid of 20 steps down to 55%) to the
    # point of least (activation-weighted) squared error, per row.
    clip: Literal["minmax", "mse"] = "minmax"

    @model_validator(mode="after")
    def _full_needs_sym(self):
        if self.sym_range == "full" and not self.sym:
            raise ValueError("sym_range: full applies to symmetric grids only; set sym: true or drop sym_range")
        return self


@register("format", "int")
class IntFormat(WeightFormat):
    Config = IntConfig
    cfg: IntConfig

    def spec(self):
        d = self.cfg.model_dump()
        if d.get("sym_range") == "half":  # the default: checkpoints written before the key existed stay equal
            del d["sym_range"]
        return d

    @property
    def maxq(self) -> int:
        return (1 << self.cfg.bits) - 1

    def row_tensors(self) -> frozenset[str]:
        return frozenset({"qweight", "scales", "zeros"})  # g_idx / input_scale are per layer

    def describe(self) -> str:
        g = self.group_size
        return f"int{self.cfg.bits}{'' if self.cfg.sym else '-asym'}{f'-g{g}' if g else '-ch'}"

    @property
    def needs_calibration(self) -> bool:
        return self.cfg.clip == "mse"

    def check_shape(self, shape, where=""):
        check_groups(self.cfg, shape, where)

    def affine_maxq(self) -> int:
        return self.maxq

    # ---- rounding -------------------------------------------------------------------------
    def _params_from_range(self, xmin: torch.Tensor, xmax: torch.Tensor) -> Params:
        sdt = _DTYPES[self.cfg.scale_dtype]
        if self.cfg.sym:
            amax = torch.maximum(xmin.abs(), xmax.abs())
            if self.cfg.sym_range == "full":
                half = float(1 << (self.cfg.bits - 1))
                scale = torch.where(xmin.abs() >= xmax.abs(), amax, -amax) / half
                scale = torch.where(scale != 0, scale, torch.ones_like(scale)).to(sdt).float()
            else:
                scale = amax / (self.maxq / 2)
                scale = torch.where(scale > 0, scale, torch.ones_like(scale)).to(sdt).float()
            zero = torch.full_like(scale, float(1 << (self.cfg.bits - 1)))
        else:
            xmin = torch.minimum(xmin, torch.zeros_like(xmin))
            xmax = torch.maximum(xmax, torch.zeros_like(xmax))
            scale = (xmax - xmin) / self.maxq
            scale = torch.where(scale > 0, scale, torch.ones_like(scale)).to(sdt).float()
            zero = torch.clamp(torch.round(-xmin / scale), 0, self.maxq)
        return {"scale": scale.unsqueeze(1), "zero": zero.unsqueeze(1)}

    def fit_group(self, w, col_weight, layer):
        w = w.float()
        xmin, xmax = w.min(dim=1).values, w.max(dim=1).values
        best = self._params_from_range(xmin, xmax)
        if self.cfg.clip == "mse":
            cw = None if col_weight is None else col_weight.float().clamp_min(0).unsqueeze(0)
            best_err = self._err(w, best, cw)
            for p in torch.linspace(0.97, 0.55, 15).tolist():
                cand = self._params_from_range(xmin * p, xmax * p)
                err = self._err(w, cand, cw)
                better = err < best_err
                if better.any():
                    for k in best:
                        best[k] = torch.where(better.unsqueeze(1), cand[k], best[k])
                    best_err = torch.where(better, err, best_err)
        return best

    def _err(self, w, params, cw):
        _, dq = self.quantize(w, params, {})
        e = (dq - w).pow(2)
        return (e * cw).sum(1) if cw is not None else e.sum(1)

    def quantize(self, w, params, layer):
        s, z = params["scale"], params["zero"]
        q = torch.clamp(torch.round(w / s) + z, 0, self.maxq)
        return q.to(torch.int32), (q - z) * s

    # ---- storage --------------------------------------------------------------------------
    def pack(self, codes, layer, groups, g_idx):
        sdt = _DTYPES[self.cfg.scale_dtype]
        out = {
            "qweight": pack_codes(codes, self.cfg.bits),
            "scales": torch.cat([g["scale"] for g in groups], dim=1).to(sdt).contiguous(),
        }
        if not self.cfg.sym:
            out["zeros"] = torch.cat([g["zero"] for g in groups], dim=1).to(torch.uint8).contiguous()
        if g_idx is not None:
            natural = group_index(self.cfg, codes.shape[1], None, g_idx.device)
            if not torch.equal(g_idx.to(torch.long), natural):
                out["g_idx"] = g_idx.to(torch.int32).contiguous()
        return out

    def n_groups(self, cols: int, packed: dict[str, torch.Tensor]) -> int:
        if "g_idx" in packed:
            return int(packed["g_idx"].max()) + 1 if packed["g_idx"].numel() else 0
        return len(self.cfg.groups(cols))

    def unpack(self, packed, shape):
        rows, cols = shape
        what = f"{self.describe()} weight {tuple(shape)}"
        qw = expect(packed, "qweight", (rows, packed_row_bytes(cols, self.cfg.bits)), torch.uint8, what)
        g_idx = packed.get("g_idx")
        if g_idx is not None:
            g_idx = expect(packed, "g_idx", (cols,), torch.int32, what)
        ng = self.n_groups(cols, packed)
        sdt = _DTYPES[self.cfg.scale_dtype]
        scales = expect(packed, "scales", (rows, ng), sdt, what).float()
        if not torch.isfinite(scales).all():
            raise CheckpointError(f"{what}: scales hold NaN/inf; the checkpoint is corrupt")
        if self.cfg.sym and "zeros" in packed:
            raise CheckpointError(f"{what}: a 'zeros' tensor is stored but the format spec says sym: true; "
                                  f"the checkpoint and its format spec disagree")
        if g_idx is not None and (int(g_idx.min()) < 0 or int(g_idx.max()) >= ng):
            raise CheckpointError(f"{what}: g_idx holds group numbers outside [0, {ng})")
        gi = group_index(self.cfg, cols, g_idx, qw.device)
        codes = unpack_codes(qw, self.cfg.bits, cols).float()
        if self.cfg.sym:
            zeros = float(1 << (self.cfg.bits - 1))
            return (codes - zeros) * scales[:, gi]
        zeros = expect(packed, "zeros", (rows, ng), torch.uint8, what).float()
        return (codes - zeros[:, gi]) * scales[:, gi]
