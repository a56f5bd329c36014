"""Calibration Hessians `H = 2/n * sum(x x^T)` of a linear layer's inputs, shared by GPTQ and SparseGPT."""

from __future__ import annotations

import torch


class HessianAccumulator:
    """Accumulates `X^T X` over calibration tokens in float32; `hessian()` returns the averaged `2/n X^T X`."""

    def __init__(self, in_features: int, device=None):
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        """Add a batch of inputs of any leading shape `[..., in_features]`."""
        x = x.detach().reshape(-1, x.shape[-1]).float()
        self.sum.addmm_(x.t(), x)
        self.tokens += x.shape[0]

    def hessian(self) -> torch.Tensor:
        if self.tokens == 0:
            raise ValueError("No calibration tokens reached this layer; the calibration set is empty.")
        return self.sum * (2.0 / self.tokens)


def inverse_cholesky(hessian: torch.Tensor, damp_percent: float) -> torch.Tensor:
    """Upper Cholesky factor of `(H + damp * mean(diag H) * I)^-1`, as GPTQ and SparseGPT consume it.

    Raises a clear error when the damped Hessian is still not positive definite.
    """
    h = hessian.clone()
    diag = torch.arange(h.shape[0], device=h.device)
    h[diag, diag] += damp_percent * torch.mean(torch.diag(h))
    try:
        lower = torch.linalg.cholesky(h)
    except torch.linalg.LinAlgError as err:
        raise ValueError(
            f"The calibration Hessian is not positive definite even with damp_percent={damp_percent}; "
            "raise damp_percent (e.g. 0.1) or use more calibration samples."
        ) from err
    return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)


def prepare_dead_columns(weight: torch.Tensor, hessian: torch.Tensor) -> None:
    """Inputs that never fire (zero Hessian diagonal) get weight 0 and a unit diagonal, in place."""
    dead = torch.diag(hessian) == 0
    hessian[dead, dead] = 1
    weight[:, dead] = 0
