"""Library version and the version of the on-disk `agentos` checkpoint format."""

__version__ = "0.1.0"

# Bump when the tensors or `quantization_config` keys of a saved checkpoint change meaning.
FORMAT_VERSION = 1
