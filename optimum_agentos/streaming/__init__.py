"""Streamed compression of checkpoints larger than memory: the float checkpoint is read block by block from its
safetensors shards, each block is calibrated and compressed on its own and written to the output shards at once.

`reader` reads tensors lazily, `skeleton` builds the model without weights and loads one block at a time, `buffer`
holds the calibration activations within a memory budget (spilling to disk), `writer` writes the output shards,
`pipeline` runs a compressor's block step over the whole checkpoint into an atomically saved folder.

Peak memory of streamed GPTQ (float32 compute; H hidden, I intermediate, V vocabulary, P parameters per block, U
distinct calibration tokens, B the resident activations, at most the buffer budget, b windows of t tokens per batch,
a heads) is the interpreter's base plus the largest of: capture = 4·U·H + B (only the calibration tokens' embedding
rows are read); block = 4·P + 4·(3·H² + I²) (the block's float weights and its Hessians, one per distinct input) + B
+ max(4·b·t·(4·I + 8·H) + 4·b·a·t², 5·H·I) (one batch's activations, or the widest layer's solve: each Hessian is
inverted in its own storage) + P·(0.5 + 3/128) (the block's int4 output, written before the next block); rest =
2·V·H + 32 MiB (one embedding or head matrix at a time, cast in chunks). `benchmarks/streaming.py` checks it."""

from .buffer import ActivationBuffer
from .reader import CheckpointReader
from .writer import ShardWriter


__all__ = ["ActivationBuffer", "CheckpointReader", "ShardWriter"]
