"""Compile a loaded model for fast CPU decoding.

`torch.compile` of `model.forward` with a static KV cache turns a decode step into one graph, but on a small model
the compiled step still pays per-call checks that cost more than its element-wise work: dynamo evaluates about ten
thousand guards on the module attributes the forward read, and inductor asserts the size and stride of each of the
graph's ~800 inputs (SmolLM2-135M int4 on an AMD EPYC: 2.7-3.0 and 0.8-0.9 ms of an 11.2-11.3 ms step;
BENCHMARKS.md, `compile_overhead`). `compile_for_generation` keeps the guards on the call's own inputs (token ids,
cache tensors, positions), which pick the graph, and drops those on the model's modules and the size asserts: the
model must not change after compiling (new modules, changed attributes, reshaped weights); compile a fresh copy
instead. In-place updates of weight values are still read by the graph.

The compiled graphs also compute fused sibling layers (q/k/v, gate/up: `nn.fusion`) in one kernel call: each member
calls the group's path on the same input, and a graph pass (`SharedCalls`) merges identical calls of the native
kernels, which compute a pure function of their inputs.
"""

from __future__ import annotations

import functools
import itertools
import os
import shutil
import types

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
from transformers.utils import logging


logger = logging.get_logger(__name__)

_COUNT = itertools.count()
NAMESPACE = "agentos_native"  # the native kernels' operators (`nn/csrc/native_cpu.cpp`)

# what the fast compile leaves out (its cost per decode step: BENCHMARKS.md, `compile_overhead`)
FAST_OPTIONS = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe, "size_asserts": False}


def compile_for_generation(model, *, check_modules: bool = False, dynamic: bool = False):
    """Wrap `model.forward` in `torch.compile` (inductor) and make `generate` use a static KV cache (set in
    `model.generation_config`, so a later `save_pretrained` saves it too).

    Every decode step then runs one graph; the prompt runs another (one per prompt length with `dynamic=False`; past
    `torch._dynamo.config.recompile_limit` distinct lengths it runs eagerly). The first `generate` pays the
    compile (SmolLM2-135M int4 on a 2-core AMD EPYC: 16-42 s, the warm-up column of BENCHMARKS.md's
    `compile_overhead`). `check_modules=True` keeps dynamo's guards on the model's modules and
    inductor's size asserts (plain `torch.compile`), for a model that changes between calls. Returns the model.
    """
    if not model.can_generate():
        raise ValueError(f"{type(model).__name__} has no `generate`: compile_for_generation is for generative models "
                         "(e.g. AutoModelForCausalLM); compile an encoder's forward with torch.compile directly.")
    if hasattr(model.forward, "_torchdynamo_orig_callable"):
        raise ValueError("model.forward is already compiled; compile_for_generation takes an uncompiled model "
                         "(load it again, or use the compiled one as it is).")
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"torch.compile's inductor builds C++ on CPU and needs a compiler: {compiler!r} is not "
                           "on PATH. Install one (e.g. `apt install g++`) or set CXX; without it, decode eagerly.")
    options = {} if check_modules else dict(FAST_OPTIONS)
    options["post_grad_custom_post_pass"] = SharedCalls()
    for module in model.modules():
        if getattr(module, "fused", None) is not None:
            module.fused.in_graphs = True
    model.forward = torch.compile(_with_own_code(model.forward), dynamic=dynamic, options=options)
    model.generation_config.cache_implementation = "static"
    logger.info("model.forward compiled with inductor%s; generate uses a static KV cache. The first call compiles.",
                "" if check_modules else " (no guards on the model's modules, no size asserts)")
    return model


class SharedCalls(CustomGraphPass):
    """Inductor graph pass: identical calls of an `agentos_native` kernel (same operator, same input nodes and
    arguments) become one, as fused sibling layers make them (`nn.fusion.FusedGroup.traced_output`). Only operators
    that write none of their arguments: those are pure functions of their inputs, so the merged call computes the
    same numbers (a kernel writing into a buffer could find it changed between two identical calls)."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        seen = {}
        for node in list(graph.nodes):
            if node.op != "call_function" or getattr(node.target, "namespace", None) != NAMESPACE \
                    or node.target._schema.is_mutable:
                continue
            key = (node.target, node.args, tuple(sorted(node.kwargs.items())))
            if key in seen:
                node.replace_all_uses_with(seen[key])
                graph.erase_node(node)
            else:
                seen[key] = node

    def uuid(self) -> str:  # part of inductor's cache key: a new version of the pass compiles anew
        return get_hash_for_files((__file__,)).hex()


def _with_own_code(forward):
    """`forward` behind a function with a code object of its own. Dynamo keeps compiled graphs on the code object it
    compiled: every model of a class would share `forward`'s, and without the module guards a second model would run
    the first one's graph (a float model's with a quantized model's weights). Its own code object gives each model its
    own graphs (and its own recompile limit)."""

    def call(*args, **kwargs):
        return forward(*args, **kwargs)

    code = call.__code__.replace(co_name=f"compiled_forward_{next(_COUNT)}")
    return functools.wraps(forward)(types.FunctionType(code, call.__globals__, code.co_name, None, call.__closure__))
