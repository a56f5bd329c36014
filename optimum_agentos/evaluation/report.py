"""Baseline vs compressed: the same tasks on every model, with footprint and speed, saved as JSON, markdown and a
size-vs-quality plot.

Recovery is the fraction of the baseline's quality a compressed model keeps, so 1.0 means no loss whatever the
metric's direction: `compressed / baseline` for accuracy-like metrics, `baseline / compressed` for perplexity.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from transformers.utils import logging

from ..formats.folder import record_written
from .tasks import check_tasks, evaluate_model, model_kind


logger = logging.get_logger(__name__)

AUTO_CLASSES = {"causal-lm": "AutoModelForCausalLM", "classifier": "AutoModelForSequenceClassification",
                "encoder": "AutoModel"}
REPORT_FILES = ("report.json", "report.md", "size_vs_quality.png")


def recovery(value: float, baseline: float, higher_is_better: bool) -> float:
    """Fraction of the baseline's quality kept (1.0 = no loss)."""
    if not baseline or not value:
        return float("nan")
    return value / baseline if higher_is_better else baseline / value


@dataclass
class ModelEntry:
    """One model of a comparison: its task results (`TaskResult.to_dict()` rows) and footprint."""

    name: str
    results: list[dict]
    stats: dict = field(default_factory=dict)


@dataclass
class CompressionReport:
    """The results of `compare`; `save(folder)` writes `report.json`, `report.md` and `size_vs_quality.png`."""

    baseline: ModelEntry
    models: list[ModelEntry]
    tasks: list[str]
    settings: dict = field(default_factory=dict)

    def rows(self) -> list[dict]:
        """One row per (model, task): value, baseline value, recovery."""
        base = {r["task"]: r for r in self.baseline.results}
        rows = []
        for entry in self.models:
            for r in entry.results:
                b = base[r["task"]]
                rows.append({"model": entry.name, "task": r["task"], "metric": r["metric"], "n": r["n"],
                             "baseline": b["value"], "compressed": r["value"],
                             "recovery": recovery(r["value"], b["value"], r["higher_is_better"])})
        return rows

    def failures(self, min_recovery: float) -> list[dict]:
        """Rows whose recovery is below `min_recovery`."""
        return [r for r in self.rows() if not r["recovery"] >= min_recovery]

    def to_dict(self) -> dict:
        return {
            "baseline": vars(self.baseline), "models": [vars(m) for m in self.models], "tasks": self.tasks,
            "rows": self.rows(), "settings": self.settings,
        }

    def card_rows(self, name: str | None = None) -> list[dict]:
        """Rows for a model card: `{task, metric, baseline, compressed, split, dataset_type, ...}`."""
        entry = next((m for m in self.models if name in (None, m.name)), None)
        base = {r["task"]: r for r in self.baseline.results}
        return [{"task": r["task"], "metric": r["metric"], "split": r["split"], "baseline": base[r["task"]]["value"],
                 "compressed": r["value"], "dataset_type": r["hub_dataset"], "dataset_config": r["hub_config"],
                 "n": r["n"]} for r in (entry.results if entry else [])]

    def to_markdown(self) -> str:
        names = [m.name for m in self.models]
        lines = ["| task | metric | n | " + " | ".join([self.baseline.name] + names) + " |",
                 "|---|---|---:|" + "---:|" * (1 + len(names))]
        by_model = {m.name: {r["task"]: r for r in m.results} for m in self.models}
        for b in self.baseline.results:
            cells = [f"{b['value']:.4g}"]
            for name in names:
                r = by_model[name].get(b["task"])
                rec = recovery(r["value"], b["value"], r["higher_is_better"]) if r else float("nan")
                cells.append(f"{r['value']:.4g} ({rec:.3f})" if r else "-")
            lines.append(f"| {b['task']} | {b['metric']} | {b['n']} | " + " | ".join(cells) + " |")
        lines += ["", "Values with the recovery in brackets (compressed / baseline; baseline / compressed for "
                  "perplexity: 1.0 = no loss).", "", _stats_table([self.baseline] + self.models)]
        return "\n".join(lines)

    def plot(self, path: str | Path) -> Path:
        """Size on disk against each task's headline metric, one point per model (matplotlib, PNG)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        entries = [self.baseline] + self.models
        fig, axes = plt.subplots(1, len(self.tasks), figsize=(4.2 * len(self.tasks), 3.6), squeeze=False)
        for ax, task in zip(axes[0], self.tasks):
            for entry in entries:
                r = next((x for x in entry.results if x["task"] == task), None)
                size = entry.stats.get("size_mb")
                if r is None or size is None:
                    continue
                ax.scatter(size, r["value"], s=40)
                ax.annotate(entry.name, (size, r["value"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
                ax.set_ylabel(f"{r['metric']} ({'higher' if r['higher_is_better'] else 'lower'} is better)")
            ax.set_title(task)
            ax.set_xlabel("size on disk (MB)")
            ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return Path(path)

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "report.json").write_text(json.dumps(self.to_dict(), indent=2, default=str))
        (folder / "report.md").write_text("# Compression report\n\n" + self.to_markdown() + "\n")
        self.plot(folder / "size_vs_quality.png")
        record_written(*(folder / name for name in REPORT_FILES))
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "CompressionReport":
        data = json.loads(Path(folder, "report.json").read_text())
        return cls(ModelEntry(**data["baseline"]), [ModelEntry(**m) for m in data["models"]], data["tasks"],
                   data.get("settings", {}))


STAT_COLUMNS = (("params", "parameters", "{:,}"), ("nonzero_params", "non-zero", "{:,}"),
                ("size_mb", "size MB", "{:.1f}"),
                ("load_seconds", "load s", "{:.2f}"), ("prefill_tokens_per_s", "prefill tok/s", "{:.0f}"),
                ("decode_tokens_per_s", "decode tok/s", "{:.1f}"), ("peak_rss_mb", "peak RSS MiB", "{:.0f}"))


def _stats_table(entries: list[ModelEntry]) -> str:
    columns = [c for c in STAT_COLUMNS if any(e.stats.get(c[0]) is not None for e in entries)]
    lines = ["| model | " + " | ".join(c[1] for c in columns) + " |", "|---|" + "---:|" * len(columns)]
    for e in entries:
        cells = [c[2].format(e.stats[c[0]]) if e.stats.get(c[0]) is not None else "-" for c in columns]
        lines.append(f"| {e.name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _load(source, kind_hint: str | None):
    """A model object and its folder (None for objects not saved), loading paths with the right auto class."""
    import transformers

    from ..models import resolve_model

    if not isinstance(source, (str, Path)):  # an object may differ from the folder it came from: saved afresh
        return source, None, None
    folder = resolve_model(str(source))
    auto_class = AUTO_CLASSES[kind_hint or "causal-lm"]
    start = time.perf_counter()
    model = getattr(transformers, auto_class).from_pretrained(folder)
    return model, folder, time.perf_counter() - start


def _kind_for(tasks: list[str]) -> str:
    from .tasks import TASKS

    kinds = {TASKS[t].kind for t in tasks}
    if kinds <= {"perplexity", "zero-shot"}:
        return "causal-lm"
    return "encoder" if tasks == ["stsb"] else "classifier"


def compare(baseline, compressed, tokenizer=None, tasks=("wikitext2",), limit: int | None = None,
            ppl_windows: int | None = 64, speed: bool = True, names: list[str] | None = None,
            baseline_name: str = "baseline", batch_size: int = 16, seq_len: int = 512,
            device=None) -> CompressionReport:
    """Evaluate a baseline and one or more compressed models on the same tasks, with their footprints.

    Args:
        baseline: a model object, checkpoint folder, Hub id or alias (`smollm2-135m`).
        compressed: the same, or a list / `{name: model}` dict of them.
        tokenizer: shared tokenizer (default: the baseline's, loaded from its folder).
        tasks: task names (`evaluation.tasks.TASKS`).
        limit (`int`, *optional*): examples per zero-shot / GLUE task (`None`: full splits).
        speed (`bool`, defaults to `True`): measure load time, prefill/decode speed and peak memory in a fresh
            process per model (models given as objects are saved to a temporary folder for it).
        device (`str`, *optional*): where the tasks run (`"cpu"`, `"cuda"`, `"cuda:1"`, `"auto"`); checked before
            any model loads. Speed is always measured on the CPU, where this project's models are deployed.

    Example:
    ```python
    >>> report = compare("smollm2-135m", "./smollm2-int4", tasks=["wikitext2", "arc_easy"], limit=500)
    >>> report.save("report/")
    ```
    """
    from transformers import AutoTokenizer

    from ..formats.folder import folder_size
    from .measure import count_parameters, measure_in_subprocess

    from ..nn.devices import resolve_device

    tasks = check_tasks(tasks)
    device = resolve_device(device)
    if isinstance(compressed, dict):
        names, compressed = list(compressed), list(compressed.values())
    elif not isinstance(compressed, (list, tuple)):
        compressed = [compressed]
    names = names or [f"compressed-{i}" if len(compressed) > 1 else "compressed" for i in range(len(compressed))]
    kind = _kind_for(tasks)
    entries = []
    with tempfile.TemporaryDirectory(prefix="agentos-compare-") as scratch:
        for name, source in [(baseline_name, baseline)] + list(zip(names, compressed)):
            model, folder, load_seconds = _load(source, kind)
            if tokenizer is None:
                if folder is None:
                    raise ValueError("The baseline is an in-memory model without a saved folder: pass tokenizer=.")
                tokenizer = AutoTokenizer.from_pretrained(folder)
            check_tasks(tasks, model)
            model = model.to(device)
            logger.info(f"Evaluating {name} on {', '.join(tasks)} ({device})")
            results = [r.to_dict() for r in evaluate_model(model, tokenizer, tasks, limit, ppl_windows, seq_len,
                                                           batch_size=batch_size)]
            params, nonzero = count_parameters(model)
            stats = {"params": params, "nonzero_params": nonzero, "load_seconds": load_seconds}
            if folder is None:  # an in-memory model: its size on disk is the size of what save_pretrained writes
                folder = Path(scratch, name)
                model.to("cpu").save_pretrained(folder)
            stats["size_mb"] = folder_size(folder) / 1e6
            if speed:
                stats.update(measure_in_subprocess(folder, AUTO_CLASSES[model_kind(model)]))
            entries.append(ModelEntry(name, results, stats))
            del model
    settings = {"limit": limit, "ppl_windows": ppl_windows, "seq_len": seq_len, "batch_size": batch_size}
    return CompressionReport(entries[0], entries[1:], tasks, settings)
