"""optimum-agentos: compress transformer models to run where agents live.

Importing the package registers `quant_method: "agentos"` with transformers, so `from_pretrained` loads and
quantizes agentos checkpoints.
"""

from .config import AgentOSConfig
from .integrations.transformers import register as _register
from .pruning import PruningConfig, SparseLinear
from .quantization import QuantLinear
from .version import FORMAT_VERSION, __version__

_register()

__all__ = [
    "AgentOSConfig", "Pruner", "PruningConfig", "QuantLinear", "Quantizer", "SparseLinear", "FORMAT_VERSION",
    "__version__",
]


def __getattr__(name):
    # Heavier entry points load on first use, keeping `import optimum_agentos` lean.
    if name == "Quantizer":
        from .quantization.quantizer import Quantizer

        return Quantizer
    if name == "Pruner":
        from .pruning.pruner import Pruner

        return Pruner
    raise AttributeError(f"module 'optimum_agentos' has no attribute {name!r}")
