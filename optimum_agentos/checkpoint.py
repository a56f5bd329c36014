"""Checkpoint folder I/O: safe atomic writes and early checks of safetensors files."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Callable, Iterator


class CorruptCheckpointError(ValueError):
    """A safetensors file that is truncated or whose header cannot be parsed."""


def check_safetensors(path: str | os.PathLike) -> dict:
    """Validate a safetensors file's header and length without reading tensors; raise naming the file.

    Returns the header (`{tensor name: {"dtype", "shape", "data_offsets"}}`)."""
    path = Path(path)
    size = path.stat().st_size
    fix = "Re-download or re-save the checkpoint."
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CorruptCheckpointError(f"{path} is truncated ({size} bytes, no safetensors header). {fix}")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            raise CorruptCheckpointError(
                f"{path} is truncated or corrupt: its header claims {header_len} bytes but the file has {size}. {fix}"
            )
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CorruptCheckpointError(f"{path} has an unreadable safetensors header ({err}). {fix}") from err
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end != size:
        raise CorruptCheckpointError(
            f"{path} is truncated or corrupt: tensors need {8 + header_len + end} bytes, the file has {size}. {fix}"
        )
    header.pop("__metadata__", None)
    return header


@contextlib.contextmanager
def atomic_directory(save_dir: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary folder beside `save_dir`; on success it replaces `save_dir` in one rename.

    A failure inside the block removes the temporary folder and leaves any existing `save_dir` untouched.
    """
    save_dir = Path(save_dir).absolute()
    if save_dir.exists() and not overwrite and any(save_dir.iterdir()):
        raise FileExistsError(f"{save_dir} exists and is not empty; pass overwrite=True (CLI: --overwrite) to replace it.")
    save_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{save_dir.name}.tmp-", dir=save_dir.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    backup = None
    if save_dir.exists():
        backup = save_dir.with_name(f".{save_dir.name}.old-{os.getpid()}")
        os.replace(save_dir, backup)
    os.replace(tmp, save_dir)
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def folder_size(path: str | os.PathLike, pattern: str = "*.safetensors") -> int:
    """Total bytes of the files matching `pattern` in a folder."""
    return sum(p.stat().st_size for p in Path(path).glob(pattern))


def save_model_folder(
    model, tokenizer, save_dir, overwrite: bool = True, extra: Callable[[Path], None] | None = None
) -> Path:
    """`save_pretrained` model and tokenizer (and `extra(folder)`, e.g. a model card) atomically into `save_dir`."""
    with atomic_directory(save_dir, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if extra is not None:
            extra(tmp)
    return Path(save_dir)
