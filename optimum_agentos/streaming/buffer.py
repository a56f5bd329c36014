"""The calibration activations between blocks, kept within a memory budget.

Each calibration batch is one entry `(args, kwargs)` of a block call, as `calibration.runner` captures them. The
hidden states (`args[0]`, the only large tensor that changes from block to block) stay in memory while the budget
allows and go to a file in the spill folder, in their own dtype, beyond it; the rest (position embeddings, masks)
is small, shared by every block and kept in memory, counted in the budget."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..formats.folder import remove_stale_folders


def _tensor_bytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_tensor_bytes(v) for v in value)
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    return 0


_SPILL_TAG = "agentos-activations-"
_SPILL_MARKER = ".agentos-spill"  # written into every spill folder: only folders holding it are ever removed


def remove_stale_spills(parent: Path) -> list[Path]:
    """Remove the spill folders that killed runs left in `parent` (`agentos-activations-<pid>-...` of a process that
    is gone, holding the marker file this library writes into each: a user's folder of the same name is never
    touched); returns them."""
    return remove_stale_folders(parent, _SPILL_TAG, _SPILL_MARKER)


class BufferBudgetError(MemoryError):
    """The calibration activations cannot be held within the memory budget."""


class ActivationBuffer:
    """A list of block inputs `(args, kwargs)` whose hidden states spill to disk beyond `budget_bytes`.

    Supports what the block-by-block runner does with a list: `append`, iteration, `len`, indexing and item
    assignment. `spill_dir` (default: the system's temporary folder) receives one safetensors file per spilled
    batch; `close()` (or leaving a `with` block) removes them."""

    def __init__(self, budget_bytes: int | None = None, spill_dir: str | os.PathLike | None = None, device="cpu"):
        self.budget = budget_bytes
        self.device = torch.device(device)
        self._parent = Path(spill_dir) if spill_dir is not None else None
        self._dir: Path | None = None
        self._entries: list[list] = []  # [hidden or None, rest_args, kwargs, spill path or None]
        self.resident_bytes = 0  # hidden states kept in memory
        self.side_bytes = 0  # the other block arguments, all in memory
        self.batch_bytes = 0  # the largest batch of hidden states
        self.spilled_bytes = 0
        self.peak_resident_bytes = 0

    # list protocol -----------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self):
        for i in range(len(self._entries)):
            yield self[i]

    def append(self, item) -> None:
        self._entries.append([None, (), {}, None])
        self._store(len(self._entries) - 1, item, new=True)

    def __getitem__(self, i: int):
        hidden, rest, kwargs, path = self._entries[i]
        if path is not None:
            hidden = load_file(path, device=str(self.device))["hidden"]
        return (hidden,) + tuple(rest), kwargs

    def __setitem__(self, i: int, item) -> None:
        self._store(i, item, new=False)

    # storage -----------------------------------------------------------------------------------------------------
    def _store(self, i: int, item, new: bool) -> None:
        args, kwargs = item
        hidden, rest = args[0].detach(), tuple(args[1:])
        entry = self._entries[i]
        if new:
            self.side_bytes += _tensor_bytes(rest) + _tensor_bytes(kwargs)
            size = _tensor_bytes(hidden)
            self.batch_bytes = max(self.batch_bytes, size)
            self._check_fits()
            # two batches stay free: the one a block is reading (from disk) and the output replacing it
            if self.budget is None or self.resident_bytes + size + 2 * self.batch_bytes <= self.budget:
                self.resident_bytes += size
            else:
                entry[3] = self._spill_path(i)
                self._check_disk(size)
                self.spilled_bytes += size
        entry[1], entry[2] = rest, kwargs
        if entry[3] is None:
            entry[0] = hidden
        else:
            save_file({"hidden": hidden.to("cpu").contiguous()}, entry[3])
        self.peak_resident_bytes = max(self.peak_resident_bytes, self.side_bytes + self.resident_bytes)

    def _check_fits(self) -> None:
        need = self.side_bytes + 2 * self.batch_bytes
        if self.budget is not None and need > self.budget:
            raise BufferBudgetError(
                f"The calibration activations need at least {need / 2**20:.1f} MiB in memory (two batches of hidden "
                f"states, {self.batch_bytes / 2**20:.1f} MiB each, plus {self.side_bytes / 2**20:.1f} MiB of masks "
                f"and position embeddings kept for every batch), over the buffer budget of "
                f"{self.budget / 2**20:.1f} MiB. Raise buffer_memory, or lower batch_size or seq_len."
            )

    def _spill_path(self, i: int) -> str:
        if self._dir is None:
            parent = self._parent or Path(tempfile.gettempdir())
            parent.mkdir(parents=True, exist_ok=True)
            remove_stale_spills(parent)
            self._dir = Path(tempfile.mkdtemp(prefix=f"{_SPILL_TAG}{os.getpid()}-{uuid.uuid4().hex[:6]}-", dir=parent))
            (self._dir / _SPILL_MARKER).touch()
        return str(self._dir / f"batch-{i:06d}.safetensors")

    def _check_disk(self, size: int) -> None:
        free = shutil.disk_usage(self._dir).free
        if size > free:
            raise BufferBudgetError(
                f"The calibration activations spill to {self._dir.parent}, which has {free / 2**20:.0f} MiB free, too "
                f"little for the next {size / 2**20:.1f} MiB. Pass spill_dir= on a larger disk, raise buffer_memory, "
                "or use fewer calibration samples."
            )

    def close(self) -> None:
        """Let the activations go (in memory and spilled); the counters stay for the run's statistics."""
        self._entries.clear()
        self.resident_bytes = self.side_bytes = 0
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
