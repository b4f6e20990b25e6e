"""Checkpoints: one file per on-disk layout, all written atomically, none ever unpickled."""

from .io import atomic_output_dir, read_config, safe_load_tensors

__all__ = ["atomic_output_dir", "read_config", "safe_load_tensors"]
