"""The `agentos` checkpoint format: saving folders safely (`folder`), checking files (`checks`), module replacement
from a config (`replace`, `shapes`), what is saved (`kept_weights`) and marking a model compressed (`mark`)."""

from .checks import CorruptCheckpointError, check_safetensors
from .folder import UnsafeOverwriteError, atomic_directory, folder_size, save_model_folder


__all__ = ["CorruptCheckpointError", "UnsafeOverwriteError", "atomic_directory", "check_safetensors", "folder_size",
           "save_model_folder"]
