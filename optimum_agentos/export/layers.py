"""What an exporter reads from a loaded model: each weight as integer codes plus group parameters, or as floats.

Every writer (GGUF, ONNX, compressed-tensors) walks the same modules; this module turns each runtime layer
(`QuantLinear`, `SparseLinear`, `QuantEmbedding`/`QuantHead`, `nn.Linear`, `nn.Embedding`) into one plain record,
so a writer never needs to know how the runtime packs its tensors. Sparse layers come out dense (pruned positions
hold their group's zero point, i.e. the value 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import AgentOSConfig
from ..nn import QuantLinear, SparseLinear, qmath
from ..nn.embedding import QuantEmbedding, QuantHead
from ..nn.linear import float_weight, is_conv1d

# The modules holding a layer's weight (each has a `Weight` record); other parameters belong to norms and the like.
WEIGHT_MODULES = (QuantLinear, SparseLinear, QuantEmbedding, QuantHead, nn.Linear, nn.Embedding)


class ExportError(ValueError):
    """A model or configuration the chosen format cannot hold; the message names what can (and `--requantize`)."""


@dataclass
class Weight:
    """One weight `[out, in]`: either `codes` (uint8) with `scales`/`zeros` `[out, groups]`, or `dense` floats.

    `sym` says whether the codes are symmetric (zero point `2**(bits-1)` everywhere, `w = s (q - z)`); int8
    embeddings (`QuantEmbedding`) are stored here as codes `q + 128` with zero 128 and one group per row."""

    shape: tuple[int, int]
    dense: torch.Tensor | None = None
    codes: torch.Tensor | None = None
    scales: torch.Tensor | None = None
    zeros: torch.Tensor | None = None
    bits: int | None = None
    group_size: int | None = None
    sym: bool = False
    sparse: bool = False

    @property
    def quantized(self) -> bool:
        return self.codes is not None

    def dequantize(self) -> torch.Tensor:
        """float32 `[out, in]`: what the runtime computes with."""
        if self.codes is None:
            return self.dense.float()
        return qmath.dequantize_codes(self.codes, self.scales, self.zeros, self.group_size, torch.float32)


def _symmetric(zeros: torch.Tensor, bits: int) -> bool:
    return bool((zeros == (1 << (bits - 1))).all())


def weight_of(module: nn.Module) -> Weight:
    """The `Weight` record of a supported module; `ExportError` naming the supported types otherwise."""
    if isinstance(module, QuantLinear):
        codes = module.codes()
        return Weight(tuple(codes.shape), codes=codes, scales=module.weight_scale.detach(),
                      zeros=module.weight_zero.detach(), bits=module.bits, group_size=module.group_size,
                      sym=_symmetric(module.weight_zero, module.bits))
    if isinstance(module, SparseLinear):
        shape = (module.out_features, module.in_features)
        if module.bits is None:
            return Weight(shape, dense=module.dequantize(module.weight.dtype), sparse=True)
        return Weight(shape, codes=module.dense_codes(), scales=module.weight_scale.detach(),
                      zeros=module.weight_zero.detach(), bits=module.bits, group_size=module.group_size,
                      sym=_symmetric(module.weight_zero, module.bits), sparse=True)
    if isinstance(module, (QuantEmbedding, QuantHead)):
        codes = (module.weight.detach().to(torch.int16) + 128).to(torch.uint8)
        rows = codes.shape[0]
        return Weight(tuple(codes.shape), codes=codes, scales=module.weight_scale.detach(),
                      zeros=torch.full((rows, 1), 128, dtype=torch.uint8), bits=8, group_size=-1, sym=True)
    if isinstance(module, (nn.Linear, nn.Embedding)) or is_conv1d(module):
        weight = float_weight(module).detach()
        return Weight(tuple(weight.shape), dense=weight)
    raise ExportError(f"{type(module).__name__} layers cannot be exported; supported: QuantLinear, SparseLinear, "
                      "QuantEmbedding, QuantHead, nn.Linear, nn.Embedding.")


def agentos_config(model) -> AgentOSConfig | None:
    """The model's `AgentOSConfig` (None for a float model)."""
    config = getattr(model.config, "quantization_config", None)
    if isinstance(config, dict) and config.get("quant_method") == "agentos":
        return AgentOSConfig.from_dict(config)
    return config if isinstance(config, AgentOSConfig) else None
