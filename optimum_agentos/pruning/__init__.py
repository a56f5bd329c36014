"""Pruning: pure scoring/mask functions (magnitude, Wanda, N:M) and SparseGPT."""

from .masks import global_magnitude_masks, magnitude_scores, mask_from_scores, parse_pattern, wanda_scores
from .sparsegpt import sparsegpt_prune

__all__ = [
    "global_magnitude_masks", "magnitude_scores", "mask_from_scores", "parse_pattern", "sparsegpt_prune",
    "wanda_scores",
]
