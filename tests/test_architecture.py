"""The package's shape: parts import only the parts below them, no import cycles, and loading a checkpoint touches
only the runtime, the format and the transformers integration."""

from __future__ import annotations

import ast
import json
import warnings
from pathlib import Path

import pytest

from .conftest import REPO, run_python


PACKAGE = REPO / "optimum_agentos"

# Which parts each part may import (any import, module level or inside a function). A part is a top-level module or
# sub-package of optimum_agentos. The runtime (nn) sits on config; the format on the runtime; the integration on
# the format; the algorithms on the runtime, the format and the calibration machinery; nothing imports the CLI.
GROUND = {"config", "validation", "version"}
ALLOWED = {
    "version": set(),
    "validation": {"version"},
    "config": {"version", "validation"},
    "nn": GROUND,
    "formats": GROUND | {"nn"},
    "integrations": GROUND | {"nn", "formats"},
    "models": GROUND,
    "data": GROUND,
    "calibration": GROUND | {"nn", "data"},
    "streaming": GROUND | {"nn", "formats", "calibration"},
    "compressor": GROUND | {"nn", "formats", "calibration", "models", "streaming"},
    "quantization": GROUND | {"nn", "formats", "calibration", "compressor", "hub", "streaming"},
    "pruning": GROUND | {"nn", "formats", "calibration", "compressor", "hub", "quantization", "streaming"},
    "evaluation": GROUND | {"nn", "formats", "data", "models"},
    "hub": GROUND | {"formats", "models", "evaluation"},
    "distillation": GROUND | {"nn", "formats", "data", "models", "evaluation", "hub"},
    "export": GROUND | {"nn", "formats", "models", "compressor", "hub"},
    "generation": GROUND,  # compile_for_generation: runs a loaded model, imports no other part
    "cli": None,  # the command line (cli.py, commands/, recipes.py) may import any part
    "_moved": set(),
    "__init__": GROUND | {"nn", "integrations", "_moved", "quantization", "pruning", "distillation", "export",
                          "generation"},
}
CLI_PART = {"cli", "commands", "recipes"}
# The one way an algorithm package may use another: the pruner composes with quantization's package entry point.
CROSS_ALGORITHM_ENTRY = {("pruning", "optimum_agentos.quantization")}


def part_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "__init__"
    return "cli" if parts[1] in CLI_PART else parts[1]


def module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    names = list(rel.parts)
    if names[-1] == "__init__":
        names = names[:-1]
    return ".".join(names)


def imports_of(path: Path) -> list[tuple[str, int]]:
    """Absolute names of the package modules `path` imports (relative imports resolved), with line numbers."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("optimum_agentos"):
                # `from . import x` imports the submodule x
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    found.append((sub if (PACKAGE.parent / (sub.replace(".", "/") + ".py")).exists()
                                  or (PACKAGE.parent / sub.replace(".", "/")).is_dir() else target, node.lineno))
        elif isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names if a.name.startswith("optimum_agentos")]
    return found


def package_graph() -> dict[str, list[tuple[str, int]]]:
    return {module_name(p): imports_of(p) for p in PACKAGE.rglob("*.py")}


def test_every_part_is_classified():
    parts = {part_of(m) for m in package_graph()}
    assert parts <= set(ALLOWED), f"parts without import rules: {parts - set(ALLOWED)}"


def test_imports_follow_the_allowed_direction():
    wrong = []
    for module, imports in package_graph().items():
        source = part_of(module)
        allowed = ALLOWED[source]
        for target, line in imports:
            dest = part_of(target)
            # `import optimum_agentos` (registering "agentos" in a fresh process) adds no dependency: importing any
            # submodule has already run the package's __init__.
            if dest in (source, "__init__") or allowed is None:
                continue
            if dest == "cli":
                wrong.append(f"{module}:{line} imports the CLI ({target})")
            elif dest not in allowed:
                wrong.append(f"{module}:{line} ({source}) imports {target} ({dest})")
            elif (source, dest) in {("pruning", "quantization")} and (source, target) not in CROSS_ALGORITHM_ENTRY:
                wrong.append(f"{module}:{line} imports {target}; use the package entry point optimum_agentos.quantization")
    assert not wrong, "\n".join(wrong)


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on_stack, result, counter = {}, {}, [], set(), [], [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in edges.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                result.append(sorted(component))

    for node in list(edges):
        if node not in index:
            visit(node)
    return result


def test_no_import_cycle_between_parts():
    edges: dict[str, set[str]] = {}
    for module, imports in package_graph().items():
        if part_of(module) in ("__init__", "cli"):
            continue
        edges.setdefault(part_of(module), set()).update(
            part_of(t) for t, _ in imports if part_of(t) not in (part_of(module), "__init__"))
    assert _cycles(edges) == []


@pytest.mark.parametrize("part", ["nn", "formats", "calibration", "quantization", "pruning"])
def test_no_import_cycle_inside_a_part(part):
    graph = package_graph()
    edges = {m: {t for t, _ in imps if part_of(t) == part and t != m and not t.endswith(f"optimum_agentos.{part}")}
             for m, imps in graph.items() if part_of(m) == part and m != f"optimum_agentos.{part}"}
    assert _cycles(edges) == []


def test_config_imports_nothing_of_the_package_but_the_version_and_field_checks():
    assert {t for t, _ in imports_of(PACKAGE / "config.py")} == {"optimum_agentos.version", "optimum_agentos.validation"}


def test_no_module_over_400_lines():
    long = {str(p.relative_to(REPO)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert not long


def test_loading_a_checkpoint_imports_only_runtime_format_and_integration(tmp_path):
    """`import optimum_agentos` + `from_pretrained` of a quantized checkpoint, in a fresh process: no algorithm,
    calibration, evaluation, training or CLI module is imported."""
    from optimum_agentos import AgentOSConfig
    from optimum_agentos.quantization.quantizer import Quantizer

    from .conftest import build_tiny

    Quantizer(build_tiny("llama")).quantize(tmp_path / "ckpt", AgentOSConfig(bits=4, embedding_bits=8))
    out = run_python(f"""
        import json, sys
        import optimum_agentos
        from transformers import AutoModelForCausalLM
        AutoModelForCausalLM.from_pretrained({str(tmp_path / "ckpt")!r})
        print(json.dumps(sorted(m for m in sys.modules if m.startswith("optimum_agentos"))))
    """)
    loaded = json.loads(out.strip().splitlines()[-1])
    parts = {part_of(m) for m in loaded}
    assert parts <= {"__init__", "_moved", "config", "validation", "version", "nn", "formats", "integrations"}, loaded
    assert "optimum_agentos.nn.linear" in loaded and "optimum_agentos.formats.checks" in loaded


@pytest.mark.parametrize("old,new,name", [
    ("optimum_agentos.quantization.linear", "optimum_agentos.nn.linear", "QuantLinear"),
    ("optimum_agentos.pruning.sparse_linear", "optimum_agentos.nn.sparse_linear", "SparseLinear"),
    ("optimum_agentos.quantization.kernels", "optimum_agentos.nn.kernels", "Int4PackKernel"),
    ("optimum_agentos.evaluation.data", "optimum_agentos.data", "load_text"),
    ("optimum_agentos.checkpoint", "optimum_agentos.formats", "folder_size"),
    ("optimum_agentos.quantization.calibration", "optimum_agentos.calibration.runner", "run_blockwise"),
])
def test_old_import_paths_keep_working_and_name_the_new_one(old, new, name):
    out = run_python(f"""
        import warnings
        warnings.simplefilter("always")
        with warnings.catch_warnings(record=True) as caught:
            from {old} import {name}
        import {new}
        assert {name} is getattr({new}, {name!r})
        print([str(w.message) for w in caught if w.category is FutureWarning])
    """)
    assert f"{old} moved to {new}" in out


def test_public_names_unchanged():
    import optimum_agentos

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        for name in optimum_agentos.__all__:
            assert getattr(optimum_agentos, name) is not None
        from optimum_agentos.pruning import SparseLinear  # noqa: F401
        from optimum_agentos.quantization import QuantLinear, rtn  # noqa: F401
        from optimum_agentos.quantization.embedding import QuantEmbedding  # noqa: F401
