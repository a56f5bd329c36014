"""Import paths of modules that moved when the package was split into parts (runtime `nn/`, `formats/`,
`calibration/`, `data`): the old paths keep working, with a `FutureWarning` naming the new one."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings


MOVED = {
    "optimum_agentos.checkpoint": "optimum_agentos.formats",
    "optimum_agentos.modeling": "optimum_agentos.nn.modeling",
    "optimum_agentos.evaluation.data": "optimum_agentos.data",
    "optimum_agentos.pruning.sparse_linear": "optimum_agentos.nn.sparse_linear",
    "optimum_agentos.quantization.calibration": "optimum_agentos.calibration.runner",
    "optimum_agentos.quantization.convert": "optimum_agentos.formats.replace",
    "optimum_agentos.quantization.dynamic_int8": "optimum_agentos.nn.dynamic_int8",
    "optimum_agentos.quantization.hessian": "optimum_agentos.calibration.hessian",
    "optimum_agentos.quantization.kept_weights": "optimum_agentos.formats.kept_weights",
    "optimum_agentos.quantization.kernels": "optimum_agentos.nn.kernels",
    "optimum_agentos.quantization.linear": "optimum_agentos.nn.linear",
    "optimum_agentos.quantization.memory": "optimum_agentos.nn.memory",
    "optimum_agentos.quantization.packing": "optimum_agentos.nn.packing",
    "optimum_agentos.quantization.replace": "optimum_agentos.formats.replace",
    "optimum_agentos.quantization.targets": "optimum_agentos.nn.targets",
}


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, new_name: str):
        self.new_name = new_name

    def create_module(self, spec):
        warnings.warn(f"{spec.name} moved to {self.new_name}; import it from there.", FutureWarning, stacklevel=3)
        return importlib.import_module(self.new_name)

    def exec_module(self, module):  # the new module is already executed
        pass


class _MovedFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        new_name = MOVED.get(fullname)
        if new_name is None:
            return None
        return importlib.util.spec_from_loader(fullname, _AliasLoader(new_name))


def install() -> None:
    """Put the alias finder first on `sys.meta_path` (once)."""
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _MovedFinder())
