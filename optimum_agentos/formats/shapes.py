"""Per-layer widths of a non-uniformly pruned model (`quantization_config.module_shapes`): recorded on save,
applied to the freshly built model before its weights load."""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..nn.modeling import LAYERS_PREFIX, decoder_layers, set_head_counts


def _reference_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """`[out, in]` of every decoder-layer nn.Linear of a fresh model built from `model.config` (on meta: no memory)."""
    with torch.device("meta"):
        fresh = type(model)(copy.deepcopy(model.config))
    prefix = f"{LAYERS_PREFIX}."
    return {
        name: (m.out_features, m.in_features)
        for name, m in fresh.named_modules()
        if name.startswith(prefix) and isinstance(m, nn.Linear)
    }


def module_shapes(model: nn.Module) -> dict[str, list[int]]:
    """`{name: [out_features, in_features]}` of the decoder-layer linear layers whose shape differs from what
    `model.config` implies (a non-uniform prune's leftovers); empty when the config describes every layer.

    Layers already replaced by `SparseLinear`/`QuantLinear` count too: only `in_features`/`out_features` are read.
    """
    decoder_layers(model, linears=False)
    modules = dict(model.named_modules())
    shapes = {}
    for name, expected in _reference_shapes(model).items():
        module = modules.get(name)
        if module is None:
            continue
        actual = (int(module.out_features), int(module.in_features))
        if actual != expected:
            shapes[name] = list(actual)
    return shapes


def apply_module_shapes(model: nn.Module, shapes: dict[str, list[int]]) -> None:
    """Load side of `module_shapes`: resize the named nn.Linear layers of a freshly built model (meta device is fine)
    to the recorded `[out, in]` and refresh the head counts of the attention modules, so the state dict loads."""
    layers = decoder_layers(model)
    modules = dict(model.named_modules())
    touched = set()
    for name, shape in shapes.items():
        old = modules.get(name)
        if not isinstance(old, nn.Linear) or not name.startswith(f"{LAYERS_PREFIX}."):
            raise ValueError(
                f"module_shapes names {name!r}, which is not a decoder-layer nn.Linear of {type(model).__name__}; the "
                "checkpoint's config does not match its architecture."
            )
        if len(shape) != 2 or any(not isinstance(s, int) or s < 1 for s in shape):
            raise ValueError(f"module_shapes[{name!r}]={shape!r} must be [out_features, in_features] (positive ints).")
        out_features, in_features = shape
        device, dtype = old.weight.device, old.weight.dtype
        new = nn.Linear(in_features, out_features, bias=old.bias is not None, device=device, dtype=dtype)
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name], child, new)
        touched.add(int(name[len(LAYERS_PREFIX) + 1:].split(".")[0]))
    for i in sorted(touched):
        attn, mlp = layers[i].self_attn, layers[i].mlp
        head_dim, q_out = attn.head_dim, attn.q_proj.out_features
        if q_out % head_dim or attn.k_proj.out_features * attn.num_key_value_groups != q_out:
            raise ValueError(
                f"module_shapes gives {LAYERS_PREFIX}.{i}.self_attn q_proj {attn.q_proj.out_features} and k_proj "
                f"{attn.k_proj.out_features} outputs: not whole heads of {head_dim} with "
                f"{attn.num_key_value_groups} query heads per key/value head."
            )
        set_head_counts(attn)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = mlp.down_proj.in_features
