"""Lazy reads of a safetensors checkpoint (one file or an indexed set of shards): a tensor is read only when asked
for, in the checkpoint's own dtype, and no file stays mapped between reads."""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open


INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class CheckpointReader:
    """The tensors of a float checkpoint folder, by name; `read(names)` loads just those (grouped by shard)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.weight_map = self._weight_map()
        self._dtypes: dict[str, torch.dtype] = {}

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
            with safe_open(single, framework="pt") as f:
                return {k: SINGLE for k in f.keys()}
        others = sorted(p.name for p in self.folder.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".gguf"))
        found = f" (found {', '.join(others[:3])})" if others else ""
        raise FileNotFoundError(
            f"{self.folder} has no safetensors weights ({SINGLE} or {INDEX}){found}; streamed compression reads only "
            "safetensors. Convert it once: load it with from_pretrained and save_pretrained(folder) (safetensors is "
            "the default), or pass streaming=False to load it whole in memory."
        )

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def dtype(self) -> torch.dtype:
        """The dtype of the checkpoint's floating-point tensors (the first one found)."""
        for name in self.weight_map:
            dtype = self.read([name])[name].dtype
            if dtype.is_floating_point:
                return dtype
        return torch.float32

    def nbytes(self, names) -> int:
        """Bytes the tensors `names` take in their stored dtype (from the headers, nothing read)."""
        by_file = defaultdict(list)
        for name in names:
            by_file[self.weight_map[name]].append(name)
        total = 0
        for file, members in by_file.items():
            with safe_open(self.folder / file, framework="pt") as f:
                for name in members:
                    sl = f.get_slice(name)
                    total += _numel(sl.get_shape()) * _itemsize(sl.get_dtype())
        return total

    def read(self, names, device="cpu") -> dict[str, torch.Tensor]:
        """The tensors `names`, each in its own memory (copied out of the file, whose mapping is closed after)."""
        by_file = defaultdict(list)
        for name in names:
            if name not in self.weight_map:
                raise KeyError(f"{name} is not in the checkpoint {self.folder}; it does not match the model's config.")
            by_file[self.weight_map[name]].append(name)
        out = {}
        for file, members in by_file.items():
            with safe_open(self.folder / file, framework="pt", device=str(device)) as f:
                for name in members:
                    out[name] = f.get_tensor(name).clone()
        return out


_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
             "F8_E4M3": 1, "F8_E5M2": 1}


def _itemsize(dtype: str) -> int:
    return _ITEMSIZE.get(dtype, 4)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
