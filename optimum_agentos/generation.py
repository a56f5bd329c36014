"""Compile a loaded model for fast CPU decoding.

`torch.compile` of `model.forward` with a static KV cache turns a decode step into one graph, but on a small model
the compiled step still pays per-call checks that cost more than its element-wise work: dynamo evaluates about ten
thousand guards on every module attribute the forward read (SmolLM2-135M int4: 2.2 ms of an 11 ms step on an AMD EPYC),
and inductor asserts the size and stride of each of the graph's ~800 inputs (0.7 ms). `compile_for_generation` keeps
the guards on the call's own inputs (token ids, cache tensors, positions), which pick the graph, and drops those on the
model's modules and the size asserts: the model must not change after compiling (new modules, changed attributes,
reshaped weights); compile a fresh copy instead. In-place updates of weight values are still read by the graph.
"""

from __future__ import annotations

import os
import shutil

import torch
from transformers.utils import logging


logger = logging.get_logger(__name__)

# what the fast compile leaves out (measured per decode step of SmolLM2-135M int4 g128 in BENCHMARKS.md's `speed`)
FAST_OPTIONS = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe, "size_asserts": False}


def compile_for_generation(model, *, check_modules: bool = False, dynamic: bool = False):
    """Wrap `model.forward` in `torch.compile` (inductor) and make `generate` use a static KV cache.

    Every decode step then runs one graph; the prompt runs another (one per prompt length with `dynamic=False`; past
    `torch._dynamo.config.recompile_limit` distinct lengths it runs eagerly). The first `generate` pays the compile
    (tens of seconds on a laptop CPU). `check_modules=True` keeps dynamo's guards on the model's modules and
    inductor's size asserts (plain `torch.compile`), for a model that changes between calls. Returns the model.
    """
    if hasattr(model.forward, "_torchdynamo_orig_callable"):
        raise ValueError("model.forward is already compiled; compile_for_generation takes an uncompiled model "
                         "(load it again, or use the compiled one as it is).")
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"torch.compile's inductor builds C++ on CPU and needs a compiler: {compiler!r} is not "
                           "on PATH. Install one (e.g. `apt install g++`) or set CXX; without it, decode eagerly.")
    options = None if check_modules else dict(FAST_OPTIONS)
    model.forward = torch.compile(model.forward, dynamic=dynamic, options=options)
    model.generation_config.cache_implementation = "static"
    logger.info("model.forward compiled with inductor%s; generate uses a static KV cache. The first call compiles.",
                "" if check_modules else " (no guards on the model's modules, no size asserts)")
    return model
