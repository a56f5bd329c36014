"""SmoothQuant (Xiao et al. 2023): migrate activation outliers into the weights before W8A8 quantization.

Linear layers reading the same input `X` (q/k/v after `input_layernorm`, gate/up after `post_attention_layernorm`)
get each input channel `j` divided by `s_j = max|X_j|^alpha / max|W_j|^(1-alpha)` in the op producing `X` (the norm's
weight, or the rows of `v_proj`/`up_proj`) and multiplied into their weight column `j`. The float model computes the
same function; the per-token int8 grid of `X / s` no longer has to span a few huge channels, and the weights, rounded
per output row, take the outliers on where they cost less.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.utils import logging

from ..calibration.accumulators import AbsMaxAccumulator
from ..calibration.runner import find_blocks, run_blockwise


logger = logging.get_logger(__name__)

# (producer, consumers) by module names inside a decoder block: the producer's output channel j is, linearly, input
# channel j of every consumer. `smooth_model` checks that the float outputs did not change.
LLAMA_GROUPS = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    # o_proj reads the heads' mixes of v: channel for channel only without grouped-query attention (shapes match)
    ("self_attn.v_proj", ("self_attn.o_proj",)),
    # down_proj reads act(gate_proj(x)) * up_proj(x), linear in up_proj's output (a gated MLP only)
    ("mlp.up_proj", ("mlp.down_proj",)),
)
# smoothing changes the float outputs by rounding only (relative, or 8 epsilons of a 16-bit dtype): more means the
# mapping does not fit the model
MAX_RELATIVE_CHANGE = 1e-3


def smoothing_scales(act_max: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """`s_j = max|X_j|^alpha / max|W_j|^(1-alpha)`, the weight maximum taken over the columns `j` of all `weights`
    (`[out, in]` each). Channels that never fire keep `s_j = 1`."""
    weight_max = torch.cat([w.detach().abs().float() for w in weights]).amax(dim=0).clamp(min=1e-5)
    scales = (act_max.float().pow(alpha) / weight_max.pow(1 - alpha)).clamp(min=1e-5)
    return torch.where(act_max > 0, scales, torch.ones_like(scales))


@torch.no_grad()
def apply_scales(producer: nn.Module, consumers: list[nn.Linear], scales: torch.Tensor) -> None:
    """Divide the producer's output channels by `scales` (a norm's weight and bias, or a linear layer's rows) and
    multiply the consumers' input columns by them, in place."""
    weight = producer.weight
    weight.div_(scales.to(weight).view(-1, *[1] * (weight.dim() - 1)))
    if getattr(producer, "bias", None) is not None:
        producer.bias.div_(scales.to(producer.bias))
    for consumer in consumers:
        consumer.weight.mul_(scales.to(consumer.weight))


def _channels(module: nn.Module) -> int | None:
    """Output channels of a float norm or linear layer (None for packed or missing weights)."""
    weight = getattr(module, "weight", None)
    return weight.shape[0] if isinstance(weight, torch.Tensor) and weight.is_floating_point() else None


def find_groups(model: nn.Module, target_names: list[str]) -> list[tuple[str, list[str]]]:
    """`(producer, consumers)` full names of every Llama-style group whose consumers include a target layer."""
    blocks_name, blocks = find_blocks(model, target_names)
    targets, groups, mismatched = set(target_names), [], set()
    for index, block in enumerate(blocks):
        prefix = f"{blocks_name}.{index}."
        modules = dict(block.named_modules())
        for producer, consumers in LLAMA_GROUPS:
            found = [modules.get(name) for name in (producer, *consumers)]
            if any(m is None for m in found) or not all(isinstance(m, nn.Linear) for m in found[1:]):
                continue
            if producer == "mlp.up_proj" and "mlp.gate_proj" not in modules:
                continue
            if any(m.in_features != _channels(found[0]) for m in found[1:]):
                mismatched.add(producer)  # e.g. v_proj -> o_proj with grouped-query attention
            elif any(prefix + name in targets for name in consumers):
                groups.append((prefix + producer, [prefix + name for name in consumers]))
    if mismatched:
        logger.info(f"SmoothQuant: skipped {sorted(mismatched)} -> their consumers (not channel for channel)")
    return groups


def _output(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids)[0].float()


def smooth_model(
    model: nn.Module, target_names: list[str], calibration_ids: torch.Tensor, alpha: float, batch_size: int = 4
) -> list[tuple[str, list[str]]]:
    """SmoothQuant a float model in place with strength `alpha`; returns the smoothed `(producer, consumers)` groups.

    Raises a `ValueError` when the model has no known mapping (Llama-style blocks: `input_layernorm` ->
    `q/k/v_proj`, `post_attention_layernorm` -> `gate/up_proj`, ...) or when smoothing changed its float outputs,
    undone first.
    """
    groups = find_groups(model, target_names)
    if not groups:
        raise ValueError(
            f"SmoothQuant knows no mapping for {type(model).__name__} (it needs Llama-style blocks: input_layernorm -> "
            "self_attn.q/k/v_proj, post_attention_layernorm -> mlp.gate/up_proj, among the target layers); drop "
            "smoothquant_alpha."
        )
    modules = dict(model.named_modules())
    probe = calibration_ids[:1]
    before = _output(model, probe)
    by_consumers = {consumers[0]: (producer, consumers) for producer, consumers in groups}
    applied = []

    def process(layers, maxima):
        for first in [name for name in layers if name in by_consumers]:
            producer, consumers = by_consumers[first]
            linears = [modules[name] for name in consumers]
            scales = smoothing_scales(maxima[first].max, [m.weight for m in linears], alpha)
            apply_scales(modules[producer], linears, scales)
            applied.append((modules[producer], linears, scales))

    consumer_names = [name for _, consumers in groups for name in consumers]
    run_blockwise(model, consumer_names, calibration_ids, process, batch_size, "SmoothQuant", AbsMaxAccumulator)
    after = _output(model, probe)
    change = ((after - before).abs().max() / before.abs().max().clamp(min=1e-12)).item()
    if change > max(MAX_RELATIVE_CHANGE, 8 * torch.finfo(next(model.parameters()).dtype).eps):
        for producer, linears, scales in reversed(applied):
            apply_scales(producer, linears, scales.reciprocal())
        raise ValueError(
            f"SmoothQuant changed {type(model).__name__}'s float outputs by {change:.2g} (relative), so its blocks do "
            "not compute what the Llama mapping assumes; the smoothing was undone. Drop smoothquant_alpha."
        )
    logger.info(f"SmoothQuant (alpha={alpha}): {len(applied)} groups smoothed, float outputs changed by {change:.2g}")
    return groups
