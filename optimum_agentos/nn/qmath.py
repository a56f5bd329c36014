"""Groupwise affine quantization math (round to nearest): parameters, codes and dequantization.

Groups run along the input dimension. `group_size=-1` means one group per row. When `group_size` does not divide
`in_features` the last group is shorter; every function here handles that exactly (no padding stored).
"""

from __future__ import annotations

import torch


def num_groups(in_features: int, group_size: int) -> int:
    """Number of groups a row of `in_features` is split into."""
    return 1 if group_size == -1 else -(-in_features // group_size)


def effective_group_size(in_features: int, group_size: int) -> int:
    return in_features if group_size == -1 else group_size


def expand_groups(params: torch.Tensor, in_features: int, group_size: int) -> torch.Tensor:
    """Broadcast per-group values `[out, groups]` to per-column `[out, in_features]` (short last group included)."""
    gs = effective_group_size(in_features, group_size)
    return params.repeat_interleave(gs, dim=1)[:, :in_features]


def _range_qparams(wmin, wmax, bits: int, sym: bool):
    maxq = (1 << bits) - 1
    if sym:
        amax = torch.maximum(wmin.abs(), wmax.abs())
        scale = 2 * amax / maxq
        zero = torch.full_like(scale, float((maxq + 1) // 2))
    else:
        scale = (wmax - wmin) / maxq
        zero = torch.round(-wmin / torch.where(scale > 0, scale, torch.ones_like(scale)))
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale, zero.clamp(0, maxq)


def compute_qparams(
    w: torch.Tensor, bits: int, sym: bool, mse_grid: int = 0, max_shrink: float = 0.2
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point for each row of `w` (`[rows, cols]`, one group per row); zero is an integer code.

    With `mse_grid > 0` the min/max range is shrunk by up to `max_shrink` in `mse_grid` steps and each row keeps
    the range with the lowest squared rounding error (clipping a few outliers buys a finer grid for the rest).
    """
    maxq = (1 << bits) - 1
    w = w.float()
    wmin = w.amin(dim=1).clamp(max=0)
    wmax = w.amax(dim=1).clamp(min=0)
    scale, zero = _range_qparams(wmin, wmax, bits, sym)
    if mse_grid <= 0:
        return scale, zero
    best = _rounding_error(w, scale, zero, maxq)
    for step in range(1, mse_grid + 1):
        shrink = 1 - max_shrink * step / mse_grid
        s, z = _range_qparams(wmin * shrink, wmax * shrink, bits, sym)
        err = _rounding_error(w, s, z, maxq)
        better = err < best
        scale, zero, best = torch.where(better, s, scale), torch.where(better, z, zero), torch.minimum(err, best)
    return scale, zero


def _rounding_error(w, scale, zero, maxq):
    s, z = scale.unsqueeze(1), zero.unsqueeze(1)
    q = torch.clamp(torch.round(w / s) + z, 0, maxq)
    return ((q - z) * s - w).pow(2).sum(dim=1)


def group_qparams(
    w: torch.Tensor, bits: int, group_size: int, sym: bool, scale_dtype: torch.dtype = torch.float16, mse_grid: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group `(scales [out, groups] in scale_dtype, zeros [out, groups] uint8)` for a weight `[out, in]`."""
    out_features, in_features = w.shape
    gs = effective_group_size(in_features, group_size)
    scales, zeros = [], []
    for start in range(0, in_features, gs):
        scale, zero = compute_qparams(w[:, start : start + gs], bits, sym, mse_grid)
        scales.append(scale)
        zeros.append(zero)
    scales = torch.stack(scales, dim=1).to(scale_dtype)
    # Rounding the scale to its stored dtype must not make it zero.
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    return scales, torch.stack(zeros, dim=1).to(torch.uint8)


def quantize_codes(
    w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int
) -> torch.Tensor:
    """Integer codes `[out, in]` (uint8) of `w` for given group parameters."""
    in_features = w.shape[1]
    scale = expand_groups(scales.float(), in_features, group_size)
    zero = expand_groups(zeros.float(), in_features, group_size)
    return torch.clamp(torch.round(w.float() / scale) + zero, 0, (1 << bits) - 1).to(torch.uint8)


def dequantize_codes(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int, dtype=torch.float32
) -> torch.Tensor:
    """Float weight `[out, in]` from codes and group parameters, computed in float32 then cast to `dtype`."""
    out_features, in_features = codes.shape
    gs = effective_group_size(in_features, group_size)
    groups = scales.shape[1]
    if groups * gs != in_features:  # short last group: pad, compute per group, cut
        codes = torch.nn.functional.pad(codes, (0, groups * gs - in_features))
    grouped = codes.view(out_features, groups, gs).float()
    weight = (grouped - zeros.float().unsqueeze(-1)) * scales.float().unsqueeze(-1)
    return weight.view(out_features, groups * gs)[:, :in_features].to(dtype)


def quantize_rtn(w: torch.Tensor, bits: int, group_size: int, sym: bool, scale_dtype=torch.float16, mse_grid: int = 0):
    """Round-to-nearest quantization of a weight `[out, in]`: returns `(codes, scales, zeros)`."""
    scales, zeros = group_qparams(w, bits, group_size, sym, scale_dtype, mse_grid)
    return quantize_codes(w, scales, zeros, bits, group_size), scales, zeros
