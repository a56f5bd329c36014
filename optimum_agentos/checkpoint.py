"""Moved: checkpoint folder I/O lives in `optimum_agentos.formats` (`formats.folder`, `formats.checks`)."""

from .formats.checks import CorruptCheckpointError, check_safetensors  # noqa: F401
from .formats.folder import atomic_directory, folder_size, save_model_folder  # noqa: F401
