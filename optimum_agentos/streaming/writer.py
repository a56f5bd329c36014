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
_DTYPES = {torch.float64: "F64", torch.int64: "I64", torch.uint64: "U64", torch.float32: "F32", torch.int32: "I32",
           torch.uint32: "U32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int16: "I16", torch.uint16: "U16",
           torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}
# safetensors lays tensors out by dtype, widest first (its dtype order), then by name
_DTYPE_RANK = {name: rank for rank, name in enumerate(
    ["U64", "I64", "F64", "F32", "U32", "I32", "BF16", "F16", "U16", "I16", "F8_E4M3", "F8_E5M2", "I8", "U8", "BOOL"])}


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
        _save(self._pending, path)
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


def _write_header(out, entries: list[tuple[str, str, list, int]]) -> None:
    """The safetensors header of `(name, dtype, shape, bytes)` entries, in the order their data follows."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, dtype, shape, size in entries:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    out.write(len(text).to_bytes(8, "little"))
    out.write(text)


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """`safetensors.torch.save_file(tensors, path, metadata={"format": "pt"})`, written from the tensors' own memory:
    `save_file` first builds the whole file in memory, doubling a large tensor's footprint (the embeddings)."""
    for name, tensor in tensors.items():
        if tensor.dtype not in _DTYPES:
            raise TypeError(f"{name} has dtype {tensor.dtype}, which safetensors cannot store.")
    ordered = sorted(tensors.items(), key=lambda kv: (_DTYPE_RANK[_DTYPES[kv[1].dtype]], kv[0]))
    with open(path, "wb") as out:
        _write_header(out, [(n, _DTYPES[t.dtype], t.shape, t.numel() * t.element_size()) for n, t in ordered])
        for _, tensor in ordered:
            if tensor.numel():
                out.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))


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
    entries.sort(key=lambda e: (_DTYPE_RANK.get(e[1], len(_DTYPE_RANK)), e[0]))
    handles = {}
    try:
        with open(target, "wb") as out:
            _write_header(out, [(name, dtype, shape, end - start) for name, dtype, shape, _, start, end in entries])
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
