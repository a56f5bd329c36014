"""Early checks of a checkpoint's safetensors files: truncated or malformed files fail with the file's name."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path


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
