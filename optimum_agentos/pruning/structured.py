"""Structured pruning that shrinks tensor shapes: MLP neurons, whole KV groups of attention heads, decoder layers.

Works on Llama-style decoders (`model.model.layers[i]` with `self_attn.{q,k,v,o}_proj` and `mlp.{gate,up,down}_proj`).
Uniform pruning keeps every layer alike and updates `config.json`, so the result is a plain transformers checkpoint;
non-uniform pruning leaves the config alone and `formats.shapes` carries the per-layer widths.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.utils import logging

from ..calibration.accumulators import InputMeanSquare
from ..calibration.runner import run_with_hooks
from ..nn.modeling import LAYERS_PREFIX, attention_heads, decoder_layers, keep_layers, set_head_counts
from .masks import check_sparsity


logger = logging.get_logger(__name__)


def _norms(linear: nn.Linear, dim: int) -> torch.Tensor:
    """Norms of the weight's columns (`dim=0`) or rows (`dim=1`), in float32."""
    return linear.weight.detach().float().norm(dim=dim)


def mlp_neuron_scores(
    model: nn.Module, calibration_ids: torch.Tensor | None = None, batch_size: int = 4
) -> list[torch.Tensor]:
    """Importance of each intermediate neuron, one `[intermediate_size]` tensor per layer.

    With calibration ids: Wanda-style `sqrt(E[x_j^2]) * ||down_proj.weight[:, j]||` where `x` is the down_proj input,
    i.e. the typical size of what neuron j writes to the residual stream. Without: the weight-only proxy
    `||gate row j|| * ||up row j|| * ||down column j||`.
    """
    mlps = [layer.mlp for layer in decoder_layers(model)]
    if calibration_ids is None:
        return [_norms(m.gate_proj, 1) * _norms(m.up_proj, 1) * _norms(m.down_proj, 0) for m in mlps]
    stats = [InputMeanSquare() for _ in mlps]
    hooks = [(m.down_proj, st) for m, st in zip(mlps, stats)]
    run_with_hooks(model, calibration_ids, batch_size, hooks, "Scoring neurons")
    return [s.mean().sqrt() * _norms(m.down_proj, 0) for m, s in zip(mlps, stats)]


def attention_group_scores(
    model: nn.Module, calibration_ids: torch.Tensor | None = None, batch_size: int = 4
) -> list[torch.Tensor]:
    """Importance of each KV group (one kv head and the query heads sharing it), one `[num_kv_heads]` tensor per layer.

    With calibration ids: for each o_proj input column `sqrt(E[x_c^2]) * ||o_proj.weight[:, c]||`, summed over the
    columns of the group's query heads (how much the group writes to the residual stream). Without:
    `||v_proj rows of the group|| * sum over its query heads of ||o_proj columns of the head||` (the value path).
    """
    layers = decoder_layers(model)
    if calibration_ids is not None:
        stats = [InputMeanSquare() for _ in layers]
        hooks = [(l.self_attn.o_proj, s) for l, s in zip(layers, stats)]
        run_with_hooks(model, calibration_ids, batch_size, hooks, "Scoring heads")
    scores = []
    for i, layer in enumerate(layers):
        attn = layer.self_attn
        _, num_kv, groups, head_dim = attention_heads(attn)
        if calibration_ids is not None:
            per_column = stats[i].mean().sqrt() * _norms(attn.o_proj, 0)
            scores.append(per_column.view(num_kv, groups * head_dim).sum(1))
        else:
            o_heads = attn.o_proj.weight.detach().float().view(-1, num_kv * groups, head_dim).norm(dim=(0, 2))
            v_groups = attn.v_proj.weight.detach().float().view(num_kv, -1).norm(dim=1)
            scores.append(v_groups * o_heads.view(num_kv, groups).sum(1))
    return scores


@torch.no_grad()
def block_influence(model: nn.Module, calibration_ids: torch.Tensor, batch_size: int = 4) -> torch.Tensor:
    """ShortGPT block influence (Men et al. 2024), `[num_layers]`: mean over tokens of `1 - cos(block input, block
    output)` of the hidden states. Near 0 means the layer barely changes the residual stream: a removal candidate."""
    layers = decoder_layers(model, linears=False)
    totals = torch.zeros(len(layers), dtype=torch.float64)
    counts = torch.zeros(len(layers), dtype=torch.float64)

    def hook(i):
        def fn(module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, (tuple, list)) else output
            cos = nn.functional.cosine_similarity(x.float().flatten(0, -2), y.float().flatten(0, -2), dim=-1)
            totals[i] += (1 - cos).sum().double().cpu()
            counts[i] += cos.numel()

        return fn

    run_with_hooks(model, calibration_ids, batch_size, [(l, hook(i), "forward") for i, l in enumerate(layers)],
                    "Block influence")
    return (totals / counts.clamp(min=1)).float()


def _slice_linear(linear: nn.Linear, keep: torch.Tensor, dim: int) -> None:
    """Keep only the output rows (`dim=0`) or input columns (`dim=1`) `keep` of `linear`, in place."""
    keep = keep.to(linear.weight.device)
    with torch.no_grad():
        weight = linear.weight.index_select(dim, keep).clone()
        linear.weight = nn.Parameter(weight, requires_grad=linear.weight.requires_grad)
        if dim == 0 and linear.bias is not None:
            bias = linear.bias.index_select(0, keep).clone()
            linear.bias = nn.Parameter(bias, requires_grad=linear.bias.requires_grad)
    linear.out_features, linear.in_features = linear.weight.shape


def _kept(size: int, removed: list[int]) -> torch.Tensor:
    drop = set(removed)
    return torch.tensor([j for j in range(size) if j not in drop], dtype=torch.long)


def _check_scores(scores: list[torch.Tensor], sizes: list[int], what: str) -> None:
    if len(scores) != len(sizes) or any(s.numel() != n for s, n in zip(scores, sizes)):
        raise ValueError(
            f"scores must hold one tensor per decoder layer with one entry per {what} (expected sizes {sizes}, got "
            f"{[s.numel() for s in scores]}); compute them on this model right before pruning."
        )


def _lowest_per_layer(scores: list[torch.Tensor], counts: list[int]) -> list[list[int]]:
    return [sorted(torch.topk(s.float().cpu(), k, largest=False).indices.tolist()) for s, k in zip(scores, counts)]


def _lowest_global(scores: list[torch.Tensor], total: int) -> list[list[int]]:
    """One ranking across layers of scores divided by their layer's mean (so layers of different scale compare);
    each layer's best entry is never chosen, so every layer keeps at least one."""
    normalised = []
    for s in scores:
        s = s.float().cpu()
        s = s / s.mean().clamp(min=torch.finfo(torch.float32).tiny)
        normalised.append(s.clone().index_fill_(0, s.argmax().view(1), float("inf")))
    flat = torch.cat(normalised)
    total = min(total, flat.numel() - len(scores))
    chosen = torch.topk(flat, total, largest=False).indices.tolist() if total > 0 else []
    offsets = torch.tensor([0] + [s.numel() for s in scores]).cumsum(0).tolist()
    return [sorted(j - offsets[i] for j in chosen if offsets[i] <= j < offsets[i + 1]) for i in range(len(scores))]


def prune_mlp_neurons(
    model: nn.Module, fraction: float, scores: list[torch.Tensor] | None = None, uniform: bool = True
) -> dict[str, list[int]]:
    """Remove the `fraction` lowest-scoring intermediate neurons (gate/up rows, down columns); returns the removed
    indices per layer, e.g. `{"model.layers.3.mlp": [...]}`.

    `uniform=True` removes `round(I * fraction)` per layer and updates `config.intermediate_size`, so the result is a
    plain checkpoint. `uniform=False` ranks neurons across layers (scores normalised per layer) and leaves the config
    alone: layers end up with different widths, recorded by `module_shapes`.
    """
    check_sparsity(fraction)
    layers = decoder_layers(model)
    sizes = [l.mlp.down_proj.in_features for l in layers]
    scores = mlp_neuron_scores(model) if scores is None else scores
    _check_scores(scores, sizes, "intermediate neuron")
    if uniform:
        removed = _lowest_per_layer(scores, [min(round(n * fraction), n - 1) for n in sizes])
    else:
        removed = _lowest_global(scores, round(sum(sizes) * fraction))
    remove_mlp_neurons(model, removed, update_config=uniform)
    logger.info(f"Removed {sum(map(len, removed))} of {sum(sizes)} MLP neurons ({'uniform' if uniform else 'global'})")
    return {f"{LAYERS_PREFIX}.{i}.mlp": drop for i, drop in enumerate(removed)}


def prune_attention_heads(
    model: nn.Module, num_groups: int, scores: list[torch.Tensor] | None = None, uniform: bool = True
) -> dict[str, list[int]]:
    """Remove whole KV groups (a kv head and the query heads sharing it, so the GQA ratio is kept); returns the
    removed group indices per layer, e.g. `{"model.layers.3.self_attn": [...]}`.

    `uniform=True` removes `num_groups` from every layer and updates the config's head counts (and pins
    `config.head_dim`). `uniform=False` removes `num_groups * num_layers` groups ranked across layers (each keeps at
    least one) and leaves the config alone.
    """
    layers = decoder_layers(model)
    heads = [attention_heads(l.self_attn) for l in layers]
    fewest = min(h[1] for h in heads)
    if not isinstance(num_groups, int) or num_groups < 0:
        raise ValueError(f"num_groups={num_groups!r} must be a non-negative integer (KV groups to remove per layer).")
    if num_groups >= fewest:
        raise ValueError(
            f"num_groups={num_groups} would remove every head: a layer has only {fewest} key/value head groups; "
            f"remove at most {fewest - 1}."
        )
    scores = attention_group_scores(model) if scores is None else scores
    _check_scores(scores, [h[1] for h in heads], "key/value head group")
    if uniform:
        removed = _lowest_per_layer(scores, [num_groups] * len(layers))
    else:
        removed = _lowest_global(scores, num_groups * len(layers))
    remove_attention_groups(model, removed, update_config=uniform)
    logger.info(f"Removed {sum(map(len, removed))} key/value head groups ({'uniform' if uniform else 'global'}).")
    return {f"{LAYERS_PREFIX}.{i}.self_attn": drop for i, drop in enumerate(removed)}


Sliced = dict[str, tuple[int, torch.Tensor]]  # linear name -> (0: rows kept, 1: columns kept; the kept indices)


def remove_mlp_neurons(model: nn.Module, removed: list[list[int]], update_config: bool = True) -> Sliced:
    """Remove the given intermediate neurons of each decoder layer (gate/up rows, down_proj columns) in place.

    `update_config` sets `config.intermediate_size` when every layer ends up with the same width (the result is then
    a plain checkpoint). Returns what was sliced, `{"model.layers.3.mlp.up_proj": (0, kept rows), ...}`."""
    layers = decoder_layers(model)
    sliced = {}
    for i, (layer, drop) in enumerate(zip(layers, removed)):
        if not drop:
            continue
        mlp = layer.mlp
        keep = _kept(mlp.down_proj.in_features, drop)
        for child, dim in (("gate_proj", 0), ("up_proj", 0), ("down_proj", 1)):
            _slice_linear(getattr(mlp, child), keep, dim)
            sliced[f"{LAYERS_PREFIX}.{i}.mlp.{child}"] = (dim, keep)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = len(keep)
    new_sizes = {l.mlp.down_proj.in_features for l in layers}
    if update_config and len(new_sizes) == 1:
        model.config.intermediate_size = new_sizes.pop()
    return sliced


def remove_attention_groups(model: nn.Module, removed: list[list[int]], update_config: bool = True) -> Sliced:
    """Remove the given key/value head groups of each decoder layer (each kv head with its query heads: q/k/v rows,
    o_proj columns) in place.

    `update_config` sets the config's head counts (and pins `config.head_dim`) when every layer ends up alike.
    Returns what was sliced, as `remove_mlp_neurons` does."""
    layers = decoder_layers(model)
    sliced = {}
    for i, (layer, drop) in enumerate(zip(layers, removed)):
        if not drop:
            continue
        attn = layer.self_attn
        _, num_kv, groups, head_dim = attention_heads(attn)
        kv_keep = _kept(num_kv * head_dim, [g * head_dim + d for g in drop for d in range(head_dim)])
        q_width = groups * head_dim  # the query heads of group g are g*groups ... (g+1)*groups-1 (head-major rows)
        q_keep = _kept(num_kv * q_width, [g * q_width + d for g in drop for d in range(q_width)])
        for child, keep, dim in (("q_proj", q_keep, 0), ("k_proj", kv_keep, 0), ("v_proj", kv_keep, 0),
                                 ("o_proj", q_keep, 1)):
            _slice_linear(getattr(attn, child), keep, dim)
            sliced[f"{LAYERS_PREFIX}.{i}.self_attn.{child}"] = (dim, keep)
        set_head_counts(attn)
    new_heads = {attention_heads(l.self_attn) for l in layers}
    if update_config and len(new_heads) == 1:
        num_heads, num_kv, _, head_dim = new_heads.pop()
        model.config.head_dim = head_dim  # else hidden_size // num_attention_heads would change it on reload
        model.config.num_attention_heads, model.config.num_key_value_heads = num_heads, num_kv
    return sliced


def remove_layers(model: nn.Module, indices: list[int]) -> None:
    """Delete decoder layers in place, renumbering the kept layers' `layer_idx` (their KV cache slot) and updating
    `config.num_hidden_layers` and the per-layer config lists (`layer_types`)."""
    count = len(decoder_layers(model, linears=False))
    indices = list(indices)
    bad = [i for i in indices if not isinstance(i, int) or not 0 <= i < count]
    if bad:
        raise ValueError(f"Layer indices {bad} are out of range: {type(model).__name__} has layers 0..{count - 1}.")
    if len(set(indices)) != len(indices):
        raise ValueError(f"Layer indices {indices} hold duplicates; list each layer to remove once.")
    if len(indices) >= count:
        raise ValueError(f"Removing layers {sorted(indices)} would remove all {count} decoder layers; keep one.")
    keep_layers(model, [i for i in range(count) if i not in set(indices)])
