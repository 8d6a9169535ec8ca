"""vtquant: spike-free per-tensor post-training quantization (INSERTQUANT) for transformers."""
from .api import load, quantize_, save
from .config import ActArgs, CalibConfig, Recipe, RotationConfig, SinkConfig, WeightArgs, method_recipe
from ._post_import import when_imported as _when_imported
from .hf_integration import install_registration_hook as _install_registration_hook
from .recipe import load_recipe
from .vlm import quantize_vlm_

__version__ = "0.1.0"

# `quant_method: vtquant` checkpoints load with transformers' from_pretrained once vtquant is imported
# (registered when transformers' quantizer registry loads; transformers itself is not imported here)
_install_registration_hook()


def _register_with_lm_eval() -> None:
    """``lm_eval --model vtquant`` / ``simple_evaluate(model="vtquant", ...)``: a lazy registry entry
    (vtquant.eval.lm_eval_bridge is imported only when lm-eval asks for the model)."""
    import lm_eval.models  # noqa: F401  (fills the registry first, as lm-eval's own lookup would)
    from lm_eval.api.registry import model_registry

    target = "vtquant.eval.lm_eval_bridge:VtquantLM"
    if "vtquant" not in model_registry:
        model_registry.register("vtquant", target=target)


_when_imported("lm_eval.api.registry", _register_with_lm_eval)

__all__ = ["quantize_", "quantize_vlm_", "save", "load", "load_recipe", "Recipe", "WeightArgs", "ActArgs", "SinkConfig",
           "RotationConfig", "CalibConfig", "method_recipe", "__version__"]
