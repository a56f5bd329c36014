"""Sizes on disk for mixed precision: what each layer's bits/group size costs in bytes, the whole checkpoint's
tensor bytes (computed from the format, exactly), and the greedy choice of per-layer formats under a byte budget.

Sizes come from the same module replacement the loader runs (`formats.replace`), on a meta-device copy of the
model: every tensor the checkpoint will hold (packed codes, scales, zeros, biases, norms, embeddings or their int8
codes and scales, an untied head), tied tensors once, kept float weights in `float_dtype`. The safetensors header
adds a few bytes per tensor; `header_bytes_bound` bounds it from above, so a plan that fits with it fits on disk.
"""

from __future__ import annotations

import copy
import json

import torch
from torch import nn

from ..config import AgentOSConfig
from ..formats.kept_weights import kept_float_weights
from ..formats.replace import replace_with_quant_linear
from ..nn.linear import SCALE_DTYPES
from ..nn.packing import packed_row_bytes
from ..nn.qmath import num_groups

# (bits, group_size) choices a plan may give a layer, most to least precise: int8 per row, int4/int3 with groups of
# 64 and 128, int2 with groups of 64.
DEFAULT_CANDIDATES = ((8, -1), (4, 64), (4, 128), (3, 64), (3, 128), (2, 64))
_SAFETENSORS_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.uint8: "U8",
                       torch.int8: "I8", torch.int32: "I32", torch.int64: "I64", torch.bool: "BOOL"}


def layer_bytes(out_features: int, in_features: int, bits: int, group_size: int, scale_dtype: str = "float16") -> int:
    """Bytes of one `QuantLinear`'s packed codes, scales and zero points (its bias is counted apart)."""
    groups = num_groups(in_features, group_size)
    scale_size = SCALE_DTYPES[scale_dtype].itemsize
    return out_features * packed_row_bytes(in_features, bits) + out_features * groups * (scale_size + 1)


def saved_tensors(model: nn.Module, config: AgentOSConfig) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """`{key: (dtype, shape)}` of every tensor an agentos checkpoint of `model` (a float model) with `config` holds,
    tied tensors once, without quantizing anything."""
    dtype = next(model.parameters()).dtype
    with torch.device("meta"):
        fresh = type(model)(copy.deepcopy(model.config)).to(dtype)
    replace_with_quant_linear(fresh, config, device="meta")
    kept = {id(w) for w in kept_float_weights(fresh)}
    float_dtype = SCALE_DTYPES[config.float_dtype] if config.float_dtype else None
    tied = set(getattr(fresh, "all_tied_weights_keys", None) or {})
    out = {}
    for key, tensor in fresh.state_dict(keep_vars=True).items():
        if key in tied:
            continue
        stored = tensor.dtype
        if id(tensor) in kept and float_dtype is not None and stored.itemsize > float_dtype.itemsize:
            stored = float_dtype
        out[key] = (stored, tuple(tensor.shape))
    return out


def tensor_bytes(tensors: dict) -> int:
    return sum(dtype.itemsize * int(torch.Size(shape).numel()) for dtype, shape in tensors.values())


def header_bytes_bound(tensors: dict) -> int:
    """An upper bound of the safetensors header (8-byte length, JSON with every offset at its widest, padding)."""
    width = len(str(tensor_bytes(tensors)))
    entries = {key: {"dtype": _SAFETENSORS_DTYPES.get(dtype, "F64"), "shape": list(shape),
                     "data_offsets": [10**width - 1, 10**width - 1]} for key, (dtype, shape) in tensors.items()}
    entries["__metadata__"] = {"format": "pt"}
    return 8 + len(json.dumps(entries, separators=(",", ":"))) + 7


def checkpoint_bytes(model: nn.Module, config: AgentOSConfig) -> tuple[int, int]:
    """`(tensor bytes, upper bound of the safetensors file size)` of the checkpoint `config` would make of `model`."""
    tensors = saved_tensors(model, config)
    data = tensor_bytes(tensors)
    return data, data + header_bytes_bound(tensors)


def frontier(options: list[tuple[int, float]]) -> list[int]:
    """Indices of `options` (`(bytes, error)`) on the lower convex hull from the cheapest up: the steps worth taking
    (a choice costing more and erring more, or a poorer trade than a further one, is skipped)."""
    order = sorted(range(len(options)), key=lambda i: (options[i][0], options[i][1]))
    hull: list[int] = []
    for i in order:
        if hull and options[i][1] >= options[hull[-1]][1]:
            continue  # dominated: more bytes, no less error
        while len(hull) >= 2:
            (b1, e1), (b2, e2) = options[hull[-2]], options[hull[-1]]
            b3, e3 = options[i]
            if (e1 - e2) * (b3 - b2) <= (e2 - e3) * (b2 - b1):  # the middle point is above the chord: drop it
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def greedy_plan(items: dict[str, list[tuple[int, float]]], budget: int) -> dict[str, int]:
    """Pick one option per item (`(bytes, error)` lists) with total bytes <= `budget` and small total error: start
    from every item's cheapest option and take, again and again, the upgrade with the most error removed per byte
    that still fits. Raises `ValueError` when even the cheapest options do not fit."""
    hulls = {name: frontier(options) for name, options in items.items()}
    chosen = {name: 0 for name in items}  # position on the hull
    used = sum(items[name][hull[0]][0] for name, hull in hulls.items())
    if used > budget:
        raise ValueError(f"the smallest plan takes {used} bytes, over the budget of {budget}")
    while True:
        best, best_rate = None, 0.0
        for name, hull in hulls.items():
            k = chosen[name]
            if k + 1 >= len(hull):
                continue
            (b0, e0), (b1, e1) = items[name][hull[k]], items[name][hull[k + 1]]
            if used - b0 + b1 > budget:
                continue
            rate = (e0 - e1) / max(b1 - b0, 1)
            if best is None or rate > best_rate:
                best, best_rate = name, rate
        if best is None:
            break
        k = chosen[best]
        used += items[best][hulls[best][k + 1]][0] - items[best][hulls[best][k]][0]
        chosen[best] = k + 1
    return {name: hulls[name][k] for name, k in chosen.items()}
