"""Post-training quantization algorithms (RTN over a model, GPTQ, SmoothQuant, int8 embeddings) and `Quantizer`.

The layers they produce are the runtime's (`optimum_agentos.nn`). `gptq_quantize` and `quantize_model_rtn` are the
entry points the pruner composes with (sparse + quantized checkpoints)."""

from ..nn.linear import QuantLinear
from .gptq import gptq_quantize
from .rtn import quantize_model_rtn


__all__ = ["QATCallback", "QuantLinear", "Quantizer", "convert_qat", "gptq_quantize", "prepare_qat", "quantize_model_rtn"]

_QAT = {"QATCallback", "convert_qat", "prepare_qat"}


def __getattr__(name):
    if name == "Quantizer":
        from .quantizer import Quantizer

        return Quantizer
    if name in _QAT:  # imports transformers' Trainer machinery: only on use
        from . import qat

        return getattr(qat, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
