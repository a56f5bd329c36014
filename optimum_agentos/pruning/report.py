"""What a prune really did: per-layer and overall sparsity, parameters before/after, counted from the model."""

from __future__ import annotations

import torch
from torch import nn

from ..nn.linear import QuantLinear, float_weight
from ..nn.sparse_linear import SparseLinear
from ..nn.targets import is_supported_layer


def layer_zeros(module: nn.Module) -> tuple[int, int]:
    """`(zero weights, total weights)` of a linear layer, whatever its storage."""
    if isinstance(module, SparseLinear):
        total = module.in_features * module.out_features
        return total - module.nnz, total
    if isinstance(module, QuantLinear):
        weight = module.dequantize(torch.float32)
    else:
        weight = float_weight(module)
    return int((weight == 0).sum()), weight.numel()


def logical_parameters(model: nn.Module) -> int:
    """Parameters as the dense model would count them (a packed or sparse layer counts `in x out`), tied once."""
    seen, total = set(), 0
    for module in model.modules():
        if isinstance(module, (SparseLinear, QuantLinear)):
            total += module.in_features * module.out_features + (module.bias.numel() if module.bias is not None else 0)
            seen.update(id(p) for p in module.parameters(recurse=False))
            continue
        for param in module.parameters(recurse=False):
            if id(param) not in seen:
                seen.add(id(param))
                total += param.numel()
    return total


def count_zeros(model: nn.Module, names: list[str] | None = None, prefix: str = "", skip: tuple[str, ...] = ()):
    """`(layers, zeros, total, all_zeros)`: the report's entries for the chosen layers (see `sparsity_report`),
    their zero and total weights, and the zero weights of every linear layer. Module names get `prefix`; those
    starting with a `skip` prefix are left out (a streamed model's blocks, counted when they were loaded)."""
    layers, zeros, total, all_zeros = {}, 0, 0, 0
    for name, module in model.named_modules(prefix=prefix.rstrip(".")):
        if not (is_supported_layer(module) or isinstance(module, (SparseLinear, QuantLinear))):
            continue
        if skip and name.startswith(skip):
            continue
        z, n = layer_zeros(module)
        all_zeros += z
        if (name in names) if names is not None else isinstance(module, SparseLinear):
            layers[name] = {"shape": [module.out_features, module.in_features] if hasattr(module, "out_features")
                            else list(float_weight(module).shape), "sparsity": z / n}
            zeros, total = zeros + z, total + n
    return layers, zeros, total, all_zeros


def sparsity_report(
    model: nn.Module, params_before: int | None = None, names: list[str] | None = None, input_features: dict | None = None
) -> dict:
    """`{"layers": {name: {"shape", "sparsity"}}, "sparsity", "params_before", "params_after", "nonzero_params"}`.

    `layers` are `names` (default: the `SparseLinear` layers, i.e. what a prune stored sparse); `sparsity` is the
    true fraction of zeros over them, `nonzero_params` counts the whole model. `input_features` (a column prune's
    `ColumnPlan.report()`: per layer the input features removed or zeroed) is passed through.
    """
    layers, zeros, total, all_zeros = count_zeros(model, names)
    params_after = logical_parameters(model)
    return {
        "layers": layers,
        "sparsity": zeros / total if total else 0.0,
        "params_before": params_before,
        "params_after": params_after,
        "nonzero_params": params_after - all_zeros,
        **({"input_features": input_features} if input_features else {}),
    }
