"""Evaluation: standard tasks on in-memory models (perplexity, lm-eval zero-shot, GLUE, STS-B), baseline-vs-compressed
reports, and the offline-capable datasets and calibration windows behind them."""

from ..data import (
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
from .report import CompressionReport, compare
from .tasks import TASKS, evaluate_model


__all__ = [
    "DATASETS",
    "TASKS",
    "CompressionReport",
    "compare",
    "evaluate_model",
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
