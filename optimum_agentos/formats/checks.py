"""Early checks of a checkpoint's safetensors files: truncated or malformed files fail with the file's name."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch


class CorruptCheckpointError(ValueError):
    """A safetensors file that is truncated or whose header cannot be parsed."""


_FIX = "Re-download or re-save the checkpoint."


def _entry_end(path: Path, name, entry) -> int:
    """The end offset of one header entry, checked for shape (a dict with dtype, shape and two ordered offsets)."""
    offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int and o >= 0 for o in offsets)
            or offsets[0] > offsets[1] or not isinstance(entry.get("dtype"), str)
            or not isinstance(entry.get("shape"), list)):
        raise CorruptCheckpointError(f"{path} has a malformed header entry for {name!r}: {entry!r}. {_FIX}")
    return offsets[1]


def check_safetensors(path: str | os.PathLike) -> dict:
    """Validate a safetensors file's header and length without reading tensors; raise naming the file.

    Returns the header (`{tensor name: {"dtype", "shape", "data_offsets"}}`)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CorruptCheckpointError(f"{path} is truncated ({size} bytes, no safetensors header). {_FIX}")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            raise CorruptCheckpointError(
                f"{path} is truncated or corrupt: its header claims {header_len} bytes but the file has {size}. {_FIX}"
            )
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CorruptCheckpointError(f"{path} has an unreadable safetensors header ({err}). {_FIX}") from err
    if not isinstance(header, dict):
        raise CorruptCheckpointError(f"{path} has a safetensors header that is not a JSON object. {_FIX}")
    end = max((_entry_end(path, k, v) for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end != size:
        raise CorruptCheckpointError(
            f"{path} is truncated or corrupt: tensors need {8 + header_len + end} bytes, the file has {size}. {_FIX}"
        )
    header.pop("__metadata__", None)
    return header


def check_layer_tensors(model, headers: dict, tied: dict | None = None) -> None:
    """Before loading an agentos checkpoint: every tensor the model will hold is in the files. The compressed layers'
    tensors must also have the shape and dtype the config implies.

    A missing `weight_scale` would otherwise load with whatever memory held, and a missing float tensor (an
    embedding, a norm) at its random initialization with only a warning. `tied` maps keys that are saved once under
    another name (a tied head) to that name."""
    from ..nn import QuantEmbedding, QuantHead, QuantLinear, SparseLinear

    if not headers:
        return
    tied = tied or {}
    compressed = {name for name, module in model.named_modules()
                  if isinstance(module, (QuantLinear, SparseLinear, QuantEmbedding, QuantHead))}
    missing, wrong = [], []
    for key, tensor in model.state_dict(keep_vars=True).items():
        entry = headers.get(key) or headers.get(tied.get(key, ""))
        if entry is None:
            missing.append(key)
        elif tuple(entry["shape"]) != tuple(tensor.shape):
            wrong.append(f"{key} {entry['shape']} (expected {list(tensor.shape)})")
        elif (key.rpartition(".")[0] in compressed and _fixed_dtype(key, tensor)
              and _DTYPES.get(tensor.dtype, entry["dtype"]) != entry["dtype"]):
            wrong.append(f"{key} stored as {entry['dtype']} (config.json implies {_DTYPES[tensor.dtype]})")
    if missing or wrong:
        found = (f"missing {missing[:5]}" if missing else "") + ("; " if missing and wrong else "") + (
            f"wrong shapes or dtypes {wrong[:5]}" if wrong else "")
        raise CorruptCheckpointError(
            f"The checkpoint's safetensors files do not hold the tensors its config.json describes: {found}. The "
            f"files are damaged or belong to another save. {_FIX}"
        )


def _fixed_dtype(key: str, tensor) -> bool:
    """Codes, bitmasks and quantization parameters are stored in exactly the dtype the config implies; kept float
    values may be stored in a 16-bit `float_dtype` and cast on load."""
    return not tensor.dtype.is_floating_point or key.endswith(("_scale", "_zero"))


_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.uint8: "U8", torch.int8: "I8",
           torch.int32: "I32", torch.int64: "I64", torch.bool: "BOOL"}


def check_sparse_layers(model, config) -> None:
    """After loading: every sparse layer's bitmask matches its values (and the recorded N:M pattern). Layers
    offloaded to disk (`device_map` with an `offload_folder`) hold no tensors in memory and are skipped; their value
    sizes were checked against the file headers before loading."""
    from ..config import parse_pattern

    if not config.sparse_layers:
        return
    n_m = parse_pattern(config.sparsity_pattern)
    for name in config.sparse_layers:
        layer = model.get_submodule(name)
        if layer.weight_mask.device.type != "meta":
            layer.check(name, n_m)


def check_sparse_value_shapes(model, config, headers: dict) -> None:
    """Before loading: each sparse layer's stored value tensor has the size its recorded count of kept weights
    implies (a more precise message than `check_layer_tensors` gives for the same mismatch)."""
    from ..nn.sparse_linear import SparseCheckpointError

    for name in config.sparse_layers or {}:
        entry = headers.get(f"{name}.weight")
        expected = tuple(model.get_submodule(name).weight.shape)
        if entry is not None and tuple(entry["shape"]) != expected:
            raise SparseCheckpointError(
                f"{name}: config.json records {config.sparse_layers[name]} kept weights (a value tensor of shape "
                f"{list(expected)}) but the safetensors file stores {entry['shape']}; the checkpoint is corrupt or "
                "its config.json belongs to another save. Re-download or re-save it."
            )
