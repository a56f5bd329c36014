"""GPTQ (Frantar et al. 2022) on one weight matrix: a pure function of the weight and its calibration Hessian."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..calibration.hessian import inverse_cholesky
from ..nn.qmath import compute_qparams, effective_group_size


@dataclass
class InverseHessian:
    """What GPTQ needs of one calibration Hessian, shared by every layer that reads the same input (q/k/v,
    gate/up): `factor`, the upper Cholesky factor of the damped inverse (rows and columns in `perm` order with
    `act_order`); `dead`, the inputs that never fire (their weights are zeroed); `perm`, the `act_order` column
    order (None without it)."""

    factor: torch.Tensor
    dead: torch.Tensor
    perm: torch.Tensor | None


def invert_hessian(hessian: torch.Tensor, damp_percent: float = 0.01, act_order: bool = False,
                   inplace: bool = False) -> InverseHessian:
    """The `InverseHessian` of `hessian` (`[in, in]`, float32). `inplace=True` works in `hessian`'s storage (the
    caller gives it up), so a layer's solve holds one input-width square, not a copy of it too."""
    h = hessian.detach()
    h = h.float() if h.dtype != torch.float32 else (h if inplace else h.clone())
    dead = torch.diag(h) == 0
    h[dead, dead] = 1  # a dead input gets a unit diagonal (its weights are zeroed)
    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(h), descending=True)
        h = h[perm][:, perm]
    return InverseHessian(inverse_cholesky(h, damp_percent, inplace=True), dead, perm)


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int,
    sym: bool,
    damp_percent: float = 0.01,
    act_order: bool = False,
    block_size: int = 128,
    scale_dtype: torch.dtype = torch.float16,
    mse_grid: int = 0,
    pruned: torch.Tensor | None = None,
    inverse: InverseHessian | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize `weight` (`[out, in]`) column by column, pushing each column's rounding error onto the columns not
    yet quantized through the inverse Hessian. Returns `(codes [out, in] uint8, scales [out, groups], zeros)`.

    Groups are contiguous input columns (the last one may be shorter). Without `act_order` a group's scale and zero
    are fitted when its first column is reached, on the error-updated weights (as in the paper's code); with
    `act_order` columns go by decreasing Hessian diagonal and every group is fitted up front on the original weights,
    so the stored layout stays contiguous groups.

    `pruned` (bool `[out, in]`, True = removed) fixes a sparsity mask: those weights get their zero point's code, so
    they decode to exactly 0, and their error flows on like any other (SparseGPT's joint prune + quantize pass).

    `inverse` (from `invert_hessian`, made with the same `damp_percent` and `act_order`) replaces `hessian` (pass
    None): layers reading the same input then share one inversion.
    """
    if inverse is None:
        inverse = invert_hessian(hessian, damp_percent, act_order)
    elif (inverse.perm is not None) != act_order:
        raise ValueError(f"The InverseHessian was made with act_order={inverse.perm is not None}, this call has "
                         f"act_order={act_order}; make it with invert_hessian(..., act_order={act_order}).")
    w = weight.detach().float().clone(memory_format=torch.contiguous_format)
    out_features, n = w.shape
    gs = effective_group_size(n, group_size)
    groups = -(-n // gs)
    maxq = (1 << bits) - 1
    w[:, inverse.dead] = 0
    keep = None if pruned is None else (~pruned).float()
    if keep is not None:
        w *= keep

    scales = torch.zeros(out_features, groups, dtype=torch.float32, device=w.device)  # on the weight's device:
    zeros = torch.zeros(out_features, groups, dtype=torch.float32, device=w.device)  # an accelerator works too
    fitted = torch.zeros(groups, dtype=torch.bool)

    def fit(g: int, columns: torch.Tensor) -> None:
        if keep is not None:  # pruned weights are 0 whatever the updates did to them
            columns = columns * keep[:, g * gs : g * gs + columns.shape[1]]
        scale, zero = compute_qparams(columns, bits, sym, mse_grid)
        scale = scale.to(scale_dtype).float()  # quantize with exactly the scale that is stored
        scales[:, g] = torch.where(scale > 0, scale, torch.ones_like(scale))
        zeros[:, g] = zero
        fitted[g] = True

    if act_order:
        for g in range(groups):
            fit(g, w[:, g * gs : (g + 1) * gs])
        perm = inverse.perm
        w = w[:, perm]
        keep_perm = None if keep is None else keep[:, perm]
    else:
        perm = torch.arange(n, device=w.device)
        keep_perm = keep

    hinv = inverse.factor
    codes = torch.zeros(out_features, n, dtype=torch.uint8, device=w.device)  # whole numbers 0..maxq: exact
    columns = perm.tolist()  # one transfer, not one per column
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = columns[i1 + i]
            g = col // gs
            if not fitted[g]:  # no act_order: columns arrive in order, so this is the group's first column
                rest = torch.cat([w1[:, i:], w[:, i2:]], dim=1)
                fit(g, rest[:, : min(gs, n - col)])
            scale, zero = scales[:, g], zeros[:, g]
            column = w1[:, i]
            q = torch.clamp(torch.round(column / scale) + zero, 0, maxq)
            if keep_perm is not None:
                q = torch.where(keep_perm[:, i1 + i] > 0, q, zero)
            codes[:, i1 + i] = q
            err = (column - (q - zero) * scale) / hinv1[i, i]
            w1[:, i:] -= err.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]

    if act_order:
        codes = codes[:, torch.argsort(perm)]
    return codes, scales.to(scale_dtype), zeros.to(torch.uint8)
