"""Per-input statistics of a linear layer, accumulated over calibration tokens: what every calibrated algorithm
collects (GPTQ and SparseGPT a Hessian, SmoothQuant channel maxima, structured pruning mean squares)."""

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

    def take_hessian(self) -> torch.Tensor:
        """`hessian()` computed in the accumulator's own storage, which the caller then owns (the accumulator is
        spent): no second input-width square in memory."""
        if self.tokens == 0:
            raise ValueError("No calibration tokens reached this layer; the calibration set is empty.")
        if self.sum is None:
            raise RuntimeError("take_hessian() was already called on this accumulator.")
        hessian, self.sum = self.sum, None
        return hessian.mul_(2.0 / self.tokens)


class AbsMaxAccumulator:
    """Per-input-channel max |x| over the calibration tokens (the `accumulator` of `run_blockwise`)."""

    def __init__(self, in_features: int, device=None):
        self.max = torch.zeros(in_features, dtype=torch.float32, device=device)

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        torch.maximum(self.max, x.abs().amax(dim=0).float(), out=self.max)


class InputMeanSquare:
    """Pre-hook accumulating per-feature sum of x^2 over tokens of a layer's input: `mean()` is E[x_j^2]."""

    def __init__(self):
        self.total, self.tokens = None, 0

    def __call__(self, module, args):
        x = args[0].detach().float().reshape(-1, args[0].shape[-1])
        sq = x.pow(2).sum(0)
        self.total = sq if self.total is None else self.total + sq
        self.tokens += x.shape[0]

    def mean(self) -> torch.Tensor:
        return self.total / max(self.tokens, 1)
