"""Whole-model conversions between float layers and `QuantLinear` (in place, outside `from_pretrained`)."""

from __future__ import annotations

import torch
from torch import nn

from ..config import AgentOSConfig
from .embedding import dequantize_embeddings
from .linear import SCALE_DTYPES, QuantLinear, float_weight
from .targets import resolve_targets
from .replace import check_group_size


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def quantize_model_rtn(model: nn.Module, config: AgentOSConfig, names: list[str] | None = None) -> list[str]:
    """Round-to-nearest quantize the selected layers (or exactly `names`) of a float model in place."""
    if names is None:
        names = resolve_targets(model, config.target, config.ignore)
        check_group_size(model, names, config)
    for name in names:
        old = model.get_submodule(name)
        new = QuantLinear.from_float(
            float_weight(old), old.bias, config.bits, config.group_size, config.sym, SCALE_DTYPES[config.scale_dtype],
            config.mse_grid,
        )
        set_module(model, name, new)
    return names


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every `QuantLinear`/`SparseLinear` by an `nn.Linear` holding its dense weight (zeros where pruned)."""
    from ..pruning.sparse_linear import SparseLinear

    for name, module in list(model.named_modules()):
        if isinstance(module, (QuantLinear, SparseLinear)):
            weight = module.dequantize(dtype or torch.float32)
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            linear.weight = nn.Parameter(weight)
            if module.bias is not None:
                linear.bias = nn.Parameter(module.bias.detach().to(weight.dtype))
            set_module(model, name, linear)
    dequantize_embeddings(model, dtype)
    return model
