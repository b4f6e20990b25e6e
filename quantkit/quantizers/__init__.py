"""Rounding algorithms: turn a weight (+ calibration statistics) into a format's codes."""

from .base import LayerStats, Quantizer, QuantResult, quantizer_from_spec

__all__ = ["LayerStats", "QuantResult", "Quantizer", "quantizer_from_spec"]
