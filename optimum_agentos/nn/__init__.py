"""The runtime: compressed layer types, their storage (packing, code <-> float math), CPU kernels and memory
handling. Loading and running an `agentos` checkpoint needs this part (and `formats/`) only."""

from .embedding import QuantEmbedding, QuantHead
from .linear import QuantLinear
from .sparse_linear import SparseCheckpointError, SparseLinear


__all__ = ["QuantEmbedding", "QuantHead", "QuantLinear", "SparseCheckpointError", "SparseLinear"]
