"""Export compressed checkpoints to the formats other runtimes read: GGUF (llama.cpp), ONNX (ONNX Runtime) and
compressed-tensors (transformers without this package, vLLM).

`export(model_or_folder, format, output_dir)` writes the format from the checkpoint's own integer codes whenever the
format can hold them exactly, and otherwise stops with an `ExportError` naming the nearest configuration that does
(or re-quantizes with `requantize=True`, reporting the added error). The module itself is callable, so
`optimum_agentos.export(...)` and `from optimum_agentos.export import export` are the same function.
"""

import sys
import types

from .dispatch import WRITERS, export, find_writer, load_for_export
from .layers import ExportError, Weight, weight_of

__all__ = ["WRITERS", "ExportError", "Weight", "export", "find_writer", "load_for_export", "weight_of"]


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return export(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
