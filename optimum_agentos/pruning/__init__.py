"""Pruning: pure scoring/mask functions (magnitude, Wanda, N:M), SparseGPT, the sparse storage format and `Pruner`."""

from .config import PruningConfig
from .masks import global_magnitude_masks, magnitude_scores, mask_from_scores, parse_pattern, wanda_scores
from ..nn.sparse_linear import SparseLinear
from .sparsegpt import sparsegpt_prune

__all__ = [
    "GradualPruningCallback", "MaskFixedCallback", "Pruner", "PruningConfig", "SparseLinear", "global_magnitude_masks", "magnitude_scores", "mask_from_scores",
    "parse_pattern", "sparsegpt_prune", "wanda_scores",
]


def __getattr__(name):
    if name == "Pruner":  # the quantization algorithms and calibration: loaded on first use
        from .pruner import Pruner

        return Pruner
    if name in ("MaskFixedCallback", "GradualPruningCallback"):
        from . import callbacks

        return getattr(callbacks, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
