"""Model surgery shared by the pruner and the distiller: find a model's stack of layers and keep a subset of it."""

from __future__ import annotations

import torch.nn as nn
from transformers.utils import logging


logger = logging.get_logger(__name__)

# Config fields that hold one entry per layer and must shrink with the layer list.
PER_LAYER_CONFIG_LISTS = ("layer_types",)


def find_layer_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The dotted name and the `nn.ModuleList` of a model's transformer layers (`model.layers`, `bert.encoder.layer`,
    ...): the list whose length is `config.num_hidden_layers`, the largest if several."""
    count = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    found = [
        (name, module) for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == count and count
    ]
    if not found:
        raise ValueError(
            f"{type(model).__name__} has no list of {count} layers (config.num_hidden_layers) to select from; "
            "layer selection supports models that keep their layers in one nn.ModuleList."
        )
    return max(found, key=lambda item: sum(p.numel() for p in item[1].parameters()))


def keep_layers(model: nn.Module, keep: list[int]) -> None:
    """Keep only the layers at `keep` (in that order) in place, renumbering their `layer_idx` (KV-cache slots) and
    updating `config.num_hidden_layers` and per-layer config lists such as `layer_types`."""
    name, layers = find_layer_list(model)
    count = len(layers)
    bad = [i for i in keep if not isinstance(i, int) or not 0 <= i < count]
    if bad:
        raise ValueError(f"Layer indices {bad} are out of range: {type(model).__name__} has layers 0..{count - 1}.")
    if len(set(keep)) != len(keep):
        raise ValueError(f"Layer indices {list(keep)} hold duplicates; list each layer once.")
    if not keep:
        raise ValueError(f"Keeping no layer of {type(model).__name__} leaves no model; keep at least one.")
    kept = [layers[i] for i in keep]
    for new_idx, layer in enumerate(kept):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_idx
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, nn.ModuleList(kept))
    config = model.config
    for field_name in PER_LAYER_CONFIG_LISTS:
        values = getattr(config, field_name, None)
        if isinstance(values, (list, tuple)) and len(values) == count:
            setattr(config, field_name, type(values)(values[i] for i in keep))
    config.num_hidden_layers = len(kept)
    logger.info(f"Kept layers {list(keep)} of {count}.")
