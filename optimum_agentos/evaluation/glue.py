"""GLUE rows from the Hub (`nyu-mll/glue`) or, offline, from the original TSV files under `data_dir()/glue`."""

from __future__ import annotations

import csv
from dataclasses import dataclass

from .data import DatasetUnavailableError, data_dir, is_offline


@dataclass(frozen=True)
class GlueTask:
    """One GLUE task: its text columns, label count, and the local TSV of each split (with its column layout)."""

    name: str
    text_columns: tuple[str, ...]
    num_labels: int
    folder: str
    files: dict  # split -> file name inside glue/<folder>/
    header: bool = True


GLUE_TASKS: dict[str, GlueTask] = {
    "sst2": GlueTask("sst2", ("sentence",), 2, "SST-2", {"train": "train.tsv", "validation": "dev.tsv"}),
}


def glue_task(name: str) -> GlueTask:
    if name not in GLUE_TASKS:
        raise ValueError(f"Unknown GLUE task {name!r}; known: {', '.join(sorted(GLUE_TASKS))}.")
    return GLUE_TASKS[name]


def _read_tsv(path, task: GlueTask) -> dict[str, list]:
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    columns = {c: [r[c] for r in rows] for c in task.text_columns}
    columns["label"] = [int(r["label"]) for r in rows]
    return columns


def load_glue(name: str, split: str):
    """A `datasets.Dataset` with the task's text columns and an integer `label` column.

    Reads `data_dir()/glue/<Task>/<split file>` when it exists (the original GLUE TSV, identical rows to the Hub's),
    else the Hub's `nyu-mll/glue` unless offline.
    """
    from datasets import Dataset, load_dataset

    task = glue_task(name)
    if split not in task.files:
        raise ValueError(f"GLUE {name} has no split {split!r} here; available: {', '.join(task.files)}.")
    root = data_dir()
    local = root / "glue" / task.folder / task.files[split] if root is not None else None
    if local is not None and local.is_file():
        return Dataset.from_dict(_read_tsv(local, task))
    if is_offline():
        raise DatasetUnavailableError(
            f"GLUE {name} {split} is not available offline: looked for {local or 'glue/' + task.folder + '/' + task.files[split]}"
            " (set OPTIMUM_AGENTOS_DATA_DIR to the folder holding glue/), and HF_HUB_OFFLINE forbids the Hub."
        )
    data = load_dataset("nyu-mll/glue", name, split=split)
    return data.select_columns(list(task.text_columns) + ["label"])
