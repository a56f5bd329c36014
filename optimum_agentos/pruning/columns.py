"""Input-column pruning, `PruningConfig(method="column_magnitude")`: the importance of input feature j of a linear
layer is the sum over its outputs of |W[:, j]| (`|W|.sum(dim=0)`), optionally times the RMS of input j over the
calibration tokens (`calibrated=True`, as Wanda does); the features below a threshold, or the lowest fraction, go.

Where the producer of a layer's input is known, the features are removed for real and the shapes shrink:

- `mlp.down_proj` of a Llama-style decoder layer: input j is intermediate neuron j, made by row j of gate/up_proj;
  the neuron goes (those rows and the column), which computes exactly what zeroing the column does.
- `self_attn.o_proj`: its inputs are the query heads' outputs, and a query head can only go with its whole
  key/value group (the model's GQA ratio is one number), so the unit is the group: its importance is the mean of its
  columns' importance, and it goes when that is below the threshold (or among the lowest fraction of groups). Single
  o_proj columns are never zeroed.

Every other target layer (q/k/v/gate/up_proj read the residual stream that every layer shares; models outside the
Llama layout) has its columns zeroed, then is stored as `SparseLinear`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..calibration.accumulators import InputMeanSquare
from ..calibration.runner import run_with_hooks
from ..nn.linear import float_weight
from ..nn.modeling import LAYERS_PREFIX, attention_heads, decoder_layers
from .config import PruningConfig
from .masks import column_scores, score_range, threshold_error, threshold_limit
from .structured import Sliced, remove_attention_groups, remove_mlp_neurons


@dataclass
class ColumnPlan:
    """What a column prune removes: `units[name]` the removed units (columns, or KV groups for o_proj), `width[name]`
    the columns per unit, `producer[name]` `("mlp" | "attention", layer index)` where the removal is real."""

    units: dict[str, list[int]] = field(default_factory=dict)
    width: dict[str, int] = field(default_factory=dict)
    producer: dict[str, tuple[str, int]] = field(default_factory=dict)
    in_features: dict[str, int] = field(default_factory=dict)

    def columns(self, name: str) -> list[int]:
        w = self.width[name]
        return [u * w + d for u in self.units[name] for d in range(w)]

    def zero_masks(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """`{name: bool [out, in] mask}` of the layers whose columns are zeroed (no known producer)."""
        modules = dict(model.named_modules())
        masks = {}
        for name in self.units:
            if name not in self.producer:
                weight = float_weight(modules[name])
                mask = torch.zeros(weight.shape, dtype=torch.bool, device=weight.device)
                mask[:, self.columns(name)] = True
                masks[name] = mask
        return masks

    def report(self) -> dict:
        """Per layer the input features removed, of how many, and how (`removed`: shapes shrank; `zeroed`)."""
        layers = {
            n: {"removed": len(self.units[n]) * self.width[n], "of": self.in_features[n],
                "how": "removed" if n in self.producer else "zeroed"}
            for n in self.units
        }
        removed, total = sum(v["removed"] for v in layers.values()), sum(v["of"] for v in layers.values())
        return {"layers": layers, "removed": removed, "of": total, "fraction": removed / total if total else 0.0}


def producers(model: nn.Module) -> dict[str, tuple[str, int, int]]:
    """`{linear name: (kind, decoder layer index, columns per unit)}` of the layers whose input features can be
    removed for real; empty for models outside the Llama-style layout."""
    try:
        layers = decoder_layers(model)
    except ValueError:
        return {}
    found = {}
    for i, layer in enumerate(layers):
        found[f"{LAYERS_PREFIX}.{i}.mlp.down_proj"] = ("mlp", i, 1)
        _, _, groups, head_dim = attention_heads(layer.self_attn)
        found[f"{LAYERS_PREFIX}.{i}.self_attn.o_proj"] = ("attention", i, groups * head_dim)
    return found


def input_mean_squares(model: nn.Module, names: list[str], ids: torch.Tensor, batch_size: int) -> dict[str, torch.Tensor]:
    """E[x_j^2] of every input of the named layers over the calibration set (one pass of the dense model)."""
    modules = dict(model.named_modules())
    stats = {n: InputMeanSquare() for n in names}
    run_with_hooks(model, ids, batch_size, [(modules[n], s) for n, s in stats.items()], "Scoring input columns")
    missing = [n for n, s in stats.items() if s.total is None]
    if missing:
        raise ValueError(f"No calibration input reached {missing}; calibrated=True needs layers the model's decoder "
                         "runs. Leave them out with ignore=[...] or use calibrated=False.")
    return {n: s.mean() for n, s in stats.items()}


def plan_columns(model: nn.Module, names: list[str], config: PruningConfig, mean_squares=None) -> ColumnPlan:
    """Score every target layer's input features and choose what goes; raises `ValueError` (before anything
    changes) when that is nothing at all, or every feature of a layer."""
    modules, known = dict(model.named_modules()), producers(model)
    plan, scores, unit_scores = ColumnPlan(), {}, {}
    for name in names:
        weight = float_weight(modules[name])
        scores[name] = column_scores(weight, None if mean_squares is None else mean_squares[name])
        kind = known.get(name)
        width = kind[2] if kind else 1
        unit_scores[name] = scores[name].view(-1, width).mean(1)
        plan.width[name], plan.in_features[name] = width, weight.shape[1]
        if kind:
            plan.producer[name] = kind[:2]
    if config.threshold is not None:
        for name in names:
            limit = threshold_limit(scores[name], config.threshold, config.scope)
            plan.units[name] = torch.nonzero(unit_scores[name] < limit).flatten().tolist()
    elif config.scope == "global":
        plan.units = _lowest_global(unit_scores, plan.width, config.sparsity)
    else:
        for name in names:
            n = unit_scores[name].numel()
            k = min(round(n * config.layer_sparsity_of(name)), n - 1)
            plan.units[name] = sorted(torch.topk(unit_scores[name], k, largest=False).indices.tolist())
    _check_plan(plan, scores, config)
    return plan


def _lowest_global(unit_scores: dict, width: dict, fraction: float) -> dict[str, list[int]]:
    """The lowest-scoring units across all layers (raw scores, as global magnitude does) until `fraction` of all
    input features is reached."""
    names = list(unit_scores)
    flat = torch.cat([unit_scores[n] for n in names])
    widths = torch.cat([torch.full((unit_scores[n].numel(),), width[n]) for n in names])
    order = torch.argsort(flat, stable=True)
    before = torch.cumsum(widths[order], 0) - widths[order]
    chosen = order[before < round(int(widths.sum()) * fraction)].tolist()
    offsets = torch.tensor([0] + [unit_scores[n].numel() for n in names]).cumsum(0).tolist()
    return {n: sorted(j - offsets[i] for j in chosen if offsets[i] <= j < offsets[i + 1]) for i, n in enumerate(names)}


def _check_plan(plan: ColumnPlan, scores: dict, config: PruningConfig) -> None:
    how = f"threshold={config.threshold:g}" if config.threshold is not None else f"sparsity={config.sparsity}"
    for name, units in plan.units.items():
        if len(units) * plan.width[name] == plan.in_features[name]:
            what = f"removes every input feature of {name}"
            if config.threshold is not None:
                raise ValueError(threshold_error(config.threshold, config.scope, what, score_range(scores[name], config.scope)))
            raise ValueError(f"{how} (scope={config.scope!r}) {what}; lower it, use scope='layer' or leave the layer "
                             "out with ignore=[...]. Nothing was written.")
    if not any(plan.units.values()):
        what = f"removes no input feature of the {len(plan.units)} target layers"
        if config.threshold is not None:
            ranges = [score_range(s, config.scope) for s in scores.values()]
            lo_hi = (min(r[0] for r in ranges), max(r[1] for r in ranges))
            raise ValueError(threshold_error(config.threshold, config.scope, what, lo_hi))
        raise ValueError(f"{how} {what} (o_proj loses whole key/value groups); raise it. Nothing was written.")


def remove_planned(model: nn.Module, plan: ColumnPlan) -> Sliced:
    """Remove the planned MLP neurons and key/value groups for real (the config follows when every layer stays
    alike); returns what was sliced so masks of the producers can follow."""
    count = len(decoder_layers(model, linears=False)) if plan.producer else 0
    removed = {"mlp": [[] for _ in range(count)], "attention": [[] for _ in range(count)]}
    for name, (kind, i) in plan.producer.items():
        removed[kind][i] = plan.units[name]
    sliced = {}
    if any(removed["mlp"]):
        sliced.update(remove_mlp_neurons(model, removed["mlp"]))
    if any(removed["attention"]):
        sliced.update(remove_attention_groups(model, removed["attention"]))
    return sliced
