"""vtquant: spike-free per-tensor post-training quantization (INSERTQUANT) for transformers."""
from .api import load, quantize_, save
from .config import ActArgs, CalibConfig, Recipe, RotationConfig, SinkConfig, WeightArgs, method_recipe
from .recipe import load_recipe

__version__ = "0.1.0"

__all__ = ["quantize_", "save", "load", "load_recipe", "Recipe", "WeightArgs", "ActArgs", "SinkConfig",
           "RotationConfig", "CalibConfig", "method_recipe", "__version__"]
