"""Calibration data as token windows `[num_samples, seq_len]`, from a dataset name, a list of texts or ready ids."""

from __future__ import annotations

import torch

from ..data import calibration_windows, windows_from_text


def calibration_ids(tokenizer, calibration_dataset, num_samples: int, seq_len: int, owner: str = "the compressor"):
    """Token windows for calibration: a standard dataset name (`"wikitext2"`), a list of texts, or a tensor of ids."""
    if isinstance(calibration_dataset, torch.Tensor):
        return calibration_dataset.long().reshape(-1, calibration_dataset.shape[-1])
    if tokenizer is None:
        raise ValueError(f"Calibration from text needs a tokenizer: pass tokenizer= to {owner}.")
    if isinstance(calibration_dataset, str):
        return calibration_windows(tokenizer, calibration_dataset, "validation", num_samples, seq_len)
    return windows_from_text(tokenizer, "\n\n".join(calibration_dataset), num_samples, seq_len)


def check_calibration_size(ids, model, names: list[str], what: str) -> None:
    """Refuse calibration data with fewer tokens than the widest target layer has inputs: the input statistic
    (a Hessian `X Xᵀ` or per-input norms) of such a layer would be rank-deficient and its result unreliable."""
    from ..nn.linear import linear_shape

    if not names:
        return
    modules = dict(model.named_modules())
    widest = max(linear_shape(modules[n])[0] for n in names)
    tokens = 0 if ids is None else ids.numel()
    if tokens < widest:
        raise ValueError(
            f"The calibration set has {tokens} tokens; {what} needs at least {widest} (the widest target layer's "
            "inputs) for a usable input statistic. Pass more samples (num_samples) or longer windows (seq_len)."
        )
