"""The Hessian math GPTQ and SparseGPT share: damped inverse Cholesky factors and dead input columns.

The Hessian itself is accumulated by `accumulators.HessianAccumulator` (re-exported here)."""

from __future__ import annotations

import torch

from .accumulators import HessianAccumulator  # noqa: F401  (its home before accumulators.py)


def inverse_cholesky(hessian: torch.Tensor, damp_percent: float, inplace: bool = False) -> torch.Tensor:
    """Upper Cholesky factor of `(H + damp * mean(diag H) * I)^-1`, as GPTQ and SparseGPT consume it.

    On the CPU every step (damping, factor, inverse, upper factor) runs in one matrix's storage (torch's `out=`),
    so this needs no input-width square beyond that one: with `inplace=True` the storage of `hessian` itself (which then
    holds the result), else a copy. Raises a clear error when the damped Hessian is still not positive definite.
    """
    h = hessian if inplace else hessian.clone()
    diag = torch.arange(h.shape[0], device=h.device)
    h[diag, diag] += damp_percent * torch.mean(torch.diag(h))
    # in one storage on the CPU (checked there to match the plain calls bit for bit); elsewhere the plain calls
    out = {"out": h} if h.device.type == "cpu" else {}
    try:
        lower = torch.linalg.cholesky(h, **out)
    except torch.linalg.LinAlgError as err:
        raise ValueError(
            f"The calibration Hessian is not positive definite even with damp_percent={damp_percent}; "
            "raise damp_percent (e.g. 0.1) or use more calibration samples."
        ) from err
    del h
    inverse = torch.cholesky_inverse(lower, **({"out": lower} if out else {}))
    del lower
    return torch.linalg.cholesky(inverse, upper=True, **({"out": inverse} if out else {}))


def prepare_dead_columns(weight: torch.Tensor, hessian: torch.Tensor) -> None:
    """Inputs that never fire (zero Hessian diagonal) get weight 0 and a unit diagonal, in place."""
    dead = torch.diag(hessian) == 0
    hessian[dead, dead] = 1
    weight[:, dead] = 0
