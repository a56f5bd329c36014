"""Output shards written as compressed blocks arrive. Each block's tensors go to a part file as soon as the block is
done (`flush`), so memory holds one block's output at most; `finish` joins consecutive parts into shards of at most
`max_shard_size` by copying their bytes in chunks (no tensor is loaded again), gives them their transformers names
and writes the index. Shards are safetensors files laid out as `save_file` lays them out (`{"format": "pt"}`
metadata, tensors by decreasing alignment then name); the folder is a temporary one that `formats.folder` switches
into place only when the whole model is written."""

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


_COPY_CHUNK = 16 * 2**20  # bytes copied at a time when parts are joined into a shard
_ITEMSIZE = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2}


class ShardWriter:
    """Collects tensors in order; `flush()` writes what is pending to a part file (the streamed pipeline calls it
    once per block; `add` also flushes before the pending tensors would pass `max_shard_size`). `finish()` joins the
    parts into shards of at most `max_shard_size` bytes (a larger part is a shard of its own)."""

    def __init__(self, folder: str | os.PathLike, max_shard_size: int | str = "200MB"):
        self.folder = Path(folder)
        self.max_bytes = parse_size(max_shard_size)
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._parts: list[tuple[Path, list[str], int]] = []  # file, tensor names, data bytes
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
        """Write the pending tensors to a part file and let them go."""
        if not self._pending:
            return
        path = self.folder / f".part-{len(self._parts):05d}.safetensors"
        save_file(self._pending, path, metadata={"format": "pt"})
        self._parts.append((path, list(self._pending), self._pending_bytes))
        self._pending, self._pending_bytes = {}, 0

    def _groups(self) -> list[list[tuple[Path, list[str], int]]]:
        groups, size = [], 0
        for part in self._parts:
            if not groups or size + part[2] > self.max_bytes:
                groups.append([])
                size = 0
            groups[-1].append(part)
            size += part[2]
        return groups

    def finish(self) -> list[str]:
        """Write what is left, join the parts into shards named as `save_pretrained` names them and write the index
        when there is more than one."""
        self.flush()
        groups = self._groups()
        count, weight_map, names = len(groups), {}, []
        for i, group in enumerate(groups, start=1):
            name = "model.safetensors" if count == 1 else f"model-{i:05d}-of-{count:05d}.safetensors"
            if len(group) == 1:
                os.replace(group[0][0], self.folder / name)
            else:
                _join(self.folder / name, [part[0] for part in group])
            weight_map.update({k: name for part in group for k in part[1]})
            names.append(name)
        if count > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (self.folder / "model.safetensors.index.json").write_text(
                json.dumps(index, indent=2, sort_keys=True) + "\n")
        return names


def _read_header(path: Path) -> tuple[dict, int]:
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header, 8 + size


def _join(target: Path, parts: list[Path]) -> None:
    """One safetensors file holding every tensor of `parts`, copied in chunks; the parts are removed after."""
    entries = []  # (name, dtype, shape, part, start, end)
    for part in parts:
        header, data_start = _read_header(part)
        for name, meta in header.items():
            start, end = meta["data_offsets"]
            entries.append((name, meta["dtype"], meta["shape"], part, data_start + start, data_start + end))
    entries.sort(key=lambda e: (-_ITEMSIZE.get(e[1], 1), e[0]))  # as safetensors orders them: aligned data
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, dtype, shape, _, start, end in entries:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + end - start]}
        offset += end - start
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    handles = {}
    try:
        with open(target, "wb") as out:
            out.write(len(text).to_bytes(8, "little"))
            out.write(text)
            for _, _, _, part, start, end in entries:
                src = handles.get(part) or handles.setdefault(part, open(part, "rb"))
                src.seek(start)
                left = end - start
                while left:
                    chunk = src.read(min(left, _COPY_CHUNK))
                    if not chunk:
                        raise OSError(f"{part} is shorter than its header says; the disk may be full.")
                    out.write(chunk)
                    left -= len(chunk)
    finally:
        for handle in handles.values():
            handle.close()
    for part in parts:
        part.unlink()
