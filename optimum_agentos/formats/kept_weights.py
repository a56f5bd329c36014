"""Weights kept in floating point (embeddings, an untied head) are stored in a 16-bit dtype to shrink the file.

They are rounded to that dtype in memory first, so the model that was saved and the one reloaded (cast back to
the model's dtype) compute the same logits bit for bit.
"""

from __future__ import annotations

import torch
from torch import nn

from ..nn.linear import SCALE_DTYPES, QuantLinear
from ..nn.sparse_linear import SparseLinear
from ..nn.targets import is_supported_layer


def kept_float_weights(model: nn.Module) -> list[nn.Parameter]:
    """Weights of embeddings, of linear layers left unquantized and the values of float sparse layers (tied
    weights appear once)."""
    seen, weights = set(), []
    for module in model.modules():
        if isinstance(module, QuantLinear):
            continue
        if isinstance(module, SparseLinear):
            if module.bits is None and id(module.weight) not in seen:  # kept values of a float sparse layer
                seen.add(id(module.weight))
                weights.append(module.weight)
            continue
        if isinstance(module, nn.Embedding) or is_supported_layer(module):
            weight = getattr(module, "weight", None)
            if isinstance(weight, torch.Tensor) and weight.is_floating_point() and id(weight) not in seen:
                seen.add(id(weight))
                weights.append(weight)
    return weights


def round_kept_weights(model: nn.Module, float_dtype: str | None) -> None:
    """Round the kept float weights to `float_dtype` precision in place (their dtype does not change)."""
    if float_dtype is None:
        return
    dtype = SCALE_DTYPES[float_dtype]
    with torch.no_grad():
        for weight in kept_float_weights(model):
            if weight.dtype.itemsize > dtype.itemsize:
                weight.copy_(weight.to(dtype).to(weight.dtype))


def state_dict_for_save(model: nn.Module, float_dtype: str | None) -> dict[str, torch.Tensor]:
    """The model's state dict with the kept float weights cast to `float_dtype` (tied tensors stay shared)."""
    state = model.state_dict()
    if float_dtype is None:
        return state
    dtype = SCALE_DTYPES[float_dtype]
    # state_dict() hands out detached views, so match the kept weights by storage address.
    kept = {w.data_ptr() for w in kept_float_weights(model) if w.dtype.itemsize > dtype.itemsize}
    cast: dict[int, torch.Tensor] = {}
    for key, tensor in state.items():
        ptr = tensor.data_ptr()
        if ptr in kept:
            state[key] = cast.setdefault(ptr, tensor.to(dtype))
    return state
