"""Per-layer sensitivity for mixed precision: how much each layer's quantization to each candidate (bits, group
size) disturbs its decoder block's output on calibration data, one layer at a time, the rest of the block in float.

The error unit is the per-token relative squared error of the block output, `||y_q - y||^2 / ||y||^2`, averaged
over tokens: the block output is the residual stream, whose norm grows with depth and spikes on a few tokens, so a
relative per-token error compares blocks and tokens on one scale. Errors of different layers are then assumed to
add (checked after quantizing by `block_errors`).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibration.accumulators import HessianAccumulator
from ..calibration.runner import capture_block_inputs, find_blocks
from ..config import AgentOSConfig
from ..nn.embedding import quantize_rows_int8
from ..nn.linear import SCALE_DTYPES, float_weight, is_conv1d
from ..nn.qmath import dequantize_codes, quantize_rtn
from .gptq import gptq_quantize


def relative_error(quantized: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Sum over tokens of `||q_t - r_t||^2 / ||r_t||^2` (and the token count), for `[..., hidden]` outputs."""
    diff = (quantized.float() - reference.float()).pow(2).sum(-1)
    return (diff / reference.float().pow(2).sum(-1).clamp(min=1e-12)).sum()


def _output(result):
    return result[0] if isinstance(result, (tuple, list)) else result


def _dequantized(weight, hessian, bits, group_size, config: AgentOSConfig) -> torch.Tensor:
    scale_dtype = SCALE_DTYPES[config.scale_dtype]
    if config.method == "gptq":
        codes, scales, zeros = gptq_quantize(weight, hessian, bits, group_size, config.sym, config.damp_percent,
                                             config.act_order, config.block_size, scale_dtype, config.mse_grid)
    else:
        codes, scales, zeros = quantize_rtn(weight, bits, group_size, config.sym, scale_dtype, config.mse_grid)
    return dequantize_codes(codes, scales, zeros, group_size)


@torch.no_grad()
def layer_sensitivity(model: nn.Module, names: list[str], calibration_ids: torch.Tensor, candidates,
                      config: AgentOSConfig, error_samples: int = 8, batch_size: int = 4) -> dict[str, list[float]]:
    """`{layer: [block-output error of each candidate]}`: each layer quantized alone (GPTQ on the block's float
    inputs from all calibration windows, or RTN), its block run on the first `error_samples` windows."""
    blocks_name, blocks = find_blocks(model, names)
    was_training = model.training
    model.eval()
    first = max(1, min(error_samples, len(calibration_ids)))  # the error windows get batches of their own
    batches = [b for part in (calibration_ids[:first], calibration_ids[first:]) for b in torch.split(part, batch_size)
               if len(b)]
    inputs = capture_block_inputs(model, blocks[0], batches)
    measured = math.ceil(first / batch_size)
    modules = dict(model.named_modules())
    errors: dict[str, list[float]] = {}
    for index in tqdm(range(len(blocks)), desc="Sensitivity", unit="block"):
        block = blocks[index]
        local = [n for n in names if n.startswith(f"{blocks_name}.{index}.")]
        hessians = {n: HessianAccumulator(float_weight(modules[n]).shape[1]) for n in local}
        handles = [modules[n].register_forward_hook(lambda m, a, o, n=n: hessians[n].add(a[0])) for n in local]
        try:
            outputs = [_output(block(*args, **kwargs)) for args, kwargs in inputs]
        finally:
            for handle in handles:
                handle.remove()
        tokens = sum(outputs[i].shape[:-1].numel() for i in range(measured))
        for name in local:
            module = modules[name]
            original = module.weight.data
            weight = float_weight(module).detach().float()
            hessian = hessians[name].hessian() if config.method == "gptq" else None
            errors[name] = []
            for bits, group_size in candidates:
                deq = _dequantized(weight, hessian, bits, group_size, config).to(original.dtype)
                module.weight.data = deq.t().contiguous() if is_conv1d(module) else deq
                total = sum(relative_error(_output(block(*inputs[i][0], **inputs[i][1])), outputs[i])
                            for i in range(measured))
                errors[name].append(float(total) / tokens)
            module.weight.data = original
        for i, (args, kwargs) in enumerate(inputs):  # the float model's inputs for the next block
            inputs[i] = ((outputs[i],) + tuple(args[1:]), kwargs)
    model.train(was_training)
    return errors


@torch.no_grad()
def embedding_int8_error(model: nn.Module, calibration_ids: torch.Tensor) -> float | None:
    """Per-token relative squared error of int8 embedding rows over the calibration tokens, counted twice when the
    model has an output head (its rows get the same per-row int8 rounding; the logits' relative error is taken
    equal to the rows'). None when the input embedding is not an `nn.Embedding`."""
    embedding = model.get_input_embeddings()
    if not isinstance(embedding, nn.Embedding):
        return None
    rows = embedding.weight.detach().float()[calibration_ids.flatten().unique()]
    codes, scale = quantize_rows_int8(rows)
    err = ((codes.float() * scale - rows).pow(2).sum(-1) / rows.pow(2).sum(-1).clamp(min=1e-12)).mean()
    return float(err) * (2 if model.get_output_embeddings() is not None else 1)


@torch.no_grad()
def block_errors(float_model: nn.Module, quantized: nn.Module, names: list[str], calibration_ids: torch.Tensor,
                 batch_size: int = 4) -> list[float]:
    """Measured after quantizing: each block's output error (the unit of `layer_sensitivity`), the quantized block
    and the float one fed the same float inputs; their sum is what the plan predicted."""
    blocks_name, blocks = find_blocks(float_model, names)
    _, qblocks = find_blocks(quantized, [n for n, m in quantized.named_modules() if n.startswith(f"{blocks_name}.")])
    inputs = capture_block_inputs(float_model, blocks[0], list(torch.split(calibration_ids, batch_size)))
    tokens = calibration_ids.numel()
    measured = []
    for block, qblock in zip(blocks, qblocks):
        outputs, total = [], 0.0
        for args, kwargs in inputs:
            reference = _output(block(*args, **kwargs))
            total += float(relative_error(_output(qblock(*args, **kwargs)), reference))
            outputs.append(reference)
        measured.append(total / tokens)
        inputs = [((out,) + tuple(args[1:]), kwargs) for out, (args, kwargs) in zip(outputs, inputs)]
    return measured
