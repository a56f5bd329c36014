"""GLUE rows from the Hub (`nyu-mll/glue`) or, offline, from the original TSV files under `data_dir()/glue`, and
the GLUE metrics of each task."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from typing import Callable

from transformers.utils import logging

from ..data import DatasetUnavailableError, data_dir, is_offline


logger = logging.get_logger(__name__)

RTE_LABELS = {"entailment": 0, "not_entailment": 1}  # the Hub's ClassLabel order


@dataclass(frozen=True)
class GlueTask:
    """One GLUE task: its text columns, labels, metrics and the local TSV of each split.

    Args:
        name (`str`): the Hub configuration name (`sst2`, `mrpc`, ...).
        text_columns (`tuple[str, ...]`): the Hub's text columns, in the order a tokenizer takes them.
        num_labels (`int`): classes; 1 for the regression task STS-B.
        folder (`str`): folder under `data_dir()/glue`.
        files (`dict`): split -> TSV file name.
        tsv_columns (`dict`): Hub column -> TSV header name, or column index when the file has no header.
        parse_label (`Callable`): TSV label cell -> the Hub's label.
        metrics (`tuple[str, ...]`): GLUE's metrics for the task; the first is the headline number.
    """

    name: str
    text_columns: tuple[str, ...]
    num_labels: int
    folder: str
    files: dict
    tsv_columns: dict = field(default_factory=dict)
    parse_label: Callable = int
    metrics: tuple[str, ...] = ("accuracy",)

    @property
    def header(self) -> bool:
        return not any(isinstance(v, int) for v in self.tsv_columns.values())


GLUE_TASKS: dict[str, GlueTask] = {
    "sst2": GlueTask("sst2", ("sentence",), 2, "SST-2", {"train": "train.tsv", "validation": "dev.tsv"},
                     {"sentence": "sentence", "label": "label"}),
    "mrpc": GlueTask("mrpc", ("sentence1", "sentence2"), 2, "MRPC", {"validation": "dev.tsv"},
                     {"sentence1": "#1 String", "sentence2": "#2 String", "label": "Quality"},
                     metrics=("f1", "accuracy")),
    "rte": GlueTask("rte", ("sentence1", "sentence2"), 2, "RTE", {"validation": "dev.tsv"},
                    {"sentence1": "sentence1", "sentence2": "sentence2", "label": "label"}, RTE_LABELS.__getitem__),
    "cola": GlueTask("cola", ("sentence",), 2, "CoLA", {"validation": "dev.tsv"}, {"sentence": 3, "label": 1},
                     metrics=("matthews_correlation",)),
    "stsb": GlueTask("stsb", ("sentence1", "sentence2"), 1, "STS-B",
                     {"train": "train.tsv", "validation": "dev.tsv"},
                     {"sentence1": "sentence1", "sentence2": "sentence2", "label": "score"}, float,
                     metrics=("spearmanr", "pearson")),
}


def glue_task(name: str) -> GlueTask:
    if name not in GLUE_TASKS:
        raise ValueError(f"Unknown GLUE task {name!r}; known: {', '.join(sorted(GLUE_TASKS))}.")
    return GLUE_TASKS[name]


def _read_tsv(path, task: GlueTask) -> dict[str, list]:
    with open(path, encoding="utf-8-sig", newline="") as f:  # MRPC's header starts with a BOM
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        rows = list(reader)
    if task.header:
        names = rows.pop(0)
        index = {column: names.index(cell) for column, cell in task.tsv_columns.items()}
    else:
        index = dict(task.tsv_columns)
    columns = {c: [r[index[c]] for r in rows] for c in task.text_columns}
    columns["label"] = [task.parse_label(r[index["label"]]) for r in rows]
    return columns


def load_glue(name: str, split: str):
    """A `datasets.Dataset` with the task's text columns and a `label` column (int; float for STS-B).

    Reads `data_dir()/glue/<Task>/<split file>` when it exists (the original GLUE TSV, the same rows as the Hub's),
    else the Hub's `nyu-mll/glue` unless offline.
    """
    from datasets import Dataset, load_dataset

    task = glue_task(name)
    root = data_dir()
    file = task.files.get(split)
    local = root / "glue" / task.folder / file if root is not None and file else None
    if local is not None and local.is_file():
        return Dataset.from_dict(_read_tsv(local, task))
    if is_offline():
        where = local or f"glue/{task.folder}/{file or split + '.tsv'}"
        raise DatasetUnavailableError(
            f"GLUE {name} {split} is not available offline: looked for {where} (set OPTIMUM_AGENTOS_DATA_DIR to the "
            "folder holding glue/), and HF_HUB_OFFLINE forbids the Hub."
        )
    data = load_dataset("nyu-mll/glue", name, split=split)
    return data.select_columns(list(task.text_columns) + ["label"])


def metric_formula(metric: str, predictions, references) -> float:
    """The GLUE metric by the same scikit-learn / scipy calls the `glue` metric of `evaluate` makes."""
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import f1_score, matthews_corrcoef

    if metric == "accuracy":
        return float(sum(int(p == r) for p, r in zip(predictions, references)) / len(references))
    if metric == "f1":
        return float(f1_score(y_true=references, y_pred=predictions))
    if metric == "matthews_correlation":
        return float(matthews_corrcoef(references, predictions))
    if metric == "pearson":
        return float(pearsonr(predictions, references)[0])
    if metric == "spearmanr":
        return float(spearmanr(predictions, references)[0])
    raise ValueError(f"Unknown GLUE metric {metric!r}")


def glue_metrics(name: str, predictions, references) -> dict[str, float]:
    """The task's GLUE metrics (see `glue_scores`, which also says which implementation computed them)."""
    return glue_scores(name, predictions, references)[0]


def glue_scores(name: str, predictions, references) -> tuple[dict[str, float], str]:
    """`(scores, source)`: `evaluate.load("glue", name)` when the metric can be loaded (online, or in the evaluate
    cache), else, when only *loading* it fails (offline: evaluate fetches metric scripts from the Hub), the same
    scikit-learn / scipy formulas computed directly. An error while computing the metric is raised, never hidden.
    `source` names the path taken, for the report."""
    task = glue_task(name)
    try:
        import evaluate

        metric = evaluate.load("glue", name)
    except (ImportError, OSError, ConnectionError, ValueError) as exc:  # missing package, offline, not in cache
        logger.warning(f"evaluate's glue metric for {name} cannot be loaded ({type(exc).__name__}: {exc}); computing "
                       f"{', '.join(task.metrics)} with the same scikit-learn/scipy formulas directly")
        source = f"optimum-agentos formulas (evaluate's glue metric unavailable: {type(exc).__name__})"
        return {m: metric_formula(m, predictions, references) for m in task.metrics}, source
    scores = metric.compute(predictions=predictions, references=references)
    return {m: float(scores[m]) for m in task.metrics}, f"evaluate glue/{name}"
