"""Calibration on an accelerator for a model held in CPU memory: each block moves to the device for its calibration
and compression and back to the CPU after, so the device needs room for one block and the activations only."""

from __future__ import annotations

import torch
from torch import nn


def _move(model: nn.Module, names: list[str], device) -> None:
    """Move these parameters/buffers in place (`.data`), so tied parameters stay one object."""
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(model.named_buffers(remove_duplicate=False))
    for name in names:
        tensors[name].data = tensors[name].data.to(device)


class DeviceBlocks:
    """The `stream` of `calibration.runner.run_blockwise` for an in-memory model and an accelerator: the parts
    outside the blocks go to the device while the first block's inputs are captured, then each block in turn."""

    def __init__(self, model: nn.Module, blocks_name: str, device):
        self.model = model
        self.device = torch.device(device)
        prefix = f"{blocks_name}."
        every = [n for n, _ in model.named_parameters(remove_duplicate=False)]
        every += [n for n, _ in model.named_buffers(remove_duplicate=False)]
        self.rest = [n for n in every if not n.startswith(prefix)]
        self._rest_on_device = False

    def buffer(self, calibration_ids=None) -> list:
        _move(self.model, self.rest, self.device)
        self._rest_on_device = True
        return []

    def load_block(self, name: str) -> None:
        if self._rest_on_device:
            _move(self.model, self.rest, "cpu")
            self._rest_on_device = False
        self.model.get_submodule(name).to(self.device)

    def done_block(self, name: str) -> None:
        self.model.get_submodule(name).to("cpu")
