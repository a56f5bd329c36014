"""Learned rounding (AutoRound / SignRound, Cheng et al. 2023), one decoder block at a time.

Each weight is rounded as `clamp(round(w / scale + v) + zero, 0, 2^bits - 1)` with a learned offset `v` in
[-0.5, 0.5] (0: round to nearest), and each group's min/max range is multiplied by learned factors in [0.5, 1]
(clipping). Both are trained for the block, fed what the blocks already quantized produce, to reproduce the float
model's output at that block (the float blocks run on the float model's own inputs beside it, as AutoRound's
default does): so each block also makes up for the error the blocks before it left. Mean squared error, gradients
through `round` by the straight-through estimator, and signed gradient descent (each step moves every parameter by
the learning rate, decayed linearly to 0: at most `lr * steps / 2` in all, so `v` can reach the other rounding of
any weight without overshooting). The result is ordinary codes, scales and zero points, so the format, the kernels
and the exporters do not change.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.utils import logging

from ..calibration.runner import EVAL_BATCHES, block_call, block_output_error, block_outputs, hidden_states_of
from ..nn.linear import float_weight, is_conv1d
from ..nn.qmath import effective_group_size, num_groups


logger = logging.get_logger(__name__)

DEFAULT_STEPS = 200
MIN_RANGE = 0.5  # range factors stay in [0.5, 1]


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    """`round(x)` whose gradient is the identity (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


class LearnedRounding(nn.Module):
    """The trainable rounding of one weight `[out, in]`: offsets `v` `[out, in]` and range factors `[out, groups]`."""

    def __init__(self, weight: torch.Tensor, bits: int, group_size: int, sym: bool):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.bits, self.sym, self.maxq = bits, sym, (1 << bits) - 1
        self.group_size = effective_group_size(self.in_features, group_size)
        self.groups = num_groups(self.in_features, group_size)
        pad = self.groups * self.group_size - self.in_features  # a short last group padded with zeros (no effect
        w = nn.functional.pad(weight.detach().float(), (0, pad))  # on min/max, which include 0)
        self.register_buffer("weight", w.view(self.out_features, self.groups, self.group_size))
        self.offset = nn.Parameter(torch.zeros_like(self.weight))
        self.max_factor = nn.Parameter(torch.ones(self.out_features, self.groups, 1))
        self.min_factor = nn.Parameter(torch.ones(self.out_features, self.groups, 1))

    def qparams(self, scale_dtype: torch.dtype | None = None):
        """Per-group `(scale, zero)` `[out, groups, 1]`; `scale_dtype` rounds the scale as the checkpoint stores it."""
        wmax = self.weight.amax(dim=-1, keepdim=True).clamp(min=0) * self.max_factor
        wmin = self.weight.amin(dim=-1, keepdim=True).clamp(max=0) * self.min_factor
        if self.sym:
            scale = 2 * torch.maximum(wmax, -wmin) / self.maxq
            zero = torch.full_like(scale, float((self.maxq + 1) // 2))
        else:
            scale = (wmax - wmin) / self.maxq
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        if not self.sym:  # from the unrounded scale, as round to nearest does (`nn.qmath.compute_qparams`)
            zero = torch.clamp(_round_ste(-wmin / scale), 0, self.maxq)
        if scale_dtype is not None:
            scale = scale.to(scale_dtype).float()
            scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return scale, zero

    def codes(self, scale, zero) -> torch.Tensor:
        return torch.clamp(_round_ste(self.weight / scale + self.offset) + zero, 0, self.maxq)

    def forward(self) -> torch.Tensor:
        """The rounded weight `[out, in]`, differentiable in the offsets and range factors."""
        scale, zero = self.qparams()
        weight = (self.codes(scale, zero) - zero) * scale
        return weight.view(self.out_features, -1)[:, : self.in_features]

    @torch.no_grad()
    def export(self, scale_dtype: torch.dtype):
        """`(codes uint8 [out, in], scales [out, groups] in scale_dtype, zeros uint8 [out, groups])`."""
        scale, zero = self.qparams(scale_dtype)
        codes = self.codes(scale, zero).view(self.out_features, -1)[:, : self.in_features]
        return codes.to(torch.uint8), scale.squeeze(-1).to(scale_dtype), zero.squeeze(-1).to(torch.uint8)

    @torch.no_grad()
    def clamp_(self) -> None:
        self.offset.clamp_(-0.5, 0.5)
        self.max_factor.clamp_(MIN_RANGE, 1.0)
        self.min_factor.clamp_(MIN_RANGE, 1.0)


def learn_block_rounding(block: nn.Module, layers: dict[str, nn.Module], inputs: list[tuple], bits: int,
                         group_size: int, sym: bool, steps: int = DEFAULT_STEPS, lr: float | None = None,
                         scale_dtype: torch.dtype = torch.float16,
                         targets: list[torch.Tensor] | None = None) -> tuple[dict[str, tuple], dict[str, float]]:
    """Learn the rounding of `layers` (full name -> float linear inside `block`) so that the block, run on `inputs`
    (`(args, kwargs)` per batch; step `i` trains on batch `i mod len(inputs)`), reproduces `targets` (one output
    per batch: the float model's, from `run_blocks(..., float_targets=True)`; default: the float block's own
    output on `inputs`).

    Returns `({name: (codes, scales, zeros)}, {"loss_rtn": ..., "loss": ...})`: the exported quantization and the
    block-output mean squared error on the first `EVAL_BATCHES` batches of round to nearest (the start) and of the
    learned rounding.
    """
    lr = 1.0 / steps if lr is None else lr
    # block-local parameter name -> (trainable rounding, transposed: a Conv1D stores its weight as [in, out])
    rounding = {name: LearnedRounding(float_weight(module), bits, group_size, sym) for name, module in layers.items()}
    local = {f"{_local_name(block, module)}.weight": (rounding[name], is_conv1d(module))
             for name, module in layers.items()}
    used = inputs[: max(min(steps, len(inputs)), EVAL_BATCHES)]  # the batches it reads, and their targets
    targets = block_outputs(block, used) if targets is None else targets[: len(used)]
    flags = [p.requires_grad for p in block.parameters()]
    block.requires_grad_(False)
    params = [p for r in rounding.values() for p in r.parameters()]
    try:
        loss_rtn = block_output_error(block, inputs[:EVAL_BATCHES], targets, _weights(local))
        with torch.enable_grad():
            for step in range(steps):
                args, kwargs = used[step % len(used)]
                output = hidden_states_of(block_call(block, args, kwargs, _weights(local)))
                loss = nn.functional.mse_loss(output.float(), targets[step % len(used)].float())
                grads = torch.autograd.grad(loss, params)
                step_size = lr * (1 - step / steps)
                with torch.no_grad():
                    for p, g in zip(params, grads):
                        p.sub_(step_size * torch.sign(g))
                for r in rounding.values():
                    r.clamp_()
        loss = block_output_error(block, inputs[:EVAL_BATCHES], targets, _weights(local))
    finally:
        for p, flag in zip(block.parameters(), flags):
            p.requires_grad_(flag)
    return {n: r.export(scale_dtype) for n, r in rounding.items()}, {"loss_rtn": loss_rtn, "loss": loss}


def _weights(local: dict) -> dict[str, torch.Tensor]:
    return {name: (r().t() if transposed else r()) for name, (r, transposed) in local.items()}


def _local_name(block: nn.Module, module: nn.Module) -> str:
    for name, candidate in block.named_modules():
        if candidate is module:
            return name
    raise ValueError(f"{type(module).__name__} is not inside the block being calibrated.")
