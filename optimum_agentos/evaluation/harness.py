"""Zero-shot tasks through `lm-eval` (the harness papers report with), on model objects, offline-capable.

Each task is lm-eval's own registered config (prompt, choices, target, metrics), with the dataset swapped for the
original files under `data_dir()` when they exist, so the numbers are lm-eval's. Online and without local files,
lm-eval's task is used as it is (it downloads from the Hub). Local rows are converted to the Hub's row format before
lm-eval sees them (e.g. ARC's nested `question.stem` and `choices` list, PIQA's separate label file).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from transformers.utils import logging

from ..data import DatasetUnavailableError, data_dir, is_offline


logger = logging.get_logger(__name__)


def _arc_row(row: dict) -> dict:
    question = row["question"]
    return {
        "id": row["id"],
        "question": question["stem"],
        "choices": {key: [c[key] for c in question["choices"]] for key in ("text", "label")},
        "answerKey": row["answerKey"],
    }


def _boolq_row(row: dict) -> dict:
    label = row["label"]
    if isinstance(label, str):  # this packaging writes "true"/"false"; the Hub's super_glue uses 1/0
        label = {"true": 1, "false": 0}[label.lower()]
    return {"question": row["question"], "passage": row["passage"], "idx": row.get("idx"), "label": int(label)}


@dataclass(frozen=True)
class HarnessTask:
    """An lm-eval task and where its split lives offline.

    Args:
        lm_eval_name (`str`): the registered lm-eval task whose config (prompt, choices, metrics) is used.
        split (`str`): the split lm-eval evaluates (`test_split` or `validation_split` of its config).
        file (`str`): the local JSON-lines file, relative to `data_dir()`.
        to_row (`Callable`, *optional*): converts a local row to the Hub's row format.
        labels_file (`str`, *optional*): a file with one label per line, joined to the rows as `label_column`.
        metric (`str`): the headline metric reported.
    """

    lm_eval_name: str
    split: str
    file: str
    to_row: Callable[[dict], dict] | None = None
    labels_file: str | None = None
    label_column: str = "label"
    metric: str = "acc"


HARNESS_TASKS: dict[str, HarnessTask] = {
    "lambada": HarnessTask("lambada_openai", "test", "lambada/lambada_test.jsonl"),
    "arc_easy": HarnessTask("arc_easy", "test", "arc/ARC-Easy-Test.jsonl", _arc_row),
    "arc_challenge": HarnessTask("arc_challenge", "test", "arc/ARC-Challenge-Test.jsonl", _arc_row),
    "piqa": HarnessTask("piqa", "validation", "piqa/dev.jsonl", labels_file="piqa/dev-labels.lst"),
    "winogrande": HarnessTask("winogrande", "validation", "winogrande/dev.jsonl"),
    "boolq": HarnessTask("boolq", "validation", "boolq/val.jsonl", _boolq_row),
}


def local_rows(name: str) -> list[dict] | None:
    """The task's rows read from `data_dir()` in the Hub's format, or None when the file is not there."""
    spec = HARNESS_TASKS[name]
    root = data_dir()
    path = root / spec.file if root is not None else None
    if path is None or not path.is_file():
        return None
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if spec.to_row is not None:
        rows = [spec.to_row(r) for r in rows]
    if spec.labels_file:
        labels = Path(root, spec.labels_file).read_text().split()
        if len(labels) != len(rows):
            raise DatasetUnavailableError(
                f"{root / spec.labels_file} has {len(labels)} labels for {len(rows)} rows of {path}: a corrupt copy."
            )
        for row, label in zip(rows, labels):
            row[spec.label_column] = int(label)
    return rows


@functools.lru_cache(maxsize=1)
def _task_index():
    from lm_eval.tasks import TaskManager

    return TaskManager().task_index  # indexing lm-eval's task folder takes seconds: once per process


def _base_config(lm_eval_name: str) -> dict:
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = _task_index().get(lm_eval_name)
    if entry is None or entry.yaml_path is None:
        raise ValueError(f"lm-eval has no task {lm_eval_name!r}; upgrade lm-eval (pip install 'lm-eval>=0.4.10').")
    return dict(load_yaml(entry.yaml_path, resolve_func=True))


def build_task(name: str):
    """An lm-eval `Task` for `name`: lm-eval's config, reading the local copy when present."""
    from datasets import Dataset, DatasetDict
    from lm_eval.api.task import ConfigurableTask

    if name not in HARNESS_TASKS:
        raise ValueError(f"Unknown zero-shot task {name!r}; known: {', '.join(sorted(HARNESS_TASKS))}.")
    spec = HARNESS_TASKS[name]
    rows = local_rows(name)
    if rows is None:
        root = data_dir()
        if is_offline():
            raise DatasetUnavailableError(
                f"Task {name!r} is unavailable offline: looked for {root / spec.file if root else spec.file} "
                "(set OPTIMUM_AGENTOS_DATA_DIR to the folder holding it), and HF_HUB_OFFLINE forbids the Hub."
            )
        logger.info(f"{name}: no local copy, lm-eval loads {spec.lm_eval_name} from the Hub")
        return _registered_task(spec.lm_eval_name)
    config = _base_config(spec.lm_eval_name)
    for key in ("tag", "group"):
        config.pop(key, None)
    # lm-eval's `custom_dataset` hook hands it the local rows, as the one split it evaluates.
    config.update(dataset_path="json", dataset_name=None, dataset_kwargs=None, training_split=None,
                  validation_split=None, test_split=None, fewshot_split=None, num_fewshot=0,
                  custom_dataset=lambda **_: DatasetDict({spec.split: Dataset.from_list(rows)}))
    config["test_split" if spec.split == "test" else "validation_split"] = spec.split
    return ConfigurableTask(config=config)


def _registered_task(lm_eval_name: str):
    from lm_eval.tasks import TaskManager

    return TaskManager().load([lm_eval_name])["tasks"][lm_eval_name]


def lm_eval_wrapper(model, tokenizer, batch_size: int = 16, max_length: int | None = None):
    """lm-eval's `HFLM` around an in-memory model (quantized, pruned or plain) on the model's own device."""
    from lm_eval.models.huggingface import HFLM

    device = str(next(model.parameters()).device)
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device, max_length=max_length)


def run_harness(model, tokenizer, names: list[str], limit: int | None = None, batch_size: int = 16,
                per_example: bool = False) -> dict:
    """Run zero-shot tasks with lm-eval's `simple_evaluate`; returns `{task: {metric: value, "n": docs}}`, plus
    `"per_example": {metric: [value per document, in split order]}` with `per_example=True` (for paired
    comparisons of two models on the same documents)."""
    import logging as std_logging

    from lm_eval import simple_evaluate

    # lm-eval warns about things that are by design here (a model object, in-memory datasets): keep its errors only
    lm_eval_logger = std_logging.getLogger("lm_eval")
    level = lm_eval_logger.level
    lm_eval_logger.setLevel(std_logging.ERROR)
    try:
        tasks = {name: build_task(name) for name in names}
        output = simple_evaluate(
            model=lm_eval_wrapper(model, tokenizer, batch_size), tasks=list(tasks.values()), limit=limit,
            # stderr: closed form for accuracies; a 100-draw bootstrap for LAMBADA's perplexity
            log_samples=per_example, bootstrap_iters=100, verbosity="ERROR",
        )
    finally:
        lm_eval_logger.setLevel(level)
    results = {}
    for name, task in tasks.items():
        task_name = task.config.task
        raw = output["results"][task_name]
        metrics = {key.split(",")[0]: value for key, value in raw.items()
                   if "," in key and isinstance(value, (int, float)) and not isinstance(value, bool)}
        metrics["n"] = output["n-samples"][task_name]["effective"]
        if per_example:
            samples = sorted(output["samples"][task_name], key=lambda sample: sample["doc_id"])
            names = samples[0]["metrics"] if samples else []
            metrics["per_example"] = {m: [float(s[m]) for s in samples] for m in names}
        results[name] = metrics
    return results
