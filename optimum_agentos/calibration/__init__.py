"""Calibration machinery shared by every calibrated algorithm (GPTQ, SmoothQuant, Wanda, SparseGPT): the
block-by-block runner, per-input statistic accumulators and calibration token windows."""

from .data import calibration_ids
from .accumulators import AbsMaxAccumulator, HessianAccumulator, InputMeanSquare
from .runner import find_blocks, run_blockwise


__all__ = ["AbsMaxAccumulator", "HessianAccumulator", "InputMeanSquare", "calibration_ids", "find_blocks", "run_blockwise"]
