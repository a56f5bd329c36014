"""The Hessian math GPTQ and SparseGPT share: damped inverse Cholesky factors and dead input columns.

The Hessian itself is accumulated by `accumulators.HessianAccumulator` (re-exported here)."""

from __future__ import annotations

import torch

from .accumulators import HessianAccumulator  # noqa: F401  (its home before accumulators.py)


def inverse_cholesky(hessian: torch.Tensor, damp_percent: float, inplace: bool = False) -> torch.Tensor:
    """Upper Cholesky factor of `(H + damp * mean(diag H) * I)^-1`, as GPTQ and SparseGPT consume it.

    On the CPU every step runs in one matrix's storage: LAPACK works on column-major matrices, so the damped
    Hessian is transposed in place (tile by tile) and the factor, its inverse and the upper factor are computed in
    that storage (torch's `out=`), then transposed back: the same LAPACK calls on the same numbers as the plain
    calls, bit for bit, without their column-major copies (about four input-width squares). With `inplace=True`
    that storage is `hessian`'s own (which then holds the result), else a copy. Raises a clear error when the damped
    Hessian is still not positive definite.
    """
    h = hessian if inplace else hessian.clone()
    diag = torch.arange(h.shape[0], device=h.device)
    h[diag, diag] += damp_percent * torch.mean(torch.diag(h))
    try:
        if h.device.type != "cpu" or not h.is_contiguous():
            lower = torch.linalg.cholesky(h)
            del h
            return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)
        column_major = transpose_square_(h).mT  # the same matrix, laid out as LAPACK reads it
        torch.linalg.cholesky(column_major, out=column_major)
    except torch.linalg.LinAlgError as err:
        raise ValueError(
            f"The calibration Hessian is not positive definite even with damp_percent={damp_percent}; "
            "raise damp_percent (e.g. 0.1) or use more calibration samples."
        ) from err
    torch.cholesky_inverse(column_major, out=column_major)
    torch.linalg.cholesky(column_major, upper=True, out=column_major)
    return transpose_square_(h)


def transpose_square_(matrix: torch.Tensor, tile: int = 512) -> torch.Tensor:
    """Transpose a contiguous square matrix in place, one tile pair at a time (memory: one tile)."""
    n = matrix.shape[0]
    for i in range(0, n, tile):
        a = slice(i, min(i + tile, n))
        matrix[a, a] = matrix[a, a].t().clone()
        for j in range(i + tile, n, tile):
            b = slice(j, min(j + tile, n))
            upper = matrix[a, b].clone()
            matrix[a, b] = matrix[b, a].t()
            matrix[b, a] = upper.t()
    return matrix


def prepare_dead_columns(weight: torch.Tensor, hessian: torch.Tensor) -> None:
    """Inputs that never fire (zero Hessian diagonal) get weight 0 and a unit diagonal, in place."""
    dead = torch.diag(hessian) == 0
    hessian[dead, dead] = 1
    weight[:, dead] = 0
