"""The calibrated quantization methods run block by block: GPTQ, AWQ (+ round to nearest), learned rounding, and
AWQ's scales before GPTQ or learned rounding (`AgentOSConfig(awq=True)`).

Per block: the input Hessians of its target layers are collected (GPTQ and AWQ need them), AWQ's scales are searched
and folded (the Hessians rescaled to match), then each layer is rounded by the method and replaced by a
`QuantLinear`; the next block then sees the quantized block's outputs. Learned rounding also gets the float model's
outputs of the block (`run_blocks(..., float_targets=True)`) as its training targets.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.utils import logging

from ..calibration.runner import collect_input_stats, run_blocks
from ..config import AgentOSConfig
from ..nn.linear import SCALE_DTYPES, QuantLinear, float_weight
from ..nn.modeling import set_module
from ..nn.qmath import group_qparams, quantize_codes
from .autoround import DEFAULT_STEPS, learn_block_rounding
from .awq import awq_groups, clip_qparams, fold_block_scales
from .gptq import gptq_quantize


logger = logging.get_logger(__name__)

DESCRIPTIONS = {"gptq": "GPTQ", "awq": "AWQ", "autoround": "Learned rounding"}


def quantize_calibrated(model: nn.Module, names: list[str], ids: torch.Tensor, config: AgentOSConfig,
                        batch_size: int = 4, stats: dict | None = None, groups: list | None = None) -> list[str]:
    """Quantize the target layers `names` of a float model in place with a calibrated method; returns the target
    layers outside the repeated blocks (left in float for the caller). `stats`, when given, receives the learned
    rounding's block-output errors (`{"blocks": [{"loss_rtn", "loss"}, ...]}`); `groups`, AWQ's checked layout
    (`awq.awq_groups`) when the caller has it."""
    uses_awq = config.method == "awq" or bool(config.awq)
    if uses_awq and groups is None:
        groups = awq_groups(model, names)
    scale_dtype = SCALE_DTYPES[config.scale_dtype]
    desc = ("AWQ + " if config.awq else "") + DESCRIPTIONS[config.method]
    if stats is not None:
        stats.setdefault("blocks", [])

    def process(block: nn.Module, layers: dict[str, nn.Module], inputs: list[tuple], targets=None) -> None:
        hessians = None
        if uses_awq or config.method == "gptq":
            accumulators = collect_input_stats(block, layers, inputs)
            if uses_awq:
                modules = dict(model.named_modules())
                block_groups = [(p, c) for p, c in groups if any(n in layers for n in c)]
                hessians = fold_block_scales(modules, block_groups, accumulators, config.bits, config.group_size,
                                             config.sym)
            else:
                hessians = {name: acc.hessian() for name, acc in accumulators.items()}
        if config.method == "autoround":
            steps = config.rounding_steps or DEFAULT_STEPS
            quantized, losses = learn_block_rounding(block, layers, inputs, config.bits, config.group_size, config.sym,
                                                     steps, config.rounding_lr, scale_dtype, targets)
            if stats is not None:
                stats["blocks"].append(losses)
            logger.info(f"learned rounding: block output error {losses['loss_rtn']:.3g} (RTN) -> {losses['loss']:.3g}")
        else:
            quantized = {name: _round_layer(module, hessians[name], config) for name, module in layers.items()}
        for name, (codes, scales, zeros) in quantized.items():
            set_module(model, name, QuantLinear.from_codes(codes, scales, zeros, layers[name].bias, config.bits,
                                                           config.group_size))

    return run_blocks(model, names, ids, process, batch_size, desc, float_targets=config.method == "autoround")


def _round_layer(module: nn.Module, hessian: torch.Tensor, config: AgentOSConfig):
    """`(codes, scales, zeros)` of one layer by GPTQ, or by round to nearest with AWQ's range search (method='awq';
    an explicit `observer` picks the ranges instead)."""
    scale_dtype = SCALE_DTYPES[config.scale_dtype]
    weight = float_weight(module)
    if config.method == "gptq":
        return gptq_quantize(weight, hessian, config.bits, config.group_size, config.sym, config.damp_percent,
                             config.act_order, config.block_size, scale_dtype, config.mse_grid)
    if config.observer is None:
        scales, zeros = clip_qparams(weight, hessian, config.bits, config.group_size, config.sym, scale_dtype)
    else:
        scales, zeros = group_qparams(weight, config.bits, config.group_size, config.sym, scale_dtype, config.mse_grid)
    return quantize_codes(weight, scales, zeros, config.bits, config.group_size), scales, zeros
