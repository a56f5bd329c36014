"""Library version and the version of the on-disk `agentos` checkpoint format."""

__version__ = "0.1.0"

# Bump when the tensors or `quantization_config` keys of a saved checkpoint change meaning.
# 2: pruned checkpoints (sparse_layers bitmask format, module_shapes).
# 3: int8 token embeddings / output head (embedding_bits).
# 4: `smoothquant_alpha` (provenance of a W8A8 checkpoint smoothed before quantization; tensors unchanged).
# 5: `layer_overrides` (per-layer bits and group size: mixed precision); methods "awq" and "autoround",
#    `awq`, `rounding_steps`, `rounding_lr` (provenance only; tensors unchanged).
FORMAT_VERSION = 5
