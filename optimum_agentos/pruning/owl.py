"""OWL (Yin et al. 2024, "Outlier Weighed Layerwise sparsity"): decoder layers whose Wanda scores hold more
outliers keep more weights, at the same total sparsity.

Per decoder block, the outlier ratio is the share of its target layers' scores `|W_ij| * ||X_j||` (dense model's
activations) above `threshold` times their mean. The ratios are scaled to [0, 1] across blocks, and a block's
sparsity is `target - 2 * lambda * (scaled ratio - mean scaled ratio)` (spread 2 lambda, as in the authors' code;
the mean is weighted by block size so the total stays the target), the deviations shrunk together when one would
pass +- lambda (the paper's bound; the mean is kept). Counts are then rounded so the whole model removes exactly
`round(target * weights)`.
"""

from __future__ import annotations

import torch
from torch import nn

from ..calibration.runner import run_blockwise
from ..nn.linear import float_weight
from .masks import wanda_scores


class SquareSum:
    """`run_blockwise` accumulator of per-input-channel sum of x^2 (Wanda's `||X_j||^2`, without the Hessian)."""

    def __init__(self, in_features: int, device=None):
        self.sum = torch.zeros(in_features, dtype=torch.float32, device=device)

    def add(self, x: torch.Tensor) -> None:
        self.sum += x.detach().reshape(-1, x.shape[-1]).float().pow(2).sum(0)


def outlier_ratios(model: nn.Module, names: list[str], ids: torch.Tensor, threshold: float,
                   batch_size: int = 4) -> tuple[list[list[str]], list[float]]:
    """`(blocks, ratios)`: the target layers of each decoder block and the block's outlier ratio, measured on the
    dense model (nothing is changed)."""
    blocks, ratios = [], []

    def measure(layers: dict, stats: dict) -> None:
        scores = torch.cat([wanda_scores(float_weight(m), stats[n].sum).flatten() for n, m in layers.items()])
        blocks.append(list(layers))
        ratios.append(float((scores > threshold * scores.mean()).float().mean()))

    run_blockwise(model, names, ids, measure, batch_size, "OWL outlier ratios", accumulator=SquareSum)
    return blocks, ratios


def owl_block_sparsity(ratios: list[float], sizes: list[int], sparsity: float, lam: float) -> list[float]:
    """Each block's sparsity from its outlier ratio (more outliers, lower sparsity); size-weighted mean = `sparsity`."""
    r = torch.tensor(ratios, dtype=torch.float64)
    w = torch.tensor(sizes, dtype=torch.float64)
    spread = r.max() - r.min()
    scaled = (r - r.min()) / spread if spread > 0 else torch.zeros_like(r)
    deviation = 2 * lam * (scaled - (scaled * w).sum() / w.sum())
    largest = float(deviation.abs().max())
    if largest > lam:
        deviation *= lam / largest
    return (sparsity - deviation).tolist()


def exact_counts(numels: dict[str, int], layer_sparsity: dict[str, float], sparsity: float) -> dict[str, int]:
    """Weights to remove per layer: `numel * layer_sparsity` rounded (largest remainder) so that they sum to
    exactly `round(sparsity * total)`."""
    total = round(sparsity * sum(numels.values()))
    raw = {n: numels[n] * layer_sparsity[n] for n in numels}
    counts = {n: min(int(v), numels[n]) for n, v in raw.items()}
    short = total - sum(counts.values())
    order = sorted(numels, key=lambda n: raw[n] - int(raw[n]), reverse=short > 0)
    for name in order[: abs(short)]:
        counts[name] += 1 if short > 0 else -1
    return counts


def owl_allocation(model: nn.Module, names: list[str], ids: torch.Tensor, config, batch_size: int = 4) -> dict:
    """`{"counts": {layer: weights to remove}, "blocks": [{"layers", "outlier_ratio", "sparsity"}]}` for `config`
    (a `PruningConfig` with `allocation="owl"`)."""
    blocks, ratios = outlier_ratios(model, names, ids, config.owl_threshold, batch_size)
    modules = dict(model.named_modules())
    numels = {n: float_weight(modules[n]).numel() for block in blocks for n in block}
    sizes = [sum(numels[n] for n in block) for block in blocks]
    block_sparsity = owl_block_sparsity(ratios, sizes, config.sparsity, config.owl_lambda)
    layer_sparsity = {n: s for block, s in zip(blocks, block_sparsity) for n in block}
    counts = exact_counts(numels, layer_sparsity, config.sparsity)
    return {
        "counts": counts,
        "blocks": [{"layers": len(block), "outlier_ratio": r, "sparsity": s}
                   for block, r, s in zip(blocks, ratios, block_sparsity)],
    }
