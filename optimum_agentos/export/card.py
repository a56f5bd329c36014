"""The card of an exported folder: `README.md` with Hub metadata (format tags, `base_model` lineage) and the
inputs it was rendered from in `agentos_export.json`."""

from __future__ import annotations

import json
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

EXPORT_INFO = "agentos_export.json"
LIBRARY = {"gguf": "gguf", "onnx": "onnx", "compressed-tensors": "transformers"}
RUNS_WITH = {
    "gguf": "llama.cpp and the tools built on it (`llama-cli -m <file>.gguf`), or transformers "
            "(`from_pretrained(folder, gguf_file=...)`).",
    "onnx": "ONNX Runtime (CPU), with the `MatMulNBits` contrib operator for the quantized layers.",
    "compressed-tensors": "transformers (`AutoModelForCausalLM.from_pretrained(folder)`, with the "
                          "`compressed-tensors` package installed) and vLLM.",
}


def render_card(info: dict) -> ModelCard:
    fmt = info["format"]
    base = info.get("base_model")
    config = info.get("source_config") or {}
    data = ModelCardData(library_name=LIBRARY.get(fmt), base_model=base,
                         base_model_relation="quantized" if base and config.get("bits") else None,
                         tags=["optimum-agentos", "agentos", fmt] + ([f"int{config['bits']}"] if config.get("bits")
                                                                     else []))
    summary = info.get("summary") or {}
    how = ("re-quantized where the format could not hold the codes (added error in the summary below)"
           if info.get("requantize") else "written from the checkpoint's own integer codes, not re-quantized")
    lines = [
        f"# {base or 'Model'} - agentos export ({fmt})", "",
        f"Exported with optimum-agentos from {'`' + base + '`' if base else 'a local model'}; {how}.", "",
        f"Runs with {RUNS_WITH.get(fmt, fmt)}", "",
        "## Source compression config", "", "```json", json.dumps(config, indent=2, sort_keys=True), "```", "",
        "## Export summary", "", "```json", json.dumps(summary, indent=2, sort_keys=True, default=str), "```",
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")


def write_export_card(folder: Path, info: dict) -> Path:
    """Write `README.md` and `agentos_export.json` into an export folder being saved."""
    (folder / EXPORT_INFO).write_text(json.dumps(info, indent=2, default=str) + "\n")
    path = folder / "README.md"
    render_card(info).save(path)
    return path
