"""Module replacement from an `AgentOSConfig`: empty compressed layers for the loader to fill, and back to float."""

from __future__ import annotations

import torch
from torch import nn

from ..config import AgentOSConfig
from ..nn.embedding import QuantEmbedding, QuantHead
from ..nn.float_head import plain_head
from ..nn.linear import SCALE_DTYPES, QuantLinear, is_conv1d, linear_shape
from ..nn.modeling import set_module
from ..nn.sparse_linear import SparseLinear
from ..nn.targets import resolve_targets
from .shapes import apply_module_shapes


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


def check_layer_overrides(config: AgentOSConfig, quantized: list[str]) -> None:
    """Every `layer_overrides` entry names a layer the config quantizes (a typo must not silently use defaults)."""
    stray = sorted(set(config.layer_overrides or {}) - set(quantized))
    if stray:
        raise ValueError(
            f"layer_overrides names {stray[:3]}{' ...' if len(stray) > 3 else ''}, not among the layers this config "
            f"quantizes (e.g. {quantized[:2]}); use full module names of target layers."
        )


def replace_with_quant_linear(model: nn.Module, config: AgentOSConfig, device="meta") -> list[str]:
    """Replace the modules an agentos checkpoint stores compressed by empty `QuantLinear`/`SparseLinear`s, to be
    filled by the weight loader; returns their names.

    `config.sparse_layers` become `SparseLinear` (quantized too when also selected by `target`/`ignore`), the other
    selected layers `QuantLinear`. A replaced `Conv1D` is marked `transposed=True`: its float weight is `[in, out]`.
    """
    if config.module_shapes:
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
    check_layer_overrides(config, quantized)
    for name in list(dict.fromkeys([*quantized, *sparse])):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child)
        in_features, out_features = linear_shape(old)
        bias = getattr(old, "bias", None)
        bits, group_size = config.layer_qparams(name)
        bits = bits if name in quantized else None
        dtype = bias.dtype if bias is not None else old.weight.dtype
        with torch.device(device):
            if name in sparse:
                new = SparseLinear(
                    in_features, out_features, sparse[name], bias=bias is not None, bits=bits,
                    group_size=group_size, scale_dtype=SCALE_DTYPES[config.scale_dtype], dtype=dtype,
                )
            else:
                new = QuantLinear(
                    in_features, out_features, bias=bias is not None, bits=bits, group_size=group_size,
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


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every `QuantLinear`/`SparseLinear` by an `nn.Linear` holding its dense weight (zeros where pruned)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, (QuantLinear, SparseLinear)):
            weight = module.dequantize(dtype or torch.float32)
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            linear.weight = nn.Parameter(weight)
            if module.bias is not None:
                linear.bias = nn.Parameter(module.bias.detach().to(weight.dtype))
            set_module(model, name, linear)
    dequantize_embeddings(model, dtype)
    plain_head(model)
    return model


def replace_embeddings_for_loading(model: nn.Module, device="meta") -> None:
    """Empty int8 embedding and head modules for the loader to fill; when the model ties them, the head's scale is
    added to the model's tied-weight keys so it is tied (and saved once) like the codes."""
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if not isinstance(embedding, nn.Embedding):
        raise ValueError(f"This checkpoint has int8 embeddings (embedding_bits=8) but {type(model).__name__}'s input "
                         f"embedding is a {type(embedding).__name__}; the config.json does not match the model.")
    new_embedding = QuantEmbedding(embedding.num_embeddings, embedding.embedding_dim, embedding.padding_idx,
                                   embedding.weight.dtype, device)
    model.set_input_embeddings(new_embedding)
    if isinstance(head, nn.Linear):
        model.set_output_embeddings(QuantHead(head.in_features, head.out_features, device))
        tied = getattr(model, "all_tied_weights_keys", None) or {}
        head_name, embedding_name = _name_of(model, model.get_output_embeddings()), _name_of(model, new_embedding)
        if tied.get(f"{head_name}.weight") == f"{embedding_name}.weight":
            tied[f"{head_name}.weight_scale"] = f"{embedding_name}.weight_scale"


def dequantize_embeddings(model: nn.Module, dtype: torch.dtype | None = None) -> None:
    """Float `nn.Embedding` / `nn.Linear` back in place of the int8 ones (still tied when they were)."""
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if isinstance(embedding, QuantEmbedding):
        weight = nn.Parameter(embedding.dequantize(dtype))
        new = nn.Embedding(embedding.num_embeddings, embedding.embedding_dim, embedding.padding_idx, device="meta")
        new.weight = weight
        model.set_input_embeddings(new)
        if isinstance(head, QuantHead):
            tied = head.weight is embedding.weight
            linear = nn.Linear(head.in_features, head.out_features, bias=False, device="meta")
            linear.weight = weight if tied else nn.Parameter(head.dequantize(dtype or weight.dtype))
            model.set_output_embeddings(linear)


def _name_of(model: nn.Module, module: nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is module)
