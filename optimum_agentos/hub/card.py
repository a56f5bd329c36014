"""Model cards for compressed checkpoints, rendered from `model_cards/` through `huggingface_hub.ModelCard`."""

from __future__ import annotations

import json
import re
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData, EvalResult

from ..formats.folder import record_written


TEMPLATES = Path(__file__).resolve().parents[1] / "model_cards"


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


def eval_results_of(results: list[dict], task_type: str) -> list[EvalResult]:
    """`model-index` entries: the compressed model's number on each task (the Hub shows them on the model page)."""
    return [
        EvalResult(
            task_type=task_type, dataset_type=r.get("dataset_type", r["task"]), dataset_name=r["task"],
            dataset_config=r.get("dataset_config"), metric_type=r["metric"],
            metric_value=round(float(r["compressed"]), 4), dataset_split=r.get("split"),
        )
        for r in results
    ]


def evaluation_section(info: dict) -> str:
    """The card's evaluation body: the baseline-vs-compressed table, the report's plot, where the numbers came from."""
    results = info.get("results") or []
    if not results:
        return "No evaluation was run for this checkpoint."
    lines = [results_markdown(results)]
    if info.get("baseline_label"):
        lines += ["", info["baseline_label"]]
    if info.get("eval_note"):
        lines += ["", info["eval_note"]]
    if info.get("plot"):
        lines += ["", f"![size against quality]({info['plot']})"]
    return "\n".join(lines)


def build_card(info: dict) -> ModelCard:
    """Render a card from `info`: base_model, config (dict), results (rows), sizes, command, datasets."""
    config = info.get("config", {})
    base = hub_base_model(info.get("base_model"))
    results = info.get("results", [])
    method = config.get("method", "rtn")
    eval_results = eval_results_of(results, "text-generation")
    card_data = ModelCardData(
        library_name="transformers",
        base_model=base,
        base_model_relation="quantized" if base else None,
        tags=["optimum-agentos", "agentos", f"int{config.get('bits', 4)}", method],
        datasets=info.get("datasets"),
        model_name=info.get("name", "agentos-model"),
        eval_results=eval_results or None,
    )
    pruning = info.get("pruning")
    if pruning:
        card_data.tags += ["pruned", "sparse"] + ([pruning["pattern"]] if pruning.get("pattern") else [])
        if config.get("bits") is None:
            card_data.tags.remove("int4") if "int4" in card_data.tags else None
            card_data.base_model_relation = None
    sizes = info.get("sizes", {})
    size_line = "Size on disk was not measured."
    if sizes.get("compressed"):
        size_line = f"Safetensors on disk: {sizes['compressed'] / 1e6:.1f} MB"
        if sizes.get("baseline"):
            size_line += f" ({sizes['compressed'] / sizes['baseline']:.3f}x the {sizes['baseline'] / 1e6:.1f} MB baseline)"
        size_line += "."
    bits, gs = config.get("bits", 4), config.get("group_size", 128)
    title = f"{base or 'Model'} - agentos int{bits} ({method.upper()})"
    summary = (
        f"Weight-only int{bits} quantization (group size {gs}, {'symmetric' if config.get('sym') else 'asymmetric'}) "
        f"of {base or 'a local model'}, made with optimum-agentos."
    )
    if pruning:
        title, summary = pruning_title_and_summary(base, pruning, bits, gs)
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATES / "agentos_quantized.md"),
        title=title,
        summary=summary,
        pruning_section=pruning_markdown(pruning, info.get("report")) if pruning else "",
        repo_hint=info.get("repo_id") or "path/to/this/folder",
        method_description=info.get("method_description")
        or ("GPTQ (Frantar et al. 2022) calibrated on WikiText-2 validation." if method == "gptq" else "Round to nearest."),
        command=scrub(info.get("command", "")),
        config_json=json.dumps(config, indent=2, sort_keys=True),
        evaluation=evaluation_section(info),
        size_line=size_line,
    )


def pruning_title_and_summary(base: str | None, pruning: dict, bits, group_size) -> tuple[str, str]:
    what = []
    if pruning.get("method"):
        if pruning.get("threshold") is not None:
            shape = f"threshold {pruning['threshold']:g}, {pruning.get('scope', 'layer')} scope"
        else:
            shape = pruning.get("pattern") or f"{pruning['sparsity']:.0%} " + (
                "of input features" if pruning["method"] == "column_magnitude" else "unstructured")
        what.append(f"{pruning['method']}{' (calibrated)' if pruning.get('calibrated') else ''} {shape}")
    for key, label in (("mlp_neurons", "{:.0%} of MLP neurons"), ("attention_groups", "{} KV head groups per layer"),
                       ("layers", "{} decoder layers")):
        if pruning.get(key):
            what.append("removed " + label.format(pruning[key]))
    quant = f" + int{bits} (group size {group_size})" if bits else ""
    title = f"{base or 'Model'} - agentos pruned ({', '.join(what)}){quant}"
    summary = (
        f"Pruning of {base or 'a local model'} ({'; '.join(what)}){quant}, made with optimum-agentos. Sparse layers "
        "are stored as a bitmask plus the kept values, so the files are smaller than the dense checkpoint."
    )
    return title, summary


def pruning_markdown(pruning: dict, report: dict | None) -> str:
    """The card's pruning section: settings and the measured sparsity and parameter counts."""
    lines = ["## Pruning", "", "Pruning config:", "", "```json", json.dumps(pruning, indent=2, sort_keys=True), "```"]
    if report:
        lines += ["", "| measured | value |", "|---|---:|", f"| sparsity of the pruned layers | {report['sparsity']:.4f} |"]
        if report.get("params_before"):
            lines.append(f"| parameters before | {report['params_before']:,} |")
        lines += [f"| parameters after | {report['params_after']:,} |", f"| non-zero parameters | {report['nonzero_params']:,} |"]
        layers = report.get("layers") or {}
        if layers:
            lines += ["", "<details><summary>Per-layer sparsity</summary>", "", "| layer | shape | sparsity |",
                      "|---|---|---:|"]
            lines += [f"| {n} | {'x'.join(map(str, v['shape']))} | {v['sparsity']:.4f} |" for n, v in layers.items()]
            lines += ["", "</details>"]
        lines += input_features_markdown(report.get("input_features"))
    return "\n".join(lines)


def input_features_markdown(features: dict | None) -> list[str]:
    """Lines of the card's table of input features a column prune removed (shapes shrank) or zeroed, per layer."""
    if not features:
        return []
    lines = ["", f"Input features removed by the column criterion: {features['removed']:,} of {features['of']:,} "
             f"({features['fraction']:.4f}).", "", "<details><summary>Per-layer input features</summary>", "",
             "| layer | removed | of | fraction | how |", "|---|---:|---:|---:|---|"]
    lines += [f"| {n} | {v['removed']} | {v['of']} | {v['removed'] / v['of']:.4f} | {v['how']} |"
              for n, v in features["layers"].items()]
    return lines + ["", "</details>"]


def scrub(text: str) -> str:
    """Remove anything that looks like a Hub token, and absolute local paths, from text bound for a card."""
    text = re.sub(r"hf_[A-Za-z0-9]{8,}", "<token>", text or "")
    return re.sub(r"(?<![\w.])/(?:[\w.-]+/)+([\w.-]+)", r"\1", text)


CARD_INFO = "agentos_card.json"  # what the card was rendered from, so `refresh_card` can re-render it


def write_card(folder, info: dict) -> Path:
    """Render `README.md` into a checkpoint folder, and keep its inputs (scrubbed) in `agentos_card.json`."""
    info = {**info, "command": scrub(info.get("command", ""))}
    info.pop("token", None)
    card = build_distilled_card(info) if info.get("kind") == "distilled" else build_card(info)
    Path(folder, CARD_INFO).write_text(json.dumps(info, indent=2, default=str))
    path = Path(folder) / "README.md"
    card.save(path)
    record_written(folder / CARD_INFO, path)
    return path


def refresh_card(folder, report_dir=None, model_name: str | None = None, repo_id: str | None = None) -> Path:
    """Re-render a checkpoint's card, with the results of a saved `CompressionReport` (its table and plot) when
    `report_dir` is given (`model_name` picks the model in a report of several).

    Without `agentos_card.json` (a folder this library did not write) the card is built from `config.json`'s
    `quantization_config` alone.
    """
    import shutil

    from ..evaluation.report import REPORT_FILES, CompressionReport

    folder = Path(folder)
    saved = folder / CARD_INFO
    if saved.is_file():
        info = json.loads(saved.read_text())
    else:
        config = json.loads((folder / "config.json").read_text()).get("quantization_config") or {}
        info = {"config": config, "sizes": {}}
    if report_dir is not None:
        report = CompressionReport.load(report_dir)
        info["results"] = report.card_rows(model_name)
        info["eval_note"] = (f"Baseline: {report.baseline.name}. Measured with optimum-agentos "
                             f"(`evaluate_model`; settings {json.dumps(report.settings)}).")
        if Path(report_dir).resolve() != folder.resolve():  # the report travels with the checkpoint (and to the Hub)
            for name in REPORT_FILES:
                if Path(report_dir, name).is_file():
                    shutil.copy(Path(report_dir, name), folder / name)
                    record_written(folder / name)
        if (folder / "size_vs_quality.png").is_file():
            info["plot"] = "size_vs_quality.png"
    if repo_id:
        info["repo_id"] = repo_id
    return write_card(folder, info)


def build_distilled_card(info: dict) -> ModelCard:
    """Card of a distilled student: teacher lineage, loss settings, teacher-vs-student results, parameter counts.

    `info`: teacher (source), task, pipeline ("text-generation" or "text-classification"), auto_class, loss
    (description), results (rows with baseline = teacher), params {teacher, student}, command, datasets.
    """
    base = hub_base_model(info.get("teacher"))
    results = info.get("results", [])
    eval_results = eval_results_of(results, info.get("pipeline", "text-generation"))
    card_data = ModelCardData(
        library_name="transformers", base_model=base, base_model_relation="finetune" if base else None,
        tags=["optimum-agentos", "distillation"], datasets=info.get("datasets"),
        model_name=info.get("name", "agentos-student"), eval_results=eval_results or None,
        pipeline_tag=info.get("pipeline"),
    )
    params = info.get("params", {})
    size_line = "Parameter counts were not measured."
    if params.get("student"):
        size_line = f"{params['student']:,} parameters"
        if params.get("teacher"):
            size_line += f" ({params['student'] / params['teacher']:.3f}x the teacher's {params['teacher']:,})"
        size_line += "."
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATES / "agentos_distilled.md"),
        title=f"{base or 'Model'} - agentos distilled student",
        summary=f"A smaller student distilled from {base or 'a local teacher'} on {info.get('task', 'a task')}, "
        "made with optimum-agentos.",
        auto_class=info.get("auto_class", "AutoModelForCausalLM"),
        repo_hint=info.get("repo_id") or "path/to/this/folder",
        teacher=base or "(a local model)",
        loss_description=info.get("loss", ""),
        command=scrub(info.get("command", "")),
        evaluation=evaluation_section({"baseline_label": '"baseline" is the teacher, "compressed" this student.',
                                       **info}),
        size_line=size_line,
    )
