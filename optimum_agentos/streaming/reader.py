"""Lazy reads of a safetensors checkpoint (one file or an indexed set of shards): a tensor is read only when asked
for, in the checkpoint's own dtype, and no file stays mapped between reads."""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from pathlib import Path

import torch


INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class CheckpointReader:
    """The tensors of a float checkpoint folder, by name; `read(names)` loads just those (grouped by shard)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self._headers: dict[str, tuple[dict, int]] = {}
        self.weight_map = self._weight_map()

    def _weight_map(self) -> dict[str, str]:
        index = self.folder / INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map") or {}
            missing = sorted({f for f in weight_map.values() if not (self.folder / f).is_file()})
            if missing:
                raise FileNotFoundError(
                    f"{index} names shards that are not in {self.folder}: {', '.join(missing[:5])}"
                    f"{' and more' if len(missing) > 5 else ''}. Download or copy the missing shards (the checkpoint "
                    "is incomplete), then run again."
                )
            return dict(weight_map)
        single = self.folder / SINGLE
        if single.is_file():
            return {k: SINGLE for k in self._header(SINGLE)[0]}
        others = sorted(p.name for p in self.folder.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".gguf"))
        found = f" (found {', '.join(others[:3])})" if others else ""
        raise FileNotFoundError(
            f"{self.folder} has no safetensors weights ({SINGLE} or {INDEX}){found}; streamed compression reads only "
            "safetensors. Convert it once: load it with from_pretrained and save_pretrained(folder) (safetensors is "
            "the default), or pass streaming=False to load it whole in memory."
        )

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def nbytes(self, names) -> int:
        """Bytes the tensors `names` take in their stored dtype (from the headers, nothing read)."""
        total = 0
        for name in names:
            start, end = self._header(self.weight_map[name])[0][name]["data_offsets"]
            total += end - start
        return total

    def read(self, names, device="cpu") -> dict[str, torch.Tensor]:
        """The tensors `names`, each read straight from its file into its own memory (plain reads, no mapping: the
        file's pages never count in this process's resident memory)."""
        by_file = defaultdict(list)
        for name in names:
            if name not in self.weight_map:
                raise KeyError(f"{name} is not in the checkpoint {self.folder}; it does not match the model's config.")
            by_file[self.weight_map[name]].append(name)
        out = {}
        for file, members in by_file.items():
            header, data_start = self._header(file)
            with open(self.folder / file, "rb") as f:
                for name in members:
                    entry = header[name]
                    start, end = entry["data_offsets"]
                    raw = torch.empty(end - start, dtype=torch.uint8)
                    f.seek(data_start + start)
                    if f.readinto(memoryview(raw.numpy())) != end - start:
                        raise OSError(f"{self.folder / file} is truncated: {name} is cut short. Re-download it.")
                    tensor = raw.view(_DTYPES[entry["dtype"]]).reshape(entry["shape"])
                    out[name] = tensor.to(device) if str(device) != "cpu" else tensor
        return out

    def shape(self, name: str) -> tuple[torch.dtype, list[int]]:
        """The stored dtype and shape of `name` (from the header, nothing read)."""
        entry = self._header(self.weight_map[name])[0][name]
        return _DTYPES[entry["dtype"]], entry["shape"]

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows `start:stop` of the tensor `name` (along its first dimension), in its stored dtype: a part of a large
        matrix without the rest of it in memory."""
        file = self.weight_map[name]
        header, data_start = self._header(file)
        entry = header[name]
        dtype, shape = _DTYPES[entry["dtype"]], entry["shape"]
        row_bytes = dtype.itemsize * math.prod(shape[1:])
        raw = torch.empty((stop - start) * row_bytes, dtype=torch.uint8)
        with open(self.folder / file, "rb") as f:
            f.seek(data_start + entry["data_offsets"][0] + start * row_bytes)
            if f.readinto(memoryview(raw.numpy())) != raw.numel():
                raise OSError(f"{self.folder / file} is truncated: {name} is cut short. Re-download it.")
        return raw.view(dtype).reshape([stop - start, *shape[1:]])

    def _header(self, file: str) -> tuple[dict, int]:
        if file not in self._headers:
            with open(self.folder / file, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(size))
            header.pop("__metadata__", None)
            self._headers[file] = (header, 8 + size)
        return self._headers[file]


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
