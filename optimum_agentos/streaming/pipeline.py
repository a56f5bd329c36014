"""Streamed compression into a checkpoint folder: blocks are loaded, compressed, written and freed one at a time;
then the parts outside the blocks (embeddings, final norm, head). The folder is written through
`formats.folder.atomic_directory`, so a run that fails or is killed leaves no output folder (and an existing one
untouched)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

import torch
from transformers.utils import logging

from ..formats.folder import atomic_directory
from ..formats.kept_weights import kept_float_weights, state_dict_for_save
from ..nn.linear import SCALE_DTYPES
from ..nn.memory import release_free_memory
from .buffer import ActivationBuffer
from .skeleton import StreamedModel
from .writer import ShardWriter


logger = logging.get_logger(__name__)


class BlockStream:
    """What the block-by-block runner calls around each block when the model is streamed (`run_blockwise(...,
    stream=...)`): `buffer()` to capture the first block's inputs into, `load_block(name)` before a block runs and
    `done_block(name)` once its outputs are computed (it writes the block's tensors and frees it)."""

    def __init__(self, streamed: StreamedModel, writer: ShardWriter, buffer: ActivationBuffer,
                 float_dtype: str | None, blocks_name: str):
        self.streamed = streamed
        self.writer = writer
        self._buffer = buffer
        self.float_dtype = float_dtype
        self.blocks_name = blocks_name
        self.rest_loaded = False
        self.block_stats: list[dict] = []
        self.rss_after_capture = 0

    def buffer(self, calibration_ids=None) -> ActivationBuffer:
        """Load what computes the first block's inputs (not the head) and return the store for them. Given the
        `calibration_ids`, the input embedding gets only their rows (see `StreamedModel.load_rows`)."""
        embedding = self._input_embedding() if calibration_ids is not None else None
        self.load_rest(with_head=False, skip=(embedding,) if embedding else ())
        if embedding:
            self.streamed.load_rows(embedding, calibration_ids)
        return self._buffer

    def load_rest(self, with_head: bool = True, skip: tuple[str, ...] = ()) -> None:
        if not self.rest_loaded:
            exclude = (f"{self.blocks_name}.",) + (() if with_head else self._untied_head())
            self.streamed.load([n for n in self.streamed.tensor_names(exclude=exclude) if n not in skip])
            self.rest_loaded = True

    def _input_embedding(self) -> str | None:
        """The checkpoint name of the input embedding matrix, when it is a plain `nn.Embedding` stored there."""
        model = self.streamed.model
        embedding = model.get_input_embeddings()
        if type(embedding) is not torch.nn.Embedding:  # a subclass may read more than the looked-up rows
            return None
        name = next((f"{n}.weight" for n, m in model.named_modules() if m is embedding), None)
        return name if name in self.streamed.reader.weight_map else None

    def _untied_head(self) -> tuple[str, ...]:
        model = self.streamed.model
        head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
        if head is None or getattr(head, "weight", None) is getattr(embedding, "weight", None):
            return ()
        name = next(n for n, m in model.named_modules() if m is head)
        return (f"{name}.",)

    def free_rest(self) -> None:
        if self.rest_loaded:
            self.streamed.free(exclude=(f"{self.blocks_name}.",))
            self.rest_loaded = False
            release_free_memory()

    def load_block(self, name: str) -> None:
        if self.rest_loaded:
            self.rss_after_capture = current_rss_bytes()
        self.free_rest()
        self._start = time.perf_counter()
        self.streamed.load(self.streamed.tensor_names(name))

    def done_block(self, name: str) -> None:
        block = self.streamed.model.get_submodule(name)
        state = state_dict_for_save(block, self.float_dtype)
        self.writer.add({f"{name}.{key}": tensor for key, tensor in state.items()})
        del state
        self.writer.flush()  # the block's output goes to disk now: memory holds one block's output at most
        self.streamed.free(name)
        release_free_memory()
        self.block_stats.append({"block": name, "seconds": time.perf_counter() - self._start,
                                 "rss_bytes": current_rss_bytes()})


def current_rss_bytes() -> int:
    """This process's resident memory now (Linux `/proc/self/statm`; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def blocks_prefix(model, layer_names: list[str]) -> str:
    from ..calibration.runner import find_blocks

    return find_blocks(model, layer_names)[0]


def run_streamed(
    streamed: StreamedModel,
    save_dir,
    layer_names: list[str],
    compress_blocks: Callable[[BlockStream], None],
    compress_rest: Callable[[], None] | None,
    stored_config: Callable[[], object],
    float_dtype: str | None,
    tokenizer=None,
    overwrite: bool = True,
    extra: Callable[[Path], None] | None = None,
    max_shard_size: int | str = "200MB",
    buffer_memory: int | str | None = None,
    spill_dir=None,
) -> BlockStream:
    """Compress a streamed checkpoint into `save_dir`, atomically.

    `compress_blocks(stream)` runs the algorithm over the blocks (with `run_blockwise(..., stream=stream)` or by
    loading, compressing and finishing each block itself); `compress_rest()` then compresses what lies outside the
    blocks, loaded into the model; `stored_config()` is the stamped agentos config written into config.json;
    `float_dtype` the dtype the float weights it keeps are stored in (as `save_pretrained` of the in-memory model
    casts them); `extra(folder)` adds files (the model card). Returns the stream, with per-block statistics."""
    from .writer import parse_size

    blocks_name = blocks_prefix(streamed.model, layer_names)
    budget = parse_size(buffer_memory) if buffer_memory is not None else None
    with atomic_directory(save_dir, overwrite=overwrite) as tmp, ActivationBuffer(
        budget, spill_dir, streamed.device
    ) as buffer:
        writer = ShardWriter(tmp, max_shard_size)
        stream = BlockStream(streamed, writer, buffer, float_dtype, blocks_name)
        compress_blocks(stream)
        buffer.close()  # the last block's outputs are not needed for what lies outside the blocks
        writer.flush()  # the blocks' last shard leaves memory before the embeddings come in
        if compress_rest is None:  # nothing to compute outside the blocks: each tensor read, cast and written alone
            _write_rest_in_pieces(streamed, blocks_name, float_dtype, writer)
        else:
            stream.load_rest()
            compress_rest()
            rest = _rest_state(streamed, blocks_name, float_dtype)
            stream.free_rest()
            writer.add(rest)
            del rest
        writer.finish()
        _write_config(streamed, tmp, stored_config())
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if extra is not None:
            extra(tmp)
        stream.spilled_bytes = buffer.spilled_bytes
        stream.peak_buffer_bytes = buffer.peak_resident_bytes
    return stream


def _write_rest_in_pieces(streamed: StreamedModel, blocks_name: str, float_dtype: str | None,
                          writer: ShardWriter) -> None:
    """The tensors outside the blocks as `_rest_state` gives them, read (and cast to `float_dtype`, for the kept
    float weights, a few rows at a time) and written one by one."""
    model = streamed.model
    saved = set(model.state_dict())  # meta tensors: names only
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    kept_ids = {id(w) for w in kept_float_weights(model)}
    kept = {n for n, p in model.named_parameters(remove_duplicate=False) if id(p) in kept_ids}
    target = SCALE_DTYPES[float_dtype] if float_dtype is not None else None
    for name in streamed.tensor_names(exclude=(f"{blocks_name}.",)):
        if name not in saved or name in tied:
            continue
        if name in kept and target is not None and streamed.dtype.itemsize > target.itemsize:
            tensor = streamed.read_cast(name, target)
        else:
            tensor = streamed.reader.read([name])[name]
            tensor = tensor.to(streamed.dtype) if tensor.is_floating_point() else tensor
        writer.add({name: tensor})
        del tensor
        writer.flush()


def _rest_state(streamed: StreamedModel, blocks_name: str, float_dtype: str | None) -> dict:
    """The tensors outside the blocks as `save_pretrained` writes them (kept weights in `float_dtype`, tied copies
    once)."""
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    model = streamed.model
    state = state_dict_for_save(model, float_dtype)
    state = {k: v for k, v in state.items() if not k.startswith(f"{blocks_name}.")}
    return remove_tied_weights_from_state_dict(state, model)


def _write_config(streamed: StreamedModel, folder: Path, stored) -> None:
    """config.json (with the agentos quantization_config and the compute dtype, as `save_pretrained` of the
    in-memory model writes it) and generation_config.json when the source has one."""
    from transformers import GenerationConfig

    config = streamed.model.config
    config.quantization_config = stored
    config.dtype = str(streamed.dtype).split(".")[1]
    config.save_pretrained(folder)
    try:
        generation = GenerationConfig.from_pretrained(streamed.path)
    except OSError:
        generation = None
    if generation is None and streamed.model.can_generate():
        generation = streamed.model.generation_config
    if generation is not None and streamed.model.can_generate():
        generation.save_pretrained(folder)
