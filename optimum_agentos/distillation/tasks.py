"""Training data for the distillation tasks the CLI and benchmarks run: GLUE classification and language-model
windows of WikiText-2."""

from __future__ import annotations

import torch
from datasets import Dataset

from ..data import load_text, tokenize_text, windows_from_ids
from ..evaluation.glue import glue_task, load_glue


CLASSIFICATION_TASKS = ("sst2",)
LM_TASKS = ("wikitext2",)


def classification_dataset(tokenizer, task: str, split: str, max_length: int = 64, max_samples: int | None = None,
                           seed: int = 0) -> Dataset:
    """Tokenized GLUE rows (`input_ids`, `attention_mask`, ..., `labels`), unpadded (pad per batch with
    `DataCollatorWithPadding`). `max_samples` keeps a seeded random subset."""
    columns = glue_task(task).text_columns
    data = load_glue(task, split)
    if max_samples is not None and max_samples < len(data):
        data = data.shuffle(seed=seed).select(range(max_samples))

    def encode(batch):
        encoded = tokenizer(*[batch[c] for c in columns], truncation=True, max_length=max_length)
        encoded["labels"] = batch["label"]
        return encoded

    return data.map(encode, batched=True, remove_columns=data.column_names, desc=f"Tokenizing {task} {split}")


def lm_dataset(tokenizer, dataset: str = "wikitext2", split: str = "validation", seq_len: int = 512,
               num_windows: int | None = None) -> Dataset:
    """Consecutive, non-overlapping windows of `seq_len` tokens of a text split, with `labels` = `input_ids`."""
    return lm_dataset_from_text(tokenizer, load_text(dataset, split), seq_len, num_windows)


def lm_dataset_from_text(tokenizer, text: str, seq_len: int = 512, num_windows: int | None = None) -> Dataset:
    """`lm_dataset` for any text (e.g. the user's own domain): its first `num_windows` windows of `seq_len` tokens."""
    ids = windows_from_ids(tokenize_text(tokenizer, text), num_windows, seq_len)
    rows = ids.tolist()
    return Dataset.from_dict({"input_ids": rows, "attention_mask": torch.ones_like(ids).tolist(), "labels": rows})


@torch.no_grad()
def accuracy(model, dataset: Dataset, collator, batch_size: int = 64) -> float:
    """Accuracy of a sequence classifier on tokenized rows with `labels`."""
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    rows = dataset.remove_columns([c for c in dataset.column_names if c.startswith("teacher_")])
    for start in range(0, len(rows), batch_size):
        batch = collator([rows[i] for i in range(start, min(start + batch_size, len(rows)))])
        labels = batch.pop("labels").to(device)
        logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
        correct += int((logits.argmax(-1) == labels).sum())
    return correct / len(rows)
