"""Mixed precision under a size budget: per-layer sensitivity, then the per-layer bits/group size (and int8 or float
embeddings) that fit `max_size_mb` on disk with the least predicted error (`plan_mixed_precision`)."""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.utils import logging

from ..config import AgentOSConfig
from ..formats.replace import check_group_size
from ..nn.linear import linear_shape
from ..nn.targets import resolve_targets
from .budget import DEFAULT_CANDIDATES, checkpoint_bytes, greedy_plan, header_bytes_bound, layer_bytes, saved_tensors
from .sensitivity import embedding_int8_error, layer_sensitivity


logger = logging.get_logger(__name__)


@dataclass
class MixedPrecisionPlan:
    """What `plan_mixed_precision` chose: the config to quantize with, each layer's format, bytes and predicted
    error, and the checkpoint's exact tensor bytes and upper bound on disk."""

    config: AgentOSConfig
    max_size_mb: float
    layers: dict[str, dict] = field(default_factory=dict)
    embedding: dict = field(default_factory=dict)
    tensor_bytes: int = 0
    size_bound: int = 0
    predicted_error: float = 0.0
    seconds: float = 0.0
    sensitivity: dict[str, list[float]] = field(default_factory=dict)
    candidates: list = field(default_factory=list)

    def formats(self) -> dict[str, int]:
        """How many layers got each format, e.g. `{"int4 g128": 150, "int8 per-row": 60}`."""
        return dict(Counter(_label(d["bits"], d["group_size"]) for d in self.layers.values()).most_common())

    def to_dict(self) -> dict:
        return {
            "max_size_mb": self.max_size_mb, "tensor_bytes": self.tensor_bytes, "size_bound_bytes": self.size_bound,
            "predicted_error": self.predicted_error, "embedding": self.embedding, "formats": self.formats(),
            "layers": self.layers, "seconds": round(self.seconds, 1),
            "candidates": [list(c) for c in self.candidates], "sensitivity": self.sensitivity,
        }


def _label(bits: int, group_size: int) -> str:
    return f"int{bits} " + ("per-row" if group_size == -1 else f"g{group_size}")


def float16_bytes(model: nn.Module) -> int:
    """Tensor bytes of the model saved unquantized in 16-bit floats (tied tensors once)."""
    return sum(p.numel() * min(p.element_size(), 2) for p in model.parameters())


def plan_mixed_precision(
    model: nn.Module, calibration_ids: torch.Tensor, max_size_mb: float, candidates=DEFAULT_CANDIDATES,
    base: AgentOSConfig | None = None, error_samples: int = 8, batch_size: int = 4, sensitivity: dict | None = None,
    sensitivity_method: str | None = None,
) -> MixedPrecisionPlan:
    """Choose per-layer formats from `candidates` (`(bits, group_size)` pairs) and int8 or float embeddings so that
    the checkpoint's safetensors files take at most `max_size_mb` MB (10^6 bytes) with the least summed
    block-output error (`sensitivity.layer_sensitivity`, GPTQ or RTN as `base.method`).

    `sensitivity` (`{layer: [error per candidate]}`, e.g. an earlier plan's `sensitivity`) skips the calibration
    pass, to plan several budgets from one measurement. `sensitivity_method="rtn"` measures the candidates with
    round-to-nearest (no Hessians, only the error windows run: minutes less) even when `base.method` is GPTQ.

    Raises `ValueError` for a budget below the smallest plan (every layer at its smallest candidate, int8
    embeddings) or one that holds the whole model unquantized in 16-bit floats."""
    import time

    start = time.perf_counter()
    base = base or AgentOSConfig(method="gptq")
    if base.layer_overrides or base.activations or base.smoothquant_alpha is not None:
        raise ValueError("plan_mixed_precision sets layer_overrides itself, for weight-only checkpoints: pass a base "
                         "config without layer_overrides, activations or smoothquant_alpha.")
    candidates = [tuple(c) for c in candidates]
    if not candidates:
        raise ValueError("candidates is empty; pass (bits, group_size) pairs such as (4, 128).")
    for bits, group_size in candidates:  # a bad pair is named before minutes of calibration
        AgentOSConfig(bits=bits, group_size=group_size)
    if not isinstance(max_size_mb, (int, float)) or isinstance(max_size_mb, bool) or max_size_mb <= 0:
        raise ValueError(f"max_size_mb={max_size_mb!r} must be a positive number of MB (10^6 bytes).")
    budget = int(max_size_mb * 1e6)
    names = resolve_targets(model, base.target, base.ignore)
    check_group_size(model, names, base)
    float16 = float16_bytes(model)
    if budget >= float16:
        raise ValueError(
            f"max_size_mb={max_size_mb} holds the whole model unquantized in 16-bit floats ({float16 / 1e6:.1f} MB): "
            "nothing needs quantizing. Save it with model.half().save_pretrained(...), or ask for less than "
            f"{float16 / 1e6:.1f} MB."
        )
    shapes = {n: linear_shape(model.get_submodule(n)) for n in names}  # (in, out)
    sizes = {n: [layer_bytes(o, i, b, g, base.scale_dtype) for b, g in candidates] for n, (i, o) in shapes.items()}
    smallest = min(range(len(candidates)), key=lambda k: sum(sizes[n][k] for n in names))
    embedding_error = embedding_int8_error(model, calibration_ids)
    fixed = {}  # bytes besides the target layers, with int8 (8) or float (None) embeddings
    for embedding_bits in ([8, None] if embedding_error is not None else [None]):
        config = _config(base, {n: candidates[smallest] for n in names}, embedding_bits)
        tensors = saved_tensors(model, config)
        data = sum(dt.itemsize * int(torch.Size(s).numel()) for dt, s in tensors.values())
        # the header's bound, with room for the widest shape digits any candidate could give
        header = header_bytes_bound(tensors) + 16 * len(tensors)
        fixed[embedding_bits] = data - sum(sizes[n][smallest] for n in names) + header
    cheapest = min(fixed.values()) + sum(min(s) for s in sizes.values())
    if budget < cheapest:
        raise ValueError(
            f"max_size_mb={max_size_mb} is below the smallest checkpoint these candidates allow: {cheapest / 1e6:.2f} "
            f"MB (every layer at its smallest format{', int8 embeddings' if 8 in fixed else ''}). Raise max_size_mb "
            "or add smaller candidates (e.g. (2, 64))."
        )
    if sensitivity is not None:
        missing = [n for n in names if len(sensitivity.get(n, [])) != len(candidates)]
        if missing:
            raise ValueError(f"sensitivity has no error per candidate for {missing[:3]}; measure it with the same "
                             "candidates and targets (or pass sensitivity=None).")
        errors = {n: list(sensitivity[n]) for n in names}
    else:
        measure = base
        if sensitivity_method not in (None, base.method):
            measure = copy.deepcopy(base)
            measure.method = sensitivity_method
            measure.validate()
        ids = calibration_ids[:error_samples] if measure.method == "rtn" else calibration_ids
        errors = layer_sensitivity(model, names, ids, candidates, measure, error_samples, batch_size)
    items = {n: list(zip(sizes[n], errors[n])) for n in names}
    low = min(fixed.values())
    embedding_options = [(fixed[e] - low, 0.0 if e is None else embedding_error) for e in fixed]
    items["<embeddings>"] = embedding_options
    choice = greedy_plan(items, budget - low)
    embedding_bits = list(fixed)[choice.pop("<embeddings>")]
    chosen = {n: candidates[k] for n, k in choice.items()}
    config = _config(base, chosen, embedding_bits)
    data, bound = checkpoint_bytes(model, config)
    if bound > budget:  # cannot happen with the reserve above; a clear failure if the format's sizes ever change
        raise RuntimeError(f"mixed-precision plan takes up to {bound} bytes, over the budget {budget}; please report.")
    plan = MixedPrecisionPlan(config=config, max_size_mb=max_size_mb, tensor_bytes=data, size_bound=bound,
                              sensitivity=errors, candidates=candidates)
    plan.layers = {n: {"bits": b, "group_size": g, "bytes": sizes[n][choice[n]],
                       "predicted_error": errors[n][choice[n]]} for n, (b, g) in chosen.items()}
    plan.embedding = {"embedding_bits": embedding_bits, "predicted_error": embedding_error if embedding_bits else 0.0}
    plan.predicted_error = sum(d["predicted_error"] for d in plan.layers.values()) + plan.embedding["predicted_error"]
    plan.seconds = time.perf_counter() - start
    logger.info(f"Mixed-precision plan for {max_size_mb} MB: {plan.formats()}, embeddings "
                f"{'int8' if embedding_bits else base.float_dtype}, predicted error {plan.predicted_error:.4g}")
    return plan


def _config(base: AgentOSConfig, chosen: dict[str, tuple[int, int]], embedding_bits) -> AgentOSConfig:
    """`base` with the most common choice as its bits/group size and the others as `layer_overrides`."""
    bits, group_size = Counter(chosen.values()).most_common(1)[0][0]
    overrides = {n: {"bits": b, "group_size": g} for n, (b, g) in chosen.items() if (b, g) != (bits, group_size)}
    config = copy.deepcopy(base)
    config.bits, config.group_size, config.embedding_bits = bits, group_size, embedding_bits
    config.layer_overrides = overrides or None
    config.validate()
    return config
