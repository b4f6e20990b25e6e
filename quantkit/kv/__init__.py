"""Quantized KV cache and per-layer bit allocation (see issue: adaptive KV-cache quantization)."""
