"""`export()`: load a checkpoint, hand it to a format writer inside an atomic output folder, write the card.

Writers are looked up lazily in `WRITERS` (`"module:function"`), so `import optimum_agentos.export` pulls in no
backend (`gguf`, `onnx`, `compressed_tensors`). A writer has the signature
`write_<fmt>(model, tokenizer, out_dir: Path, *, requantize: bool) -> dict`: it writes its files into `out_dir` (a
temporary folder that replaces `output_dir` only once everything succeeded) and returns a JSON-able summary
(tensor types, the error added when re-quantizing) that goes into the card and the return value.
"""

from __future__ import annotations

import importlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

from transformers.utils import logging

from ..formats.folder import atomic_directory, check_save_dir, folder_size
from .card import write_export_card
from .layers import ExportError, agentos_config

logger = logging.get_logger(__name__)

WRITERS = {
    "gguf": "optimum_agentos.export.gguf:write_gguf",
    "onnx": "optimum_agentos.export.onnx:write_onnx",
    "compressed-tensors": "optimum_agentos.export.compressed_tensors:write_compressed_tensors",
}
# What a missing writer needs (its module imports the backend at the top).
EXTRAS = {"gguf": "gguf", "onnx": "onnx, onnxruntime", "compressed-tensors": "compressed-tensors"}


def find_writer(fmt: str) -> Callable:
    """The writer of `fmt`; `ExportError` naming the formats when it is unknown or its exporter is not installed."""
    if fmt not in WRITERS:
        raise ExportError(f"Unknown export format {fmt!r}; supported: {', '.join(WRITERS)}.")
    module_name, function = WRITERS[fmt].split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        missing = getattr(err, "name", None) or str(err)
        raise ExportError(f"The {fmt} exporter is not available in this installation ({missing} could not be "
                          f"imported; it needs: {EXTRAS[fmt]}). Available formats: {', '.join(WRITERS)}.") from err
    return getattr(module, function)


def load_for_export(model_or_folder, tokenizer=None):
    """`(model, tokenizer, source)` from a folder, alias or Hub id (any checkpoint this library writes, or a float
    model), or from a model object as given. The model keeps its saved dtype (a bf16 model stays bf16)."""
    if not isinstance(model_or_folder, (str, os.PathLike)):
        return model_or_folder, tokenizer, getattr(model_or_folder, "name_or_path", None)
    from ..compressor import load_pretrained
    from ..models import check_model_source

    check_model_source(model_or_folder)
    model, loaded, _ = load_pretrained(str(model_or_folder), dtype="auto")
    return model.eval(), tokenizer or loaded, str(model_or_folder)


def lineage(model, source) -> str | None:
    """The Hub id the exported model descends from: the base model recorded in the source checkpoint's card, else
    the source itself when it is an alias or a Hub id (a local path never lands in a card)."""
    from ..hub.card import CARD_INFO
    from ..models import hub_id_of

    if source and Path(str(source), CARD_INFO).is_file():
        info = json.loads(Path(str(source), CARD_INFO).read_text())
        base = info.get("base_model") or info.get("teacher")
        if base:
            return hub_id_of(base)
    return hub_id_of(source) or hub_id_of(getattr(model, "name_or_path", None))


def export(model_or_folder, format: str, output_dir: str | os.PathLike, *, requantize: bool = False,
           overwrite: bool = False, tokenizer=None, base_model: str | None = None) -> dict:
    """Export a compressed (or float) model to a runtime format, exactly when the format can hold its codes.

    Args:
        model_or_folder (`str`, `os.PathLike` or `PreTrainedModel`): a checkpoint folder this library wrote
            (quantized, pruned, distilled), a float model folder, alias or Hub id, or a loaded model.
        format (`str`): `"gguf"` (llama.cpp), `"onnx"` (ONNX Runtime) or `"compressed-tensors"` (transformers, vLLM).
        output_dir (`str` or `os.PathLike`): the folder to write; replaced atomically, and only when it is empty or
            a folder this library wrote (nothing is written when the export fails).
        requantize (`bool`, *optional*, defaults to `False`): re-encode layers the format cannot hold exactly, and
            report the error added, instead of stopping with an `ExportError`.
        overwrite (`bool`, *optional*, defaults to `False`): replace an existing export in `output_dir`.
        tokenizer (*optional*): the tokenizer, when `model_or_folder` is a model object.
        base_model (`str`, *optional*): Hub id recorded as `base_model` in the card (found from the source if unset).

    Returns:
        `dict`: the writer's summary plus `format`, `output_dir`, `files` (name -> bytes) and `seconds`.

    Example:
    ```python
    >>> from optimum_agentos.export import export
    >>> export("smollm2-int4", "gguf", "smollm2-int4-gguf")
    ```
    """
    start = time.perf_counter()
    writer = find_writer(format)  # before any loading: an unknown or missing exporter is named at once
    check_save_dir(output_dir, overwrite)
    model, tokenizer, source = load_for_export(model_or_folder, tokenizer)
    config = agentos_config(model)
    with atomic_directory(output_dir, overwrite=overwrite) as tmp:
        summary = writer(model, tokenizer, Path(tmp), requantize=requantize)
        info = {"format": format, "base_model": base_model or lineage(model, source),
                "source_config": config.to_dict() if config is not None else None, "requantize": requantize,
                "summary": summary}
        write_export_card(Path(tmp), info)
    files = {p.name: p.stat().st_size for p in sorted(Path(output_dir).iterdir()) if p.is_file()}
    logger.info(f"Exported {format} to {output_dir} ({folder_size(output_dir, '*') / 1e6:.1f} MB)")
    return {"format": format, "output_dir": str(output_dir), **summary, "files": files,
            "seconds": round(time.perf_counter() - start, 1)}
