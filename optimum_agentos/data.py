"""Text datasets for calibration and perplexity: Hub rows, or the same rows rebuilt from local copies offline.

The offline copies live in `data_dir()` (the `shared/data` folder beside the repository, or
`$OPTIMUM_AGENTOS_DATA_DIR`) and hold the original dataset files, so the rows built from them equal the Hub's rows
and every perplexity number is comparable whichever source was used.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from transformers.utils import logging


logger = logging.get_logger(__name__)

DATA_DIR_ENV = "OPTIMUM_AGENTOS_DATA_DIR"
_OFFLINE_ENVS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
_TRUE = {"1", "true", "yes", "on"}


class DatasetUnavailableError(FileNotFoundError, ValueError):
    """Neither a local copy nor the Hub could provide a dataset split (offline, or the Hub failed)."""


def _wikitext_row(line: str) -> str:
    # The Hub builder for `wikitext` yields each line of the raw file as read (trailing "\n" kept) and turns
    # whitespace-only lines (" \n" in the raw files) into "".
    return line if line.strip() else ""


def _ptb_row(line: str) -> str:
    # The Hub builder for `ptb_text_only` yields each line stripped of surrounding whitespace.
    return line.strip()


@dataclass(frozen=True)
class TextDataset:
    """Where a text dataset lives on the Hub and offline, and how its rows are built and joined.

    Args:
        hub_path (`str`): Hub dataset repository, e.g. `"wikitext"`.
        hub_name (`str`): configuration name, e.g. `"wikitext-2-raw-v1"`.
        column (`str`): the column holding the text.
        files (`dict[str, str]`): split name -> file path relative to `data_dir()`.
        to_row (`Callable[[str], str]`): turns one line of the local file into the Hub's row.
        joiner (`str`): separator between rows in `load_text`, as the GPTQ evaluation code uses for this dataset.
    """

    hub_path: str
    hub_name: str
    column: str
    files: dict
    to_row: Callable[[str], str]
    joiner: str = "\n\n"


DATASETS: dict[str, TextDataset] = {
    "wikitext2": TextDataset(
        "wikitext",
        "wikitext-2-raw-v1",
        "text",
        {
            "test": "wikitext-2-raw/wiki.test.raw",
            "validation": "wikitext-2-raw/wiki.valid.raw",
            "train": "wikitext-2-raw/wiki.train.raw",
        },
        _wikitext_row,
    ),
    # GPTQ joins PTB sentences with a space (they carry no newlines of their own).
    "ptb": TextDataset(
        "ptb_text_only",
        "penn_treebank",
        "sentence",
        {"test": "ptb/ptb.test.txt", "validation": "ptb/ptb.valid.txt", "train": "ptb/ptb.train.txt"},
        _ptb_row,
        joiner=" ",
    ),
}


def data_dir() -> Path | None:
    """The folder holding offline dataset copies: `$OPTIMUM_AGENTOS_DATA_DIR`, else `../shared/data` next to the
    repository root when it exists, else None."""
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env).expanduser()
    beside_repo = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data").resolve()
    return beside_repo if beside_repo.is_dir() else None


def is_offline() -> bool:
    """Whether `HF_HUB_OFFLINE` or `HF_DATASETS_OFFLINE` asks for no network (read at call time, not import time)."""
    return any(os.environ.get(name, "").strip().lower() in _TRUE for name in _OFFLINE_ENVS)


def _spec(name: str) -> TextDataset:
    if name not in DATASETS:
        raise ValueError(f"Unknown dataset {name!r}; known datasets: {', '.join(sorted(DATASETS))}.")
    return DATASETS[name]


def _read_local(path: Path, to_row: Callable[[str], str]) -> list[str]:
    # Iterating a text file splits on "\n" only (after universal-newline translation), exactly as the Hub builders
    # read these files; `str.splitlines` would also split on rare Unicode separators and change the rows.
    with open(path, encoding="utf-8") as f:
        return [to_row(line) for line in f]


def load_text_rows(name: str, split: str) -> list[str]:
    """The rows of a dataset split, as `datasets.load_dataset` returns them.

    A local copy in `data_dir()` is used when present; otherwise the Hub, unless `HF_HUB_OFFLINE` or
    `HF_DATASETS_OFFLINE` is set (then only local copies are read).

    For `wikitext2` the rows are the raw file's lines with their trailing `"\\n"` kept and whitespace-only lines as
    `""`, the rule of the Hub's `wikitext-2-raw-v1` builder (e.g. row 1 of test is `" = Robert Boulter = \\n"`), so
    `"\\n\\n".join(rows)` is byte-identical whichever source was read.

    Args:
        name (`str`): a key of `DATASETS`, e.g. `"wikitext2"`.
        split (`str`): `"test"`, `"validation"` or `"train"`.

    Raises:
        `ValueError`: unknown dataset or split.
        `DatasetUnavailableError`: no local copy and the Hub is off or failed.
    """
    spec = _spec(name)
    if split not in spec.files:
        raise ValueError(f"Unknown split {split!r} for {name!r}; known splits: {', '.join(spec.files)}.")
    folder = data_dir()
    local = folder / spec.files[split] if folder is not None else None
    if local is not None and local.is_file():
        logger.info(f"Reading {name} {split} from {local}")
        return _read_local(local, spec.to_row)

    where = f"{local}" if local is not None else f"{spec.files[split]} (no data folder found)"
    hint = (
        f"Dataset {name!r} split {split!r} is unavailable: the local file {where} does not exist "
        f"(folder searched: {folder}; set {DATA_DIR_ENV} to the folder holding {spec.files[split]})"
    )
    if is_offline():
        raise DatasetUnavailableError(f"{hint}, and the Hub is disabled by {'/'.join(_OFFLINE_ENVS)}.")
    try:
        import datasets

        rows = datasets.load_dataset(spec.hub_path, spec.hub_name, split=split)[spec.column]
    except Exception as exc:  # network, missing dataset, removed loading script: all mean "not available"
        raise DatasetUnavailableError(
            f"{hint}, and loading {spec.hub_path}/{spec.hub_name} from the Hub failed: {type(exc).__name__}: {exc}"
        ) from exc
    return list(rows)


def load_text(name: str, split: str) -> str:
    """A dataset split as one string: its rows joined as the GPTQ evaluation code does (`"\\n\\n"` for wikitext2,
    `" "` for ptb)."""
    return _spec(name).joiner.join(load_text_rows(name, split))


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """Token ids `[N]` of `text`, tokenized once without special tokens (no BOS/EOS)."""
    # verbose=False: a whole split is far longer than model_max_length on purpose; windows come later.
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    return torch.as_tensor(ids, dtype=torch.long).reshape(-1)


def windows_from_ids(ids: torch.Tensor, num_windows: int | None, seq_len: int) -> torch.Tensor:
    """The first `num_windows` non-overlapping consecutive windows `[num_windows, seq_len]` of a 1-D id sequence.

    Args:
        ids (`torch.Tensor`): `[N]` or `[1, N]` token ids.
        num_windows (`int`, *optional*): how many windows; `None` takes every full window.
        seq_len (`int`): tokens per window.

    Raises:
        `ValueError`: the ids hold fewer than `num_windows` full windows (the message says how many there are).
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}.")
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1:
        raise ValueError(f"Expected token ids of shape [N] or [1, N], got {tuple(ids.shape)}.")
    available = ids.numel() // seq_len
    if num_windows is None:
        num_windows = available
    if num_windows < 1 or num_windows > available:
        raise ValueError(
            f"Asked for {num_windows} windows of {seq_len} tokens but the text has {ids.numel()} tokens, i.e. "
            f"{available} full windows; ask for at most {available} windows or shorter windows."
        )
    return ids[: num_windows * seq_len].reshape(num_windows, seq_len).long()


def windows_from_text(tokenizer, text: str, num_samples: int, seq_len: int) -> torch.Tensor:
    """`[num_samples, seq_len]` consecutive non-overlapping token windows from the start of `text`."""
    return windows_from_ids(tokenize_prefix(tokenizer, text, num_samples * seq_len), num_samples, seq_len)


def tokenize_prefix(tokenizer, text: str, needed: int, margin: int = 256) -> torch.Tensor:
    """Token ids of a prefix of `text` whose first `needed` ids are those `tokenize_text(tokenizer, text)` starts
    with. Calibration needs a few windows of a split, and tokenizing the whole split costs ~200 MiB of peak memory
    (the tokenizer's per-token records), more than a streamed block. The text is cut at a line break (else a space)
    after a guessed length; a prefix counts only when it gives `margin` ids beyond `needed`, so the cut cannot have
    changed them (tokenizers merge within a word, never across hundreds of tokens); else the guess doubles, and the
    whole text is the last resort."""
    chars = max(8 * (needed + margin), 4096)
    while chars < len(text):
        cut = text.find("\n", chars)
        cut = text.find(" ", chars) if cut < 0 else cut
        if cut < 0:
            break
        ids = tokenize_text(tokenizer, text[:cut])
        if ids.numel() >= needed + margin:
            return ids
        chars = 2 * cut
    return tokenize_text(tokenizer, text)


def calibration_windows(
    tokenizer,
    name: str = "wikitext2",
    split: str = "validation",
    num_samples: int = 64,
    seq_len: int = 512,
    seed: int = 0,
) -> torch.Tensor:
    """Calibration token windows `[num_samples, seq_len]` (`torch.long`) from a dataset split.

    The split's text (see `load_text`) is tokenized once without special tokens and cut into consecutive
    non-overlapping windows from its start. Unlike the random crops of the GPTQ reference code this is
    deterministic whatever the RNG state, so two runs calibrate on identical data; `seed` is accepted for API
    symmetry and unused. Calibrate on `validation` and evaluate on `test` so the two never share text.

    Args:
        tokenizer: the model's tokenizer.
        name (`str`, *optional*, defaults to `"wikitext2"`): dataset name (see `DATASETS`).
        split (`str`, *optional*, defaults to `"validation"`): dataset split.
        num_samples (`int`, *optional*, defaults to `64`): number of windows.
        seq_len (`int`, *optional*, defaults to `512`): tokens per window.
        seed (`int`, *optional*, defaults to `0`): unused (windows are consecutive).
    """
    return windows_from_text(tokenizer, load_text(name, split), num_samples, seq_len)
