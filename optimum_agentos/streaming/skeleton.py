"""A model without weights (parameters on the meta device, computed buffers such as rotary frequencies real) whose
parts are filled from the checkpoint one at a time and emptied again after use."""

from __future__ import annotations

import math

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from torch import nn
from transformers.utils import logging

from ..nn.devices import resolve_device
from .reader import CheckpointReader


logger = logging.get_logger(__name__)


def build_skeleton(path: str, config, auto_class, dtype: torch.dtype) -> nn.Module:
    """The model of `config` with its parameters on the meta device (nothing allocated), in eval mode."""
    with init_empty_weights(include_buffers=False):
        model = auto_class.from_config(config, dtype=dtype)
    model.tie_weights()  # tied parameters are one (counted once, freed together)
    model.eval()
    model.name_or_path = path
    return model


class StreamedModel:
    """A skeleton model and the checkpoint it is filled from, part by part (`load(prefix)` / `free(prefix)`)."""

    def __init__(self, path: str, reader: CheckpointReader, model: nn.Module, dtype: torch.dtype, device="cpu"):
        self.path = path
        self.reader = reader
        self.model = model
        self.dtype = dtype
        self.device = torch.device(device)
        self._check_keys()

    def _check_keys(self) -> None:
        expected = set(self.model.state_dict())
        stored = set(self.reader.keys())
        tied = set(getattr(self.model, "all_tied_weights_keys", None) or {})
        missing = sorted(expected - stored - tied)
        if missing:
            raise ValueError(
                f"The checkpoint in {self.path} lacks {len(missing)} tensors the model expects (e.g. "
                f"{', '.join(missing[:3])}); its names do not match {type(self.model).__name__}'s (a checkpoint "
                "renamed on load, or another architecture). Pass streaming=False to load it in memory."
            )

    def tensor_names(self, prefix: str = "", exclude: tuple[str, ...] = ()) -> list[str]:
        """Checkpoint tensors under `prefix` (all when empty), leaving out those under any `exclude` prefix."""
        start = f"{prefix}." if prefix else ""
        return [n for n in self.reader.keys() if n.startswith(start) and not n.startswith(exclude)]

    def load(self, names: list[str]) -> None:
        """Fill these parameters/buffers from the checkpoint, in the compute dtype, on the compute device."""
        for name, tensor in self.reader.read(names).items():
            value = tensor.to(self.dtype) if tensor.is_floating_point() else tensor
            set_module_tensor_to_device(self.model, name, self.device, value=value)
            del tensor
        self._tie()

    def load_rows(self, name: str, rows: torch.Tensor) -> None:
        """Fill the matrix `name` (an input embedding) with only the rows `rows` read, the others left unwritten:
        on the CPU their pages are never touched, so they take no resident memory. For a lookup that reads only
        those rows (the calibration tokens' embeddings), exactly what a full load gives."""
        _, shape = self.reader.shape(name)
        weight = torch.empty(shape, dtype=self.dtype, device=self.device)
        rows = torch.unique(rows.reshape(-1).cpu()).tolist()
        run_start = 0
        for i in range(1, len(rows) + 1):  # contiguous runs of rows, one read each
            if i == len(rows) or rows[i] != rows[i - 1] + 1:
                first, last = rows[run_start], rows[i - 1] + 1
                weight[first:last] = self.reader.read_rows(name, first, last).to(self.dtype)
                run_start = i
        set_module_tensor_to_device(self.model, name, self.device, value=weight)
        self._tie()

    def read_cast(self, name: str, dtype: torch.dtype, chunk_bytes: int = 16 * 2**20) -> torch.Tensor:
        """The tensor `name` as a full load in the compute dtype then `.to(dtype)` gives it, converted a few rows at
        a time: memory holds the result and one chunk, never the whole tensor in the compute dtype."""
        _, shape = self.reader.shape(name)
        out = torch.empty(shape, dtype=dtype)
        if not shape:
            return self.reader.read([name])[name].to(self.dtype).to(dtype)
        step = max(1, chunk_bytes // max(1, self.dtype.itemsize * math.prod(shape[1:])))
        for start in range(0, shape[0], step):
            stop = min(start + step, shape[0])
            out[start:stop] = self.reader.read_rows(name, start, stop).to(self.dtype).to(dtype)
        return out

    def _tie(self) -> None:
        if getattr(self.model.config, "tie_word_embeddings", False) or getattr(
            self.model.config.get_text_config(), "tie_word_embeddings", False
        ):
            self.model.tie_weights()

    def free(self, prefix: str = "", exclude: tuple[str, ...] = ()) -> None:
        """Put every parameter and persistent buffer under `prefix` (tied copies included) back on the meta device."""
        module = self.model.get_submodule(prefix) if prefix else self.model
        start = f"{prefix}." if prefix else ""
        persistent = set(module.state_dict(keep_vars=True))
        names = [n for n, _ in module.named_parameters(remove_duplicate=False)]
        names += [n for n, _ in module.named_buffers(remove_duplicate=False) if n in persistent]
        for name in names:
            if exclude and (start + name).startswith(exclude):
                continue
            set_module_tensor_to_device(self.model, start + name, "meta")


def open_streamed(path: str, config, auto_class, dtype: torch.dtype = torch.float32, device=None) -> StreamedModel:
    """The checkpoint folder `path` as a `StreamedModel`: nothing but the headers read, the model built on meta."""
    reader = CheckpointReader(path)
    model = build_skeleton(path, config, auto_class, dtype)
    return StreamedModel(path, reader, model, dtype, resolve_device(device))
