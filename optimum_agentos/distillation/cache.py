"""Teacher outputs computed once: the top-k logits of every position, stored as columns of a `datasets.Dataset`.

Training from the cache (`DistillationTrainer(teacher_model=None, train_dataset=cached)`) never loads the teacher,
so each step costs only the student's forward and backward pass.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from datasets import Dataset, Sequence, Value
from tqdm.auto import tqdm
from transformers.utils import logging

from ..formats.folder import atomic_directory


logger = logging.get_logger(__name__)

TOPK_LOGITS = "teacher_topk_logits"
TOPK_INDICES = "teacher_topk_indices"
_MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@torch.no_grad()
def precompute_teacher_topk(
    teacher,
    dataset: Dataset,
    k: int = 64,
    batch_size: int = 8,
    output_dir: str | os.PathLike | None = None,
    data_collator=None,
) -> Dataset:
    """Add the teacher's top-`k` logits and their indices to every row of `dataset`.

    Classification rows get `[k]` values (k is capped at the number of labels); language-model rows get `[seq, k]`,
    so their windows must all have the same length (pack text into fixed windows first).

    Args:
        teacher (`PreTrainedModel`): the teacher, run in eval mode under `no_grad`.
        dataset (`datasets.Dataset`): tokenized rows (`input_ids`, optionally `attention_mask`, `labels`, ...).
        k (`int`, *optional*, defaults to `64`): logits kept per position.
        batch_size (`int`, *optional*, defaults to `8`): rows per teacher forward.
        output_dir (`str`, *optional*): when given, the result is saved there with `save_to_disk` (written to a
            temporary folder and renamed into place) and can be reloaded with `datasets.load_from_disk`.
        data_collator (*optional*): batches rows of different lengths (e.g. `DataCollatorWithPadding`); by default
            rows are stacked as they are.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1 (got {k}).")
    if "input_ids" not in dataset.column_names:
        raise ValueError(f"The dataset has no input_ids column (columns: {dataset.column_names}); tokenize it first.")
    teacher.eval()
    device = next(teacher.parameters()).device
    inputs = [c for c in _MODEL_INPUTS if c in dataset.column_names]
    view = dataset.select_columns(inputs)
    values, indices = [], []
    for start in tqdm(range(0, len(view), batch_size), desc="Teacher top-k", unit="batch"):
        rows = view[start : start + batch_size]
        features = [{c: rows[c][i] for c in inputs} for i in range(len(rows["input_ids"]))]
        if data_collator is not None:
            batch = data_collator(features)
        else:
            lengths = {len(f["input_ids"]) for f in features}
            if len(lengths) > 1:
                raise ValueError(
                    f"Rows have different lengths ({sorted(lengths)[:5]}...): pass data_collator= "
                    "(e.g. DataCollatorWithPadding) for classification, or pack language-model text into windows of "
                    "one length."
                )
            batch = {c: torch.tensor([f[c] for f in features]) for c in inputs}
        batch = {c: v.to(device) for c, v in batch.items() if c in _MODEL_INPUTS}
        logits = teacher(**batch).logits.float()
        top = logits.topk(min(k, logits.shape[-1]), dim=-1)
        for i, f in enumerate(features):
            v, ix = top.values[i], top.indices[i]
            if v.dim() == 2:  # language model: drop the padding positions the collator added
                v, ix = v[: len(f["input_ids"])], ix[: len(f["input_ids"])]
            values.append(v.to(torch.float16).cpu().numpy())
            indices.append(ix.to(torch.int32).cpu().numpy())
    nested = values[0].ndim == 2
    value_feature = Sequence(Sequence(Value("float16"))) if nested else Sequence(Value("float16"))
    index_feature = Sequence(Sequence(Value("int32"))) if nested else Sequence(Value("int32"))
    cached = dataset.add_column(TOPK_LOGITS, [v.tolist() for v in values], feature=value_feature)
    cached = cached.add_column(TOPK_INDICES, [i.tolist() for i in indices], feature=index_feature)
    if output_dir is not None:
        save_atomically(cached, output_dir)
    return cached


def save_atomically(dataset: Dataset, output_dir: str | os.PathLike) -> Path:
    """`save_to_disk` through `formats.folder.atomic_directory`: an existing cache is replaced only once the new one is
    complete."""
    with atomic_directory(output_dir) as tmp:
        dataset.save_to_disk(str(tmp))
    logger.info(f"Saved the teacher cache to {output_dir}")
    return Path(output_dir)
