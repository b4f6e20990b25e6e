"""Transforms that wrap a quantizer (incoherence, smoothing) and per-block plugins (norm tweaking)."""

from .base import BlockPlugin, LayerContext, Transform, block_plugin_from_spec, transform_from_spec

__all__ = ["BlockPlugin", "LayerContext", "Transform", "block_plugin_from_spec", "transform_from_spec"]
