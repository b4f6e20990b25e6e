"""quantkit: post-training quantization for Hugging Face causal LMs."""

from .api import QuantizedModel, evaluate, load, load_any, quantize
from .errors import QuantkitError
from .recipe import Recipe, load_recipe
from .version import __version__

__all__ = ["QuantizedModel", "QuantkitError", "Recipe", "evaluate", "load", "load_any", "load_recipe",
           "quantize", "__version__"]
