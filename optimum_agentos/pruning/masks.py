"""Pruning scores and masks as pure functions on tensors (no hooks, no I/O).

Convention: a mask is a bool tensor shaped like the weight, `True` where the weight is pruned (set to zero).
"""

from __future__ import annotations

import torch

from ..config import parse_pattern  # noqa: F401  (re-exported: the pattern syntax lives with the config)


def check_sparsity(sparsity: float) -> None:
    if not 0 <= sparsity < 1:
        raise ValueError(f"sparsity={sparsity!r} must be in [0, 1), e.g. 0.5 to remove half the weights.")


def check_n_m(in_features: int, n_m: tuple[int, int], name: str = "layer") -> None:
    if in_features % n_m[1]:
        raise ValueError(
            f"{name} has {in_features} input features, not a multiple of M={n_m[1]} for the {n_m[0]}:{n_m[1]} pattern; "
            "exclude it with ignore=[...] or pick an M that divides it."
        )


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    """|W|: the smallest weights go first."""
    return weight.detach().float().abs()


def wanda_scores(weight: torch.Tensor, input_sq_norms: torch.Tensor) -> torch.Tensor:
    """Wanda (Sun et al. 2023): |W_ij| * ||X_j||_2, with `input_sq_norms[j]` proportional to sum over tokens of x_j^2
    (the calibration Hessian's diagonal works: the scale does not change the per-row order)."""
    return weight.detach().float().abs() * input_sq_norms.float().clamp(min=0).sqrt().unsqueeze(0)


def mask_from_scores(
    scores: torch.Tensor, sparsity: float, per_row: bool = True, n_m: tuple[int, int] | None = None
) -> torch.Tensor:
    """Prune the lowest scores: `sparsity` of each row (`per_row`) or of the whole matrix, or with `n_m=(N, M)` all
    but the N highest of every M consecutive inputs."""
    if n_m is not None:
        n, m = n_m
        check_n_m(scores.shape[1], n_m)
        groups = scores.reshape(scores.shape[0], -1, m)
        drop = torch.topk(groups, m - n, dim=-1, largest=False).indices
        return torch.zeros(groups.shape, dtype=torch.bool, device=groups.device).scatter_(-1, drop, True).reshape(scores.shape)
    check_sparsity(sparsity)
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if per_row:
        k = int(scores.shape[1] * sparsity)
        if k:
            mask.scatter_(1, torch.topk(scores, k, dim=1, largest=False).indices, True)
    else:
        k = int(scores.numel() * sparsity)
        if k:
            mask.view(-1)[torch.topk(scores.flatten(), k, largest=False).indices] = True
    return mask


def mask_with_count(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Prune exactly `count` weights, spread over the rows as evenly as possible (Wanda's per-row comparison): every
    row loses `count // rows`, and the `count % rows` rows whose next-lowest score is smallest lose one more."""
    rows, cols = scores.shape
    if not 0 <= count <= scores.numel():
        raise ValueError(f"count={count} weights to prune is outside [0, {scores.numel()}].")
    base, extra = divmod(count, rows)
    order = torch.argsort(scores, dim=1)
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    mask.scatter_(1, order[:, :base], True)
    if extra:
        nxt = scores.gather(1, order[:, base : base + 1]).squeeze(1)
        chosen = torch.topk(nxt, extra, largest=False).indices
        mask[chosen, order[chosen, base]] = True
    return mask


def global_magnitude_masks(weights: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """One magnitude threshold across all layers: layers with smaller weights lose more of them."""
    check_sparsity(sparsity)
    flat = torch.cat([w.detach().float().abs().flatten() for w in weights.values()])
    k = int(flat.numel() * sparsity)
    if k == 0:
        return {name: torch.zeros_like(w, dtype=torch.bool) for name, w in weights.items()}
    threshold = torch.kthvalue(flat, k).values
    return {name: w.detach().float().abs() <= threshold for name, w in weights.items()}


def column_scores(weight: torch.Tensor, input_mean_square: torch.Tensor | None = None) -> torch.Tensor:
    """Importance of each input feature j, `[in]`: sum over outputs of |W[:, j]| (`|W|.sum(dim=0)`), times the
    RMS of input j over the calibration tokens (`input_mean_square[j]` = E[x_j^2]) when given, as Wanda does."""
    scores = weight.detach().float().abs().sum(0)
    if input_mean_square is not None:
        scores = scores * input_mean_square.float().clamp(min=0).sqrt()
    return scores


def threshold_limit(scores: torch.Tensor, threshold: float, scope: str) -> float:
    """The score below which entries go: `threshold` itself (`scope="global"`, absolute) or `threshold` times the
    mean score (`scope="layer"`, relative to this layer)."""
    return threshold * float(scores.float().mean()) if scope == "layer" else threshold


def threshold_mask(scores: torch.Tensor, threshold: float, scope: str = "layer", name: str = "layer") -> torch.Tensor:
    """`scores < limit` (see `threshold_limit`); a threshold that would remove all of `name` raises `ValueError`."""
    mask = scores < threshold_limit(scores, threshold, scope)
    if bool(mask.all()):
        raise ValueError(threshold_error(threshold, scope, f"removes all of {name}", score_range(scores, scope)))
    return mask


def score_range(scores: torch.Tensor, scope: str) -> tuple[float, float]:
    """Smallest and largest score in the threshold's units (divided by the mean with `scope="layer"`)."""
    scores = scores.float()
    if scope == "layer":
        scores = scores / scores.mean().clamp(min=torch.finfo(torch.float32).tiny)
    return float(scores.min()), float(scores.max())


def threshold_error(threshold: float, scope: str, what: str, lo_hi: tuple[float, float]) -> str:
    """The message of a threshold that removes nothing or everything, with the range of scores to choose from."""
    unit = "relative to each layer's mean (scope='layer')" if scope == "layer" else "absolute (scope='global')"
    return (f"threshold={threshold:g} {what}: the scores, {unit}, range from {lo_hi[0]:.4g} to {lo_hi[1]:.4g}; "
            "pick a threshold inside that range. Nothing was written.")
