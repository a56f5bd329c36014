"""Streamed compression of checkpoints larger than memory: the float checkpoint is read block by block from its
safetensors shards, each block is calibrated and compressed on its own and written to the output shards at once.

`reader` reads tensors lazily, `skeleton` builds the model without weights and loads one block at a time, `buffer`
holds the calibration activations within a memory budget (spilling to disk), `writer` writes the output shards,
`pipeline` runs a compressor's block step over the whole checkpoint into an atomically saved folder."""

from .buffer import ActivationBuffer
from .reader import CheckpointReader
from .writer import ShardWriter


__all__ = ["ActivationBuffer", "CheckpointReader", "ShardWriter"]
