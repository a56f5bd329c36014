"""Output shards written as compressed blocks arrive: tensors are held only until a shard is full, then written
(safetensors, `{"format": "pt"}` metadata, as `save_pretrained` writes them) and freed. `finish` gives the shards
their transformers names and writes the index; the folder is a temporary one that `formats.folder` switches into
place only when the whole model is written."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers.utils import logging


logger = logging.get_logger(__name__)


def parse_size(size: int | str) -> int:
    """`"500MB"`, `"2GB"`, `"1GiB"` or a number of bytes."""
    if isinstance(size, int):
        return size
    text = str(size).strip().upper()
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "KB": 10**3, "MB": 10**6, "GB": 10**9,
             "TB": 10**12, "B": 1}
    for unit, factor in units.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"Cannot read the size {size!r}; write it like '500MB', '2GB' or a number of bytes.") from None


class ShardWriter:
    """Collects tensors in order and writes them to shards of at most `max_shard_size` bytes (a tensor larger than
    that gets a shard of its own)."""

    def __init__(self, folder: str | os.PathLike, max_shard_size: int | str = "200MB"):
        self.folder = Path(folder)
        self.max_bytes = parse_size(max_shard_size)
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._parts: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0
        self._seen: set[str] = set()

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, tensor in tensors.items():
            if name in self._seen:
                raise ValueError(f"{name} was written twice; streamed blocks must not share tensors.")
            self._seen.add(name)
            size = tensor.numel() * tensor.element_size()
            if self._pending and self._pending_bytes + size > self.max_bytes:
                self.flush()
            self._pending[name] = tensor.detach().to("cpu").contiguous()
            self._pending_bytes += size
            self.total_bytes += size

    def flush(self) -> None:
        if not self._pending:
            return
        path = self.folder / f".part-{len(self._parts):05d}.safetensors"
        save_file(self._pending, path, metadata={"format": "pt"})
        self._parts.append((path, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def finish(self) -> list[str]:
        """Write what is left, name the shards as `save_pretrained` does and write the index when sharded."""
        self.flush()
        if len(self._parts) == 1:
            os.replace(self._parts[0][0], self.folder / "model.safetensors")
            return ["model.safetensors"]
        count, weight_map, names = len(self._parts), {}, []
        for i, (path, keys) in enumerate(self._parts, start=1):
            name = f"model-{i:05d}-of-{count:05d}.safetensors"
            os.replace(path, self.folder / name)
            weight_map.update({k: name for k in keys})
            names.append(name)
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return names
