"""Measured kernel choice: which path computes each compressed layer, per token count, on this machine.

For each distinct layer signature (kind, shape, bits, group size, activation mode, activation dtype) the candidate
paths are timed once on this machine at `BUCKETS` token counts (round-robin, the fastest of a few calls: other
work on the machine only ever adds time, so the minimum is the steadiest estimate), after a check
that each one stays within its accuracy bound against the exact reference. The fastest path of each bucket serves
calls of up to that many tokens; calls above the last bucket use its choice. The choices are cached as JSON per
machine (CPU model, torch version, thread count) under the Hugging Face cache directory, so later loads only read
them; a corrupt cache file is ignored with a warning and rewritten. `OPTIMUM_AGENTOS_KERNELS=<path>` forces one path
(`reference`: the exact dequantize-then-`F.linear` path for every layer).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers.utils import logging

from . import dequant, fusion, native, transposed


logger = logging.get_logger(__name__)

BUCKETS = (1, 4, 8, 16, 32, 64, 128, 256, 512)  # token counts timed; a call uses the first bucket >= its tokens
REPEATS = 3  # timed calls per path and bucket (after one warm-up call)
# paths within this factor of the fastest are timed CONFIRM_REPEATS more times: memory traffic from elsewhere during
# the first rounds decided close calls (SmolLM2's int8 head at one token: 3.7 against 4.1 ms at a load, when the
# same two paths take 3.3 and 1.8 ms timed quietly)
CLOSE, CONFIRM_REPEATS = 1.2, 6
# tensors larger than this are not evicted before timed calls (`evict`): they leave the caches anyway, and flushing a
# float output head line by line would cost more than its timing
EVICT_MAX_BYTES = 64 << 20
LONG_CALL_S = 0.05  # a path whose warm-up call is this slow is timed once, not REPEATS times: the head at 512 tokens
CACHE_ENV = "OPTIMUM_AGENTOS_KERNEL_CACHE"  # folder of the choice cache (default: under the HF cache directory)
CACHE_FORMAT = 8  # 2: the float head's paths; 3: `dequant-t` (`transposed`); 4: the native paths; 5: `native-int8-act`
# (`native`); 6: `native-int4-vnni`, and timings with the weights out of the caches (`evict`); 7: the int8 rows'
# few-token loop reads them one after another, close calls are timed again, and `native-bf16-copy` for a float head;
# 8: sibling groups' one-token choices (`fusion`).
# Each format has its own file, so older versions sharing the cache folder keep reading theirs instead of rejecting
# entries they do not know
DEFAULT_TOLERANCE = 1e-2  # the packed bf16 kernels: bf16 rounding of activations (and int4 scales), of max |y|
DEQUANT_PATHS = (dequant.DequantBF16, dequant.DequantExact, transposed.DequantTransposed)
OTHER_PATHS = DEQUANT_PATHS + native.PATHS  # every path besides the layer's packed kernel


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine() -> dict:
    """What a choice depends on besides the layer: the CPU model, torch version and thread count."""
    return {"cpu": cpu_name(), "torch": torch.__version__, "threads": torch.get_num_threads()}


def cache_path() -> Path:
    folder = os.environ.get(CACHE_ENV)
    if folder is None:
        from huggingface_hub import constants

        folder = Path(constants.HF_HOME) / "optimum_agentos" / "kernels"
    key = json.dumps(machine(), sort_keys=True) + (f":format{CACHE_FORMAT}" if CACHE_FORMAT > 1 else "")
    return Path(folder) / f"choices-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def _valid(data, names: set[str]) -> bool:
    if not (isinstance(data, dict) and data.get("format") == CACHE_FORMAT and isinstance(data.get("choices"), dict)):
        return False
    for entry in data["choices"].values():
        routes = entry.get("routes") if isinstance(entry, dict) else None
        if not (isinstance(routes, list) and routes and all(
                isinstance(r, list) and len(r) == 2 and (r[0] is None or isinstance(r[0], int)) and r[1] in names
                for r in routes) and routes[-1][0] is None):
            return False
    return True


def read_cache(path: Path, names: set[str]) -> dict:
    """The cached choices `{signature: entry}`; `{}` (with a warning) for a corrupt or foreign file."""
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        data, why = None, str(error)
    else:
        why = "unexpected content"
    if not _valid(data, names):
        logger.warning(f"Ignoring the kernel choice cache {path} ({why}); measuring again and rewriting it.")
        return {}
    return data["choices"]


def write_cache(path: Path, choices: dict) -> None:
    """Write the cache atomically (a temporary file renamed over it); a read-only cache folder only costs a warning."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps({"format": CACHE_FORMAT, "machine": machine(), "choices": choices}, indent=1))
        os.replace(temporary, path)
    except OSError as error:
        logger.warning(f"Could not write the kernel choice cache {path}: {error}")


def signature(layer, kernel, activations: str | None, dtype: torch.dtype) -> str:
    bits = getattr(layer, "bits", 8)
    group = getattr(layer, "group_size", -1)
    kind = type(layer).__name__
    name = getattr(kernel, "name", "none")
    return (f"{kind}:{layer.out_features}x{layer.in_features}:b{bits}:g{group}:{activations or 'weight-only'}:"
            f"{str(dtype).removeprefix('torch.')}:{name}")


def candidates(layer, kernel) -> list:
    """The paths that can serve `layer`: its own list (`float_head.FloatHead`), or its packed kernel (if any) then
    the dequant and native paths that fit it."""
    if getattr(layer, "candidate_paths", None) is not None:
        return [path for path in layer.candidate_paths
                if getattr(path, "unsupported", None) is None or path.unsupported(layer) is None]
    paths = [kernel] if kernel is not None else []
    return paths + [path for path in OTHER_PATHS if path.unsupported(layer) is None]


def _reference(layer, x: torch.Tensor) -> torch.Tensor:
    bias = None if layer.bias is None else layer.bias.to(x.dtype)
    return F.linear(x, layer.dequantize(x.dtype), bias)


def accurate(layer, paths: list, dtype: torch.dtype) -> tuple[list, list[str]]:
    """The paths within their accuracy bound on a random input, and why the others were rejected."""
    x = torch.randn(4, layer.in_features, generator=torch.Generator().manual_seed(0)).to(dtype)
    exact = _reference(layer, x).float()
    kept, rejected = [], []
    for path in paths:
        error = (path.run(layer, x).float() - exact).abs().max().item()
        bound = getattr(path, "tolerance", DEFAULT_TOLERANCE) * exact.abs().max().item()
        (kept if error <= bound else rejected).append(path)
        if error > bound:
            rejected[-1] = f"{path.name}: error {error:.3g} above its bound {bound:.3g}"
    return kept, rejected


def evict(layer) -> None:
    """Drop the layer's tensors (weights in every layout, scales) from the CPU caches, up to `EVICT_MAX_BYTES` each.
    In a model larger than the caches each layer's weights come from memory at every token; timed with them cached
    (the same layer called again and again), paths that differ in how they read memory look alike (the int4 VNNI
    and float32 loops: level in cache, 1.18-1.39 times apart from memory on SmolLM2's shapes)."""
    if native.unavailable() is None:
        for tensor in (*layer.parameters(), *layer.buffers()):
            if tensor.untyped_storage().nbytes() <= EVICT_MAX_BYTES:
                native.OPS.evict(tensor)


def _time_rounds(layer, paths: list, x: torch.Tensor, samples: dict[str, list], rounds: int, evicted=None) -> None:
    """Time each path once per round, round-robin, with the layer's tensors (or `evicted`'s) evicted before each
    call."""
    for _ in range(rounds):
        for path in paths:
            evict(evicted if evicted is not None else layer)
            start = time.perf_counter()
            path.run(layer, x.view_as(x))
            samples[path.name].append(time.perf_counter() - start)


def time_paths(layer, paths: list, dtype: torch.dtype) -> dict[int, dict[str, float]]:
    """Microseconds of each path at each bucket's token count: the fastest of its calls, timed round-robin, each with
    the layer's tensors evicted from the caches (`evict`) and the input in them."""
    timings = {}
    for tokens in BUCKETS:
        x = torch.randn(tokens, layer.in_features).to(dtype)
        warm = {}
        # paths made for few tokens (`max_tokens`) are not timed, nor chosen, above their limit
        active = [p for p in paths if getattr(p, "max_tokens", None) is None or tokens <= p.max_tokens]
        for path in active:  # a new view each call: nothing cached from the previous call's input is reused
            start = time.perf_counter()
            path.run(layer, x.view_as(x))
            warm[path.name] = time.perf_counter() - start
        samples = {path.name: [] for path in active}
        quick = [p for p in active if warm[p.name] <= LONG_CALL_S]
        slow = [p for p in active if warm[p.name] > LONG_CALL_S]
        # a slow path already 4x slower than the best warm-up keeps its warm-up time (the output head at 512 tokens
        # would otherwise cost seconds per slow path); the other slow ones are timed once
        fastest = min(warm.values())
        for path in slow:
            if warm[path.name] > 4 * fastest:
                samples[path.name].append(warm[path.name])
        _time_rounds(layer, [p for p in slow if warm[p.name] <= 4 * fastest], x, samples, 1)
        _time_rounds(layer, quick, x, samples, REPEATS)
        fastest = min(min(s) for s in samples.values())
        close = [p for p in quick if min(samples[p.name]) <= CLOSE * fastest]
        if len(close) > 1:
            _time_rounds(layer, close, x, samples, CONFIRM_REPEATS)
        timings[tokens] = {name: round(min(s) * 1e6, 1) for name, s in samples.items()}
    return timings


class _MembersAlone:
    """A sibling group's members each on its own shortest path (`fusion.SEPARATE`), timed like a path."""

    name = fusion.SEPARATE

    @staticmethod
    def run(group, x: torch.Tensor) -> None:
        for member in group.members:
            member.routes[0][1](member, x)


def time_group(group, paths: list, dtype: torch.dtype) -> dict[str, float]:
    """Microseconds of a one-token call of a sibling group (`fusion.FusedGroup`) on each of `paths`, and of its members
    called alone (`fusion.SEPARATE`): the fastest of the calls, round-robin, the members' codes and scales evicted
    before each call (their codes are views of the group's)."""
    x = torch.randn(1, group.in_features).to(dtype)
    candidates = [*paths, _MembersAlone]
    members = torch.nn.ModuleList(group.members)  # evicts every member's tensors
    warm_up, samples = ({path.name: [] for path in candidates} for _ in range(2))
    with torch.no_grad():
        _time_rounds(group, candidates, x, warm_up, 1, members)
        _time_rounds(group, candidates, x, samples, REPEATS + CONFIRM_REPEATS, members)
    return {name: round(min(s) * 1e6, 1) for name, s in samples.items()}


def routes_from(timings: dict[int, dict[str, float]]) -> list[list]:
    """`[[max_tokens, path], ..., [None, path]]`: the fastest path per bucket, equal neighbours merged."""
    best = [(tokens, min(row, key=row.get)) for tokens, row in sorted(timings.items())]
    routes = []
    for tokens, name in best:
        if routes and routes[-1][1] == name:
            routes[-1][0] = tokens
        else:
            routes.append([tokens, name])
    routes[-1][0] = None
    return routes


def routes_without(entry: dict, unavailable: set[str]) -> list[list]:
    """A cache entry's routes without the paths this layer cannot take now (e.g. `dequant-t` turned off): the
    fastest of the remaining measured paths per bucket; the reference path when none was measured."""
    timings = {int(tokens): {name: us for name, us in row.items() if name not in unavailable}
               for tokens, row in entry.get("us", {}).items()}
    if not timings or not all(timings.values()):
        return [[None, "reference"]]
    return routes_from(timings)


def measure(layer, kernel, dtype: torch.dtype) -> dict:
    """The cache entry of one signature, measured on `layer` (its values do not change the speed)."""
    paths, rejected = accurate(layer, candidates(layer, kernel), dtype)
    if len(paths) <= 1:
        return {"routes": [[None, paths[0].name if paths else "reference"]], "rejected": rejected}
    with torch.no_grad():
        timings = time_paths(layer, paths, dtype)
    return {"routes": routes_from(timings), "us": {str(k): v for k, v in timings.items()}, "rejected": rejected}


def describe(routes: list[list]) -> str:
    parts, low = [], 1
    for high, name in routes:
        parts.append(f"{low}+ tokens {name}" if high is None else f"{low}-{high} tokens {name}")
        low = (high or 0) + 1
    return ", ".join(parts)
