"""Round-to-nearest (RTN) quantization of a float model's linear layers, in place.

The per-tensor math (parameters, codes, dequantization) is the runtime's, `optimum_agentos.nn.qmath`; its names are
re-exported here for code written against earlier versions (`from optimum_agentos.quantization import rtn`)."""

from __future__ import annotations

from torch import nn

from ..config import AgentOSConfig
from ..formats.replace import check_group_size, check_layer_overrides
from ..nn.linear import SCALE_DTYPES, QuantLinear, float_weight
from ..nn.modeling import set_module
from ..nn.qmath import (  # noqa: F401
    compute_qparams,
    dequantize_codes,
    effective_group_size,
    expand_groups,
    group_qparams,
    num_groups,
    quantize_codes,
    quantize_rtn,
)
from ..nn.targets import resolve_targets


def quantize_model_rtn(model: nn.Module, config: AgentOSConfig, names: list[str] | None = None) -> list[str]:
    """Round-to-nearest quantize the selected layers (or exactly `names`) of a float model in place."""
    if names is None:
        names = resolve_targets(model, config.target, config.ignore)
        check_group_size(model, names, config)
        check_layer_overrides(config, names)
    for name in names:
        old = model.get_submodule(name)
        bits, group_size = config.layer_qparams(name)
        new = QuantLinear.from_float(
            float_weight(old), old.bias, bits, group_size, config.sym, SCALE_DTYPES[config.scale_dtype],
            config.mse_grid,
        )
        set_module(model, name, new)
    return names
