"""Model surgery shared by the format, the pruner and the distiller: find a model's stack of layers, keep a subset
of it, replace a submodule, and read the Llama-style decoder layout that structured pruning changes."""

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


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` at the dotted `name` of `model`."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


SUPPORTED = (
    "Llama-style decoders (e.g. LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM): model.model.layers[i] with "
    "self_attn.{q,k,v,o}_proj and mlp.{gate,up,down}_proj as plain nn.Linear layers"
)
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
LAYERS_PREFIX = "model.layers"


def decoder_layers(model: nn.Module, linears: bool = True) -> nn.ModuleList:
    """`model.model.layers`, after checking the layout this module can slice (with `linears`, every projection)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ValueError(
            f"Structured pruning does not support {type(model).__name__}: it has no `model.layers` list of decoder "
            f"layers. Supported: {SUPPORTED}."
        )
    for i, layer in enumerate(layers):
        parts = [("self_attn", p) for p in ATTENTION] + [("mlp", p) for p in MLP] if linears else [("self_attn", None)]
        for parent, child in parts:
            module = getattr(layer, parent, None)
            if child is not None:
                module = getattr(module, child, None)
            if module is None or (child is not None and type(module) is not nn.Linear):
                where = f"{LAYERS_PREFIX}.{i}.{parent}" + (f".{child}" if child else "")
                found = "missing" if module is None else f"a {type(module).__name__}"
                raise ValueError(
                    f"Structured pruning does not support {type(model).__name__}: `{where}` is {found}. "
                    f"Supported: {SUPPORTED} (prune before quantizing or sparsifying)."
                )
    return layers


def attention_heads(attn: nn.Module) -> tuple[int, int, int, int]:
    """`(query heads, kv heads, queries per kv head, head_dim)` of one attention module, read from its shapes."""
    head_dim, groups = attn.head_dim, attn.num_key_value_groups
    return attn.q_proj.out_features // head_dim, attn.k_proj.out_features // head_dim, groups, head_dim


def set_head_counts(attn: nn.Module) -> None:
    """Refresh the head-count attributes some attention classes keep (head_dim and the GQA ratio do not change)."""
    num_heads, num_kv, _, _ = attention_heads(attn)
    for name, value in (("num_heads", num_heads), ("num_attention_heads", num_heads), ("num_key_value_heads", num_kv)):
        if hasattr(attn, name):
            setattr(attn, name, value)
