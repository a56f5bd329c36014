"""Block reconstruction after pruning: with the masks fixed, train the kept weights of one decoder block so that its
output matches the dense block's on the calibration inputs.

SparseGPT and Wanda decide each layer alone, from that layer's inputs. Reconstruction then looks at the whole block
(attention and MLP together, norms and residuals included) and moves the surviving weights to cancel what the
layer-wise step could not: mean squared error against the dense block's output, Adam with a cosine-decayed learning
rate, gradients of removed weights zeroed so the sparsity pattern (and so the checkpoint format) never changes.
This is the block-wise fine-tuning of the kept weights studied after SparseGPT (e.g. EBFT, Guo et al. 2024),
run here inside the same block-by-block calibration pass, so it needs no extra memory beyond one block's inputs and
the dense block's outputs (with `streaming=True` those outputs stay in memory: one block's activations on top of the
buffer budget).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..calibration.runner import EVAL_BATCHES, block_output_error, hidden_states_of
from ..nn.linear import is_conv1d


def reconstruct_block(block: nn.Module, layers: dict[str, nn.Module], masks: dict[str, torch.Tensor],
                      inputs: list[tuple], targets: list[torch.Tensor], steps: int, lr: float) -> dict[str, float]:
    """Train the weights of `layers` (full name -> pruned linear inside `block`) for `steps` steps, one calibration
    batch per step (`inputs[i mod len(inputs)]` against `targets[...]`, the dense block's outputs). Weights where
    `masks[name]` is True (removed, `[out, in]`) stay exactly zero. Returns the block-output mean squared error on
    the first `EVAL_BATCHES` batches before (`"loss_pruned"`) and after (`"loss"`) training."""
    weights, keep = [], []
    for name, module in layers.items():
        mask = masks.get(name)
        if mask is None:
            continue
        weight = module.weight
        if not weight.dtype.is_floating_point:
            raise ValueError(f"{name}: reconstruction trains float weights, got {weight.dtype}.")
        removed = mask.t() if is_conv1d(module) else mask  # Conv1D stores [in, out]
        weights.append(weight)
        keep.append(~removed.to(weight.device))
    checked = [inputs[i] for i in range(min(EVAL_BATCHES, len(inputs)))]  # a streamed buffer indexes, not slices
    loss_before = block_output_error(block, checked, targets[:EVAL_BATCHES])
    if not weights or steps == 0:
        return {"loss_pruned": loss_before, "loss": loss_before}
    flags = [p.requires_grad for p in block.parameters()]
    block.requires_grad_(False)
    for weight in weights:
        weight.requires_grad_(True)
    optimizer = torch.optim.Adam(weights, lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps)))
    try:
        with torch.enable_grad():
            for step in range(steps):
                args, kwargs = inputs[step % len(inputs)]
                output = hidden_states_of(block(*args, **kwargs))
                loss = nn.functional.mse_loss(output.float(), targets[step % len(inputs)].float())
                optimizer.zero_grad(set_to_none=False)
                loss.backward()
                for weight, kept in zip(weights, keep):
                    if weight.grad is not None:  # None for a layer this block's forward did not use
                        weight.grad.mul_(kept)
                optimizer.step()
                scheduler.step()
                with torch.no_grad():
                    for weight, kept in zip(weights, keep):
                        weight.mul_(kept)  # Adam never moves a weight whose gradient is always 0; this makes it exact
    finally:
        for weight in weights:
            weight.grad = None
        for p, flag in zip(block.parameters(), flags):
            p.requires_grad_(flag)
    return {"loss_pruned": loss_before, "loss": block_output_error(block, checked, targets[:EVAL_BATCHES])}


def check_reconstruction(config, quantization) -> None:
    """Reconstruction trains float weights: refuse quantizing in the same pass (the layers would be codes by then)."""
    if config.reconstruction_steps and quantization is not None:
        raise ValueError("reconstruction_steps trains the pruned float weights, so it cannot quantize in the same "
                         f"pass (got bits={quantization.bits}); prune with reconstruction first, then quantize the "
                         "pruned checkpoint with `Quantizer`.")
