"""Model cards for compressed checkpoints, rendered from `model_cards/` through `huggingface_hub.ModelCard`."""

from __future__ import annotations

import json
import re
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData, EvalResult


TEMPLATES = Path(__file__).resolve().parents[2] / "model_cards"


def hub_base_model(source: str | None) -> str | None:
    """The Hub id of the base model, or None for a local path (a local path never lands in a card)."""
    from ..models import hub_id_of

    return hub_id_of(source)


def results_markdown(results: list[dict]) -> str:
    """A baseline-vs-compressed markdown table from rows `{task, metric, baseline, compressed}`."""
    lines = ["| task | metric | baseline | compressed | compressed / baseline |", "|---|---|---:|---:|---:|"]
    for r in results:
        ratio = r["compressed"] / r["baseline"] if r.get("baseline") else float("nan")
        base = f"{r['baseline']:.2f}" if r.get("baseline") is not None else "-"
        lines.append(f"| {r['task']} | {r['metric']} | {base} | {r['compressed']:.2f} | {ratio:.3f} |")
    return "\n".join(lines)


def build_card(info: dict) -> ModelCard:
    """Render a card from `info`: base_model, config (dict), results (rows), sizes, command, datasets."""
    config = info.get("config", {})
    base = hub_base_model(info.get("base_model"))
    results = info.get("results", [])
    method = config.get("method", "rtn")
    eval_results = [
        EvalResult(
            task_type="text-generation", dataset_type=r.get("dataset_type", r["task"]), dataset_name=r["task"],
            metric_type=r["metric"], metric_value=round(float(r["compressed"]), 4),
            dataset_split=r.get("split"),
        )
        for r in results
    ]
    card_data = ModelCardData(
        library_name="transformers",
        base_model=base,
        base_model_relation="quantized" if base else None,
        tags=["optimum-agentos", "agentos", f"int{config.get('bits', 4)}", method],
        datasets=info.get("datasets"),
        model_name=info.get("name", "agentos-model"),
        eval_results=eval_results or None,
    )
    sizes = info.get("sizes", {})
    size_line = "Size on disk was not measured."
    if sizes.get("compressed"):
        size_line = f"Safetensors on disk: {sizes['compressed'] / 1e6:.1f} MB"
        if sizes.get("baseline"):
            size_line += f" ({sizes['compressed'] / sizes['baseline']:.3f}x the {sizes['baseline'] / 1e6:.1f} MB baseline)"
        size_line += "."
    bits, gs = config.get("bits", 4), config.get("group_size", 128)
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATES / "agentos_quantized.md"),
        title=f"{base or 'Model'} - agentos int{bits} ({method.upper()})",
        summary=(
            f"Weight-only int{bits} quantization (group size {gs}, {'symmetric' if config.get('sym') else 'asymmetric'}) "
            f"of {base or 'a local model'}, made with optimum-agentos."
        ),
        repo_hint=info.get("repo_id") or "path/to/this/folder",
        method_description=info.get("method_description")
        or ("GPTQ (Frantar et al. 2022) calibrated on WikiText-2 validation." if method == "gptq" else "Round to nearest."),
        command=scrub(info.get("command", "")),
        config_json=json.dumps(config, indent=2, sort_keys=True),
        results_table=results_markdown(results) if results else "",
        size_line=size_line,
    )


def scrub(text: str) -> str:
    """Remove anything that looks like a Hub token, and absolute local paths, from text bound for a card."""
    text = re.sub(r"hf_[A-Za-z0-9]{8,}", "<token>", text or "")
    return re.sub(r"(?<![\w.])/(?:[\w.-]+/)+([\w.-]+)", r"\1", text)


def write_card(folder, info: dict) -> Path:
    """Write `README.md` into a checkpoint folder."""
    path = Path(folder) / "README.md"
    build_card(info).save(path)
    return path
