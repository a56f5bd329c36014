"""Keep peak memory near one copy of the model while quantizing a checkpoint loaded from safetensors.

transformers maps the safetensors file into memory; its pages stay resident while any tensor views them, so a
quantizer that replaces layers would hold the whole float file plus the new tensors. `own_memory` copies each
tensor out of the mapping and tells the kernel to drop the pages it just copied (they are clean, read-only file
pages: nothing is lost, and a later read would simply fault them in from the file again).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import mmap
import sys

import torch
from torch import nn


_MADV_DONTNEED = 4


@functools.cache
def _libc():
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def release_free_memory() -> None:
    """Hand the memory glibc keeps after freeing big temporaries back to the system (`malloc_trim`); elsewhere a
    no-op."""
    if not sys.platform.startswith("linux"):
        return
    try:
        _libc().malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        pass


def _safetensors_mappings() -> list[tuple[int, int]]:
    """Address ranges of this process's mappings of `*.safetensors` files (Linux only, else empty)."""
    if not sys.platform.startswith("linux"):
        return []
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            parts = line.split()
            if len(parts) >= 6 and parts[-1].endswith(".safetensors"):
                start, end = (int(x, 16) for x in parts[0].split("-"))
                ranges.append((start, end))
    return ranges


def _drop_file_pages(tensor: torch.Tensor, ranges: list[tuple[int, int]], libc) -> None:
    page = mmap.PAGESIZE
    ptr, size = tensor.data_ptr(), tensor.untyped_storage().nbytes()
    lo, hi = -(-ptr // page) * page, (ptr + size) // page * page  # whole pages inside the tensor only
    if hi > lo and any(start <= lo and hi <= end for start, end in ranges):
        libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_DONTNEED)


def release_file_pages(tensor: torch.Tensor) -> None:
    """Drop the resident pages of a safetensors file that `tensor` views (after its last use: a later read would
    fault them in again); a no-op for tensors in their own memory."""
    ranges = _safetensors_mappings()
    if ranges and tensor.device.type == "cpu":
        _drop_file_pages(tensor, ranges, _libc())


def keep_only_kernel_copy(layer) -> None:
    """Empty a `QuantLinear`'s stored codes once its kernel's layout holds an exact copy (the layer then reads
    its codes back from the kernel), dropping the checkpoint file pages they were read from."""
    stored, layer.weight.data = layer.weight.data, torch.empty(0, dtype=torch.uint8)
    release_file_pages(stored)
    layer.weight_in_kernel = True


@torch.no_grad()
def own_memory(model: nn.Module) -> None:
    """Give every CPU parameter and buffer its own memory, releasing the file pages it was a view of.

    On Linux only the tensors inside a mapped safetensors file are copied (elsewhere the mappings are unknown and
    every tensor is); once none is left, the file's mapping, with the pages read while loading, goes away."""
    ranges = _safetensors_mappings()
    linux = sys.platform.startswith("linux")
    libc = _libc() if ranges else None
    for module in model.modules():
        for tensor in list(module._parameters.values()) + list(module._buffers.values()):
            if tensor is None or tensor.device.type != "cpu":
                continue
            if linux and not any(start <= tensor.data_ptr() < end for start, end in ranges):
                continue
            old = tensor.data
            tensor.data = old.clone()
            if ranges:
                _drop_file_pages(old, ranges, libc)
