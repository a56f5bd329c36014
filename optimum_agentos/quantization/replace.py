"""Swap supported float layers of a model for `QuantLinear` (empty, to be filled by loading or quantization)."""

from __future__ import annotations

import torch
from torch import nn

from ..config import AgentOSConfig
from .embedding import replace_embeddings_for_loading
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
    """Replace the modules an agentos checkpoint stores compressed by empty `QuantLinear`/`SparseLinear`s, to be
    filled by the weight loader; returns their names.

    `config.sparse_layers` become `SparseLinear` (quantized too when also selected by `target`/`ignore`), the other
    selected layers `QuantLinear`. A replaced `Conv1D` is marked `transposed=True`: its float weight is `[in, out]`.
    """
    from ..pruning.sparse_linear import SparseLinear

    if config.module_shapes:
        from ..pruning.structured import apply_module_shapes

        apply_module_shapes(model, config.module_shapes)
    sparse = dict(config.sparse_layers or {})
    missing = [n for n in sparse if _get(model, n) is None]
    if missing:
        raise ValueError(
            f"sparse_layers names modules {missing[:3]} that {type(model).__name__} does not have; the checkpoint's "
            "config.json does not match its architecture."
        )
    quantized = resolve_targets(model, config.target, config.ignore) if config.is_quantized else []
    if quantized:
        check_group_size(model, quantized, config)
    for name in list(dict.fromkeys([*quantized, *sparse])):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child)
        in_features, out_features = linear_shape(old)
        bias = getattr(old, "bias", None)
        bits = config.bits if name in quantized else None
        dtype = bias.dtype if bias is not None else old.weight.dtype
        with torch.device(device):
            if name in sparse:
                new = SparseLinear(
                    in_features, out_features, sparse[name], bias=bias is not None, bits=bits,
                    group_size=config.group_size, scale_dtype=SCALE_DTYPES[config.scale_dtype], dtype=dtype,
                )
            else:
                new = QuantLinear(
                    in_features, out_features, bias=bias is not None, bits=config.bits, group_size=config.group_size,
                    scale_dtype=SCALE_DTYPES[config.scale_dtype], dtype=bias.dtype if bias is not None else None,
                )
        new.transposed = is_conv1d(old)
        new.requires_grad_(False)
        setattr(parent, child, new)
    if config.embedding_bits:
        replace_embeddings_for_loading(model, device)
    return list(dict.fromkeys([*quantized, *sparse]))


def _get(model: nn.Module, name: str):
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None
