"""SparseGPT (Frantar & Alistarh 2023): prune one weight matrix and update the surviving weights through the
inverse calibration Hessian so the layer's output changes as little as possible. Shares its Hessian machinery with
GPTQ (`calibration.hessian`)."""

from __future__ import annotations

import torch

from ..calibration.hessian import inverse_cholesky, prepare_dead_columns
from .masks import check_n_m, check_sparsity


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    n_m: tuple[int, int] | None = None,
    block_size: int = 128,
    damp_percent: float = 0.01,
    count: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return `(pruned weight [out, in] float32, mask)` with `mask` True where a weight was removed.

    Unstructured: within each block of `block_size` columns the `sparsity` fraction with the lowest OBS saliency
    `w^2 / [H^-1]_jj^2` is removed (adaptive mask selection). N:M: in every M consecutive columns of a row the
    M - N lowest-saliency weights are removed. After each column the error is pushed onto the later columns.

    `count` (unstructured only) removes exactly that many weights instead of `sparsity` of each block: block `[i1,
    i2)` removes `round(count * i2 / n) - round(count * i1 / n)` (OWL's exact per-layer budgets).
    """
    if n_m is None:
        check_sparsity(sparsity)
    else:
        check_n_m(weight.shape[1], n_m)
        block_size = max(block_size // n_m[1], 1) * n_m[1]  # N:M groups never straddle blocks
    w = weight.detach().float().clone(memory_format=torch.contiguous_format)
    h = hessian.detach().float().clone()
    n = w.shape[1]
    prepare_dead_columns(w, h)
    hinv = inverse_cholesky(h, damp_percent, inplace=True)  # h is this call's own copy
    mask = torch.zeros_like(w, dtype=torch.bool)
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        diag = torch.diag(hinv1)
        mask1 = torch.zeros_like(w1, dtype=torch.bool)
        if n_m is None:
            saliency = w1**2 / diag.unsqueeze(0) ** 2
            k = int(saliency.numel() * sparsity) if count is None else round(count * i2 / n) - round(count * i1 / n)
            if k:
                mask1.view(-1)[torch.topk(saliency.flatten(), k, largest=False).indices] = True
        for i in range(i2 - i1):
            if n_m is not None and i % n_m[1] == 0:
                saliency = w1[:, i : i + n_m[1]] ** 2 / diag[i : i + n_m[1]].unsqueeze(0) ** 2
                drop = torch.topk(saliency, n_m[1] - n_m[0], dim=1, largest=False).indices
                mask1[:, i : i + n_m[1]].scatter_(1, drop, True)
            column = w1[:, i]
            kept = torch.where(mask1[:, i], torch.zeros_like(column), column)
            err = (column - kept) / hinv1[i, i]
            w1[:, i:] -= err.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            w1[:, i] = kept
            err1[:, i] = err
        w[:, i1:i2] = w1
        mask[:, i1:i2] = mask1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    w[mask] = 0
    return w, mask
