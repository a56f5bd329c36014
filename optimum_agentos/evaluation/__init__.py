"""Evaluation: offline-capable text datasets, calibration windows and GPTQ-protocol perplexity."""

from .data import (
    DATASETS,
    DatasetUnavailableError,
    calibration_windows,
    data_dir,
    load_text,
    load_text_rows,
    tokenize_text,
    windows_from_ids,
    windows_from_text,
)
from .perplexity import perplexity, perplexity_from_ids


__all__ = [
    "DATASETS",
    "DatasetUnavailableError",
    "calibration_windows",
    "data_dir",
    "load_text",
    "load_text_rows",
    "perplexity",
    "perplexity_from_ids",
    "tokenize_text",
    "windows_from_ids",
    "windows_from_text",
]
