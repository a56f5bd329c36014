"""Weight-only post-training quantization: packed format, RTN and GPTQ, `QuantLinear`, `Quantizer`."""

from .linear import QuantLinear

__all__ = ["QuantLinear"]
