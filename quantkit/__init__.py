"""quantkit: post-training quantization for Hugging Face causal LMs."""

__version__ = "0.1.0"

from .api import QuantizedModel, evaluate, load, load_any, quantize  # noqa: E402
from .errors import QuantkitError  # noqa: E402
from .recipe import Recipe, load_recipe  # noqa: E402

__all__ = ["QuantizedModel", "QuantkitError", "Recipe", "evaluate", "load", "load_any", "load_recipe",
           "quantize", "__version__"]
