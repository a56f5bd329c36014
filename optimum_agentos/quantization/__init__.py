"""Post-training quantization algorithms (RTN over a model, GPTQ, SmoothQuant, int8 embeddings) and `Quantizer`.

The layers they produce are the runtime's (`optimum_agentos.nn`). `gptq_quantize` and `quantize_model_rtn` are the
entry points the pruner composes with (sparse + quantized checkpoints)."""

from ..nn.linear import QuantLinear
from .gptq import gptq_quantize
from .rtn import quantize_model_rtn


__all__ = ["QuantLinear", "Quantizer", "gptq_quantize", "quantize_model_rtn"]


def __getattr__(name):
    if name == "Quantizer":
        from .quantizer import Quantizer

        return Quantizer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
