"""Fake quantization for quantization-aware training: round a float weight onto an agentos grid in the forward pass,
let the gradient through (straight-through estimator) in the backward pass.

`fake_quantize` is the pure tensor function; `FakeQuantLinear` is the trainable layer `prepare_qat` puts in place of
a `QuantLinear`. Its forward computes with exactly the weight that `QuantLinear.dequantize` returns after
`to_quant_linear` (same codes, same float32 arithmetic), so what is trained is what is saved.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.linear import QuantLinear
from ..nn.qmath import effective_group_size, group_qparams, quantize_codes

SCALE_MODES = ("frozen", "minmax", "learned")


def _grouped(t: torch.Tensor, groups: int, gs: int) -> torch.Tensor:
    """`[out, in]` -> `[out, groups, gs]`, zero-padding a short last group."""
    pad = groups * gs - t.shape[1]
    if pad:
        t = F.pad(t, (0, pad))
    return t.view(t.shape[0], groups, gs)


def stored_scales(scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`scales` as the checkpoint stores them: rounded to `dtype`, kept above 0 (returned in float32)."""
    rounded = scales.detach().to(dtype)
    return rounded.clamp(min=torch.finfo(dtype).tiny).float()


class _FakeQuantSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, scales, zeros, bits, group_size, scale_dtype):
        out_features, in_features = weight.shape
        gs, groups = effective_group_size(in_features, group_size), scales.shape[1]
        scale = stored_scales(scales, scale_dtype).unsqueeze(-1)
        zero = zeros.float().unsqueeze(-1)
        # The same expressions as qmath.quantize_codes and qmath.dequantize_codes: bit-identical values.
        q = torch.round(_grouped(weight.float(), groups, gs) / scale) + zero
        inside = (q >= 0) & (q <= (1 << bits) - 1)
        dq = (q.clamp(0, (1 << bits) - 1) - zero) * scale
        ctx.save_for_backward(weight, scale, zero, inside)
        ctx.bits = bits
        return dq.view(out_features, groups * gs)[:, :in_features].to(weight.dtype)

    @staticmethod
    def backward(ctx, grad):
        weight, scale, zero, inside = ctx.saved_tensors
        out_features, in_features = weight.shape
        groups, gs = inside.shape[1], inside.shape[2]
        g = _grouped(grad.float(), groups, gs)
        grad_weight = (g * inside).view(out_features, groups * gs)[:, :in_features].to(weight.dtype)
        grad_scales = None
        if ctx.needs_input_grad[1]:  # the scales' gradient with the codes held fixed: d dq / d scale = q - z
            x = _grouped(weight.detach().float(), groups, gs) / scale
            q = (torch.round(x) + zero).clamp(0, (1 << ctx.bits) - 1)
            grad_scales = (g * (q - zero)).sum(-1)
        return grad_weight, grad_scales, None, None, None, None


def fake_quantize(weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int,
                  scale_dtype: torch.dtype | None = None) -> torch.Tensor:
    """`weight` `[out, in]` quantized and dequantized on the grid of `scales`/`zeros` (`[out, groups]`), the scales
    first rounded to `scale_dtype` (default: their own dtype) as the checkpoint stores them.

    Backward: the straight-through estimator, clipped: the gradient passes unchanged to every weight whose code
    falls inside `[0, 2**bits - 1]`, and is zero where the code is clipped (moving such a weight changes nothing).
    When `scales` requires grad it gets the gradient of the dequantized weight with the codes held fixed,
    `sum(grad * (q - z))` per group: a weight started on its grid point keeps a useful scale gradient, where LSQ's
    estimator (which lets the code follow `w / scale`) gives exactly 0 there."""
    return _FakeQuantSTE.apply(weight, scales, zeros, bits, group_size, scale_dtype or scales.dtype)


class FakeQuantLinear(nn.Module):
    """A trainable float linear layer whose forward uses its weight rounded onto an agentos grid.

    Args:
        weight (`torch.Tensor`): the float weight `[out, in]` to start from (e.g. a `QuantLinear`'s dequantized one).
        bias (`torch.Tensor`, *optional*): the bias.
        bits (`int`), group_size (`int`): the grid's format, as in `AgentOSConfig`.
        scales (`torch.Tensor`), zeros (`torch.Tensor`): the group parameters `[out, groups]`, e.g. the checkpoint's;
            the scales' dtype is the one the checkpoint stores.
        sym (`bool`): symmetric grid; used when `scale_mode="minmax"` recomputes the parameters.
        scale_mode (`str`): `"frozen"` keeps `scales`/`zeros` (only the codes move); `"minmax"` recomputes them from
            the current weight's group min/max at every forward (the grid follows the weights); `"learned"` trains
            the scales too (their gradient with the codes held fixed), the zero points fixed.

    `weight` (and learned scales) are float32 master copies (small updates must not vanish in 16 bits); the forward
    casts the rounded weight to the input's dtype. Frozen or recomputed group parameters are buffers left out of
    `state_dict`, so a Trainer checkpoint taken during training is a plain float model.
    """

    def __init__(self, weight, bias, bits: int, group_size: int, scales, zeros, sym: bool = False,
                 scale_mode: str = "learned"):
        super().__init__()
        if scale_mode not in SCALE_MODES:
            raise ValueError(f"scale_mode={scale_mode!r} is not supported; use one of {SCALE_MODES}.")
        self.out_features, self.in_features = weight.shape
        self.bits, self.group_size, self.sym, self.scale_mode = bits, group_size, sym, scale_mode
        self.scale_dtype = scales.dtype
        self.weight = nn.Parameter(weight.detach().float().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        if scale_mode == "learned":
            self.weight_scale = nn.Parameter(scales.detach().float().clone())
        else:
            self.register_buffer("weight_scale", scales.detach().clone(), persistent=False)
        self.register_buffer("weight_zero", zeros.detach().clone(), persistent=False)

    @classmethod
    def from_quant_linear(cls, layer: QuantLinear, sym: bool = False, scale_mode: str = "learned"):
        """Start from a `QuantLinear`: the weight it computes with, its group parameters."""
        return cls(layer.dequantize(torch.float32), layer.bias, layer.bits, layer.group_size, layer.weight_scale,
                   layer.weight_zero, sym, scale_mode)

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The group parameters the forward uses now: stored, learned, or the current weight's min/max ones."""
        if self.scale_mode == "minmax":
            scales, zeros = group_qparams(self.weight.detach(), self.bits, self.group_size, self.sym,
                                          self.scale_dtype)
            self.weight_scale.copy_(scales)
            self.weight_zero.copy_(zeros)
        return self.weight_scale, self.weight_zero

    def fake_weight(self) -> torch.Tensor:
        scales, zeros = self.qparams()
        return fake_quantize(self.weight, scales, zeros, self.bits, self.group_size, self.scale_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.fake_weight().to(x.dtype)
        return F.linear(x, weight, None if self.bias is None else self.bias.to(x.dtype))

    @torch.no_grad()
    def to_quant_linear(self) -> QuantLinear:
        """The `QuantLinear` holding this layer's current codes and group parameters (same format as the start)."""
        scales, zeros = self.qparams()
        scales = stored_scales(scales, self.scale_dtype).to(self.scale_dtype)
        codes = quantize_codes(self.weight, scales, zeros, self.bits, self.group_size)
        return QuantLinear.from_codes(codes, scales, zeros, self.bias, self.bits, self.group_size)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"bits={self.bits}, group_size={self.group_size}, scale_mode={self.scale_mode!r}")
