"""optimum-agentos: compress transformer models to run where agents live.

Importing the package registers `quant_method: "agentos"` with transformers, so `from_pretrained` loads and
quantizes agentos checkpoints.
"""

from . import _moved
from .config import AgentOSConfig
from .integrations.transformers import register as _register
from .nn import QuantLinear, SparseLinear
from .version import FORMAT_VERSION, __version__


_register()
_moved.install()

_DISTILLATION = {"DistillationConfig", "DistillationTrainer", "make_student", "precompute_teacher_topk"}

__all__ = [
    "AgentOSConfig", "DistillationConfig", "DistillationTrainer", "Pruner", "PruningConfig", "QuantLinear",
    "Quantizer", "SparseLinear", "FORMAT_VERSION", "__version__", "make_student", "precompute_teacher_topk",
    "plan_mixed_precision", "export", "prepare_qat", "convert_qat", "QATCallback", "compile_for_generation",
]


def __getattr__(name):
    # Heavier entry points load on first use, keeping `import optimum_agentos` lean.
    if name == "Quantizer":
        from .quantization.quantizer import Quantizer

        return Quantizer
    if name in ("prepare_qat", "convert_qat", "QATCallback"):
        from .quantization import qat

        return getattr(qat, name)
    if name == "plan_mixed_precision":
        from .quantization.mixed import plan_mixed_precision

        return plan_mixed_precision
    if name == "compile_for_generation":
        from .generation import compile_for_generation

        return compile_for_generation
    if name == "Pruner":
        from .pruning.pruner import Pruner

        return Pruner
    if name == "PruningConfig":
        from .pruning.config import PruningConfig

        return PruningConfig
    if name == "export":  # the package is callable: optimum_agentos.export(model, "gguf", out)
        import importlib

        return importlib.import_module(".export", __name__)
    if name in _DISTILLATION:
        from . import distillation

        return getattr(distillation, name)
    raise AttributeError(f"module 'optimum_agentos' has no attribute {name!r}")
