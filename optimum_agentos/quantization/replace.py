"""Swap supported float layers of a model for `QuantLinear` (empty, to be filled by loading or quantization)."""

from __future__ import annotations

import torch
from torch import nn

from ..config import AgentOSConfig
from .linear import SCALE_DTYPES, QuantLinear, is_conv1d, linear_shape
from .targets import resolve_targets


def check_group_size(model: nn.Module, names: list[str], config: AgentOSConfig) -> None:
    """A group size wider than every selected layer is a mistake, not a per-channel request."""
    if config.group_size == -1:
        return
    modules = dict(model.named_modules())
    widths = [linear_shape(modules[n])[0] for n in names]
    if widths and config.group_size > max(widths):
        raise ValueError(
            f"group_size={config.group_size} exceeds the input width of every selected layer (widest: {max(widths)}); "
            "use a smaller power of two or group_size=-1 for one group per output channel."
        )


def replace_with_quant_linear(model: nn.Module, config: AgentOSConfig, device="meta") -> list[str]:
    """Replace the modules selected by `config.target`/`config.ignore` by empty `QuantLinear`s; returns their names.

    A replaced `Conv1D` is marked `transposed=True`: its float checkpoint weight is `[in, out]`.
    """
    names = resolve_targets(model, config.target, config.ignore)
    check_group_size(model, names, config)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child)
        in_features, out_features = linear_shape(old)
        bias = getattr(old, "bias", None)
        with torch.device(device):
            new = QuantLinear(
                in_features,
                out_features,
                bias=bias is not None,
                bits=config.bits,
                group_size=config.group_size,
                scale_dtype=SCALE_DTYPES[config.scale_dtype],
                dtype=bias.dtype if bias is not None else None,
            )
        new.transposed = is_conv1d(old)
        new.requires_grad_(False)
        setattr(parent, child, new)
    return names
