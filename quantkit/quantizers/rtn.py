"""Round-to-nearest: each weight to the nearest point of its group's grid."""

from __future__ import annotations

from ..registry import register
from .base import LayerStats, Quantizer, QuantResult, output_error, quantize_columns


@register("quantizer", "rtn")
class RTN(Quantizer):
    needs_calibration = False
    rows_independent = True

    def quantize(self, w, fmt, stats: LayerStats) -> QuantResult:
        codes, deq, layer, groups = quantize_columns(w, fmt, stats)
        packed = fmt.pack(codes, layer, groups, None)
        return QuantResult(packed, deq, output_error(w, deq, stats))
