"""Choose and prepare the CPU paths of every compressed layer of a model (after loading or quantizing it)."""

from __future__ import annotations

import os
import time
from collections import Counter

import torch
from transformers.utils import logging

from . import dequant, dispatch, native, transposed
from .embedding import QuantHead
from .float_head import COPY_PATHS, PATHS as FLOAT_HEAD_PATHS, float_head
from .fusion import SEPARATE, fuse_siblings, one_token_paths
from .kernels import HEAD_KERNELS, KERNELS, KERNELS_ENV, choose_kernel
from .linear import QuantLinear
from .memory import release_free_memory
from .sparse_linear import SparseLinear


logger = logging.get_logger(__name__)

PATHS = {path.name: path for path in (*KERNELS, *HEAD_KERNELS, *dispatch.OTHER_PATHS, *FLOAT_HEAD_PATHS)}
MIB = 1 << 20


def _activation_dtype(model) -> torch.dtype:
    """The dtype compressed layers receive: the model's float dtype (float32 for a bare layer)."""
    dtype = getattr(model, "dtype", None)
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    floats = [p.dtype for p in model.parameters() if p.is_floating_point() and p.dtype != torch.float16]
    return floats[0] if floats and floats[0] in (torch.float32, torch.bfloat16) else torch.float32


def _layout_bytes(module) -> int:
    """Bytes of a compressed layer's codes and parameters as its kernel keeps them (fbgemm: one byte per weight)."""
    tensors = [module.weight, getattr(module, "weight_scale", None), getattr(module, "weight_zero", None)]
    tensors += [b for n, b in module.named_buffers(recurse=False)
                if n.startswith("kernel_") and n not in transposed.BUFFERS]  # reported on their own line
    total = sum(t.numel() * t.element_size() for t in tensors if t is not None)
    if getattr(module, "kernel_packed", None) is not None:
        total += module.in_features * module.out_features
    return total


class _Planner:
    """Routes per layer signature: from the policy, the cache, or a measurement (cached for the next load)."""

    def __init__(self, policy: str, activations: str | None, dtype: torch.dtype):
        self.policy, self.activations, self.dtype = policy, activations, dtype
        self.path = dispatch.cache_path()
        self.cached = dispatch.read_cache(self.path, set(PATHS) | {"reference", SEPARATE}) if policy == "auto" else {}
        self.chosen, self.measured, self.seconds = {}, [], 0.0

    def routes(self, module, kernel) -> list[list]:
        if self.policy == "reference":
            return [[None, "reference"]]
        if getattr(kernel, "quantizes_activations", False):  # the checkpoint's choice: numerics fixed for any length
            return [[None, kernel.name]]
        if self.policy != "auto":
            names = {p.name for p in dispatch.candidates(module, kernel)}
            return [[None, self.policy if self.policy in names else "reference"]]
        key = dispatch.signature(module, kernel, self.activations, self.dtype)
        if key not in self.cached:
            start = time.perf_counter()
            self.cached[key] = dispatch.measure(module, kernel, self.dtype)
            self.seconds += time.perf_counter() - start
            self.measured.append(key)
        self.chosen[key] = self.chosen.get(key, 0) + 1
        routes = self.cached[key]["routes"]
        unavailable = native.unavailable_paths()
        if any(name in unavailable for _, name in routes):  # a cached native choice not available now: the next
            routes = dispatch.routes_without(self.cached[key], unavailable)  # fastest measured path (maybe dequant-t)
        return routes

    def group_path(self, group) -> str:
        """A sibling group's one-token choice (`fusion`): a path's name or `SEPARATE`, measured or from the cache."""
        members = group.members
        accurate = [set(self.entry(m, m.kernel).get("us", {}).get("1", {})) | {m.route_names[0][1]} for m in members]
        paths = one_token_paths(members, accurate)
        if not paths:
            return SEPARATE
        key = "fused:" + "+".join(dispatch.signature(m, m.kernel, self.activations, self.dtype) for m in members)
        cached = self.cached.get(key)
        if cached is None or cached["routes"][0][1] not in {p.name for p in paths} | {SEPARATE}:
            start = time.perf_counter()
            timings = dispatch.time_group(group, paths, self.dtype)
            self.seconds += time.perf_counter() - start
            self.cached[key] = {"routes": [[None, min(timings, key=timings.get)]], "us": {"1": timings}}
            self.measured.append(key)
        self.chosen[key] = self.chosen.get(key, 0) + 1
        return self.cached[key]["routes"][0][1]

    def entry(self, module, kernel) -> dict:
        return self.cached.get(dispatch.signature(module, kernel, self.activations, self.dtype), {})

    def finish(self) -> None:
        if self.measured:
            dispatch.write_cache(self.path, self.cached)
        if not self.chosen:
            return
        source = (f"measured {len(self.measured)} layer signature(s) now in {self.seconds:.1f} s" if self.measured
                  else "read from the cache")
        lines = [f"{key} x{count}: " + (f"one-token calls {self.cached[key]['routes'][0][1]} (us: "
                                          f"{self.cached[key]['us']['1']})" if key.startswith("fused:") else
                                          dispatch.describe(self.cached[key]['routes']))
                 + (f" (rejected: {'; '.join(self.cached[key]['rejected'])})" if self.cached[key].get("rejected") else "")
                 for key, count in self.chosen.items()]
        logger.info(f"Kernel choices ({source}; cache {self.path}; the fastest path per token count on this "
                    f"machine):\n  " + "\n  ".join(lines))


def _plan(module, kernel, planner: _Planner) -> list[list]:
    """The layer's routes; the transposed layout (`transposed`) is built to be measured or where the cache chose it,
    and kept only where a token count chose it (a load with the cache builds no layout it then drops)."""
    entry = planner.entry(module, kernel) if planner.policy == "auto" else {}
    cached = entry.get("routes")
    allowed = not getattr(kernel, "quantizes_activations", False) and os.environ.get(transposed.ENV, "1") != "0"
    wanted = planner.policy == transposed.NAME or (planner.policy == "auto" and (
        cached is None or any(name == transposed.NAME for _, name in cached)))  # to measure, or chosen
    if wanted and allowed:
        transposed.prepare(module)
    routes = planner.routes(module, kernel)
    if any(name == transposed.NAME for _, name in routes):
        if allowed and transposed.layout_bytes(module) == 0:
            transposed.prepare(module)
        if transposed.layout_bytes(module) == 0:  # chosen in the cache, but turned off now (or too large)
            routes = dispatch.routes_without(entry, native.unavailable_paths() | {transposed.NAME})
    if not any(name == transposed.NAME for _, name in routes):
        transposed.drop(module)
    return routes


def _install(module, routes: list[list]) -> None:
    """`module.routes`: `((max_tokens, run), ...)` read by `kernels.forward`; None: the reference path."""
    exact = any(name == "reference" for _, name in routes)
    module.routes = None if exact else tuple((float("inf") if high is None else high, PATHS[name].run)
                                             for high, name in routes)
    module.route_names = tuple((high, name) for high, name in routes)


def _prepare_sparse(module: SparseLinear, planner: _Planner, dtype: torch.dtype) -> tuple[str, int]:
    """Float sparse layers keep a dense copy in the model's dtype; quantized ones a dense-code `QuantLinear` with
    its own kernel and routes (zero points where pruned). Returns (path, bytes it costs)."""
    module.release_dense()
    if planner.policy == "reference":
        return "reference", 0
    if module.bits is None:
        return "dense", module.materialize(dtype)
    inner = QuantLinear.from_codes(module.dense_codes(), module.weight_scale, module.weight_zero, None, module.bits,
                                   module.group_size)
    kernel, _ = choose_kernel(inner, planner.activations)
    if kernel is not None:
        kernel.prepare(inner)
    inner.kernel = kernel
    _install(inner, _plan(inner, kernel, planner))
    native.drop_unused(inner)
    module.use_compute_layer(inner)
    path = f"dense codes ({kernel.name if kernel else 'reference'})"
    return path, _layout_bytes(inner) + transposed.layout_bytes(inner)


def _prepare_float_head(model, planner: _Planner) -> int:
    """A float32 output head beside quantized layers: measure it against its bf16 copy (`float_head`); returns the
    bytes the copy costs (0 when no token count uses it). Models whose layers are all float (sparse, computing with
    a dense float copy) compute exactly, and so does their head."""
    head = float_head(model)
    if head is None:
        return 0
    head.make_copy()
    _install(head, planner.routes(head, None))
    if not any(name in COPY_PATHS for _, name in head.route_names):
        head.drop_copy()
        return 0
    return head.kernel_bf16_weight.numel() * head.kernel_bf16_weight.element_size()


def prepare_kernels(model, policy: str | None = None, activations: str | None = None) -> dict[str, str]:
    """Prepare every `QuantLinear`, int8 `QuantHead` and `SparseLinear` of `model` for its fastest paths; returns
    `{layer: kernel, "dense", or "reference"}`.

    `policy`: `"auto"` (default, or `OPTIMUM_AGENTOS_KERNELS`): the measured fastest path per token count (see
    `dispatch`); `"reference"`: the exact dequantize-then-`F.linear` path everywhere; a path name (`PATHS`): that
    path wherever it fits, the reference elsewhere. `activations` (default: the model's
    `quantization_config.activations`) = `"int8-dynamic"` allows the W8A8 kernel. Logs the choices, their reasons and
    the memory of every layout.
    """
    policy = policy or os.environ.get(KERNELS_ENV, "auto")
    if policy not in ("auto", "reference", *PATHS):
        raise ValueError(f"Unknown kernel policy {policy!r}; use 'auto', 'reference' or one of {sorted(PATHS)}.")
    if activations is None:
        config = getattr(getattr(model, "config", None), "quantization_config", None)
        activations = config.get("activations") if isinstance(config, dict) else getattr(config, "activations", None)
    dtype = _activation_dtype(model)
    planner = _Planner(policy, activations, dtype)
    chosen, slow, memory = {}, {}, Counter()
    for module in model.modules():  # groups are rebuilt below from the new layouts
        if isinstance(module, QuantLinear):
            module.unfuse()
    for name, module in model.named_modules():
        if isinstance(module, SparseLinear):
            chosen[name], cost = _prepare_sparse(module, planner, dtype)
            memory["sparse layers computing dense"] += cost
            continue
        if isinstance(module, QuantLinear):
            candidates = KERNELS
            module.restore_weight()
        elif isinstance(module, QuantHead):
            candidates = HEAD_KERNELS
        else:
            continue
        kernel, reason = (None, "policy 'reference'") if policy == "reference" else choose_kernel(
            module, activations, candidates)
        if kernel is not None:
            kernel.prepare(module)
        module.kernel = kernel
        _install(module, _plan(module, kernel, planner))
        native.drop_unused(module)
        chosen[name] = kernel.name if kernel else "reference"
        memory["kernel layouts"] += _layout_bytes(module)
        memory[f"transposed codes for dequant-t ({transposed.ENV}=0 saves them)"] += transposed.layout_bytes(module)
        if kernel is None:
            slow[name] = reason
    groups = fuse_siblings(model, planner.group_path) if policy != "reference" else []
    if groups:
        memory[f"{len(groups)} fused sibling groups (int4 scales, zero points)"] += sum(g.layout_bytes() for g in groups)
    if any(path != "dense" for path in chosen.values()):  # layers computing from codes; float sparse ones are exact
        head_bytes = _prepare_float_head(model, planner)
        if head_bytes:
            memory["bf16 copy of the float32 output head"] += head_bytes
    planner.finish()
    if any(kernel != "reference" for kernel in chosen.values()):
        release_free_memory()  # repacking freed about 4 bytes per weight of temporaries
    if chosen:
        counts = ", ".join(f"{k} x{n}" for k, n in Counter(chosen.values()).items())
        bound = max((dequant.scratch_elements(m) for m in model.modules() if getattr(m, "routes", None)), default=0)
        sizes = ", ".join(f"{k} {v / MIB:.1f} MiB" for k, v in memory.items() if v)
        logger.info(f"Compressed layers: {counts}. Memory: {sizes or 'nothing extra'}; the dequant paths share one "
                    f"scratch buffer of at most {bound * 6 / MIB:.1f} MiB "
                    "(float32 staging + bfloat16).")
    if slow and policy == "auto":
        first, why = next(iter(slow.items()))
        logger.warning(f"{len(slow)} QuantLinear layers have no packed CPU kernel (slower at decode), e.g. {first}: "
                       f"{why}")
    return chosen
