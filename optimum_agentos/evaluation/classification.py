"""GLUE on sequence classifiers, and STS-B Spearman on sentence-embedding encoders (mean pooling, cosine)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .glue import glue_scores, glue_task, load_glue, metric_formula
from .perplexity import _model_device


def _rows(task: str, split: str, limit: int | None):
    data = load_glue(task, split)
    return data.select(range(min(limit, len(data)))) if limit else data


def _batches(tokenizer, data, columns, batch_size: int, max_length: int, desc: str):
    for start in tqdm(range(0, len(data), batch_size), desc=desc, unit="batch"):
        rows = data[start : start + batch_size]
        yield tokenizer(*[rows[c] for c in columns], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")


@torch.inference_mode()
def evaluate_classifier(model, tokenizer, task: str, split: str = "validation", limit: int | None = None,
                        batch_size: int = 32, max_length: int = 128) -> dict:
    """GLUE metrics of a sequence classifier (regression head for STS-B); returns `{metric: value, "n": rows}`."""
    spec = glue_task(task)
    labels = getattr(model.config, "num_labels", None)
    if labels != spec.num_labels:
        raise ValueError(
            f"GLUE {task} has {spec.num_labels} label(s) but the model's head has {labels}: fine-tune a head for "
            f"{task} (AutoModelForSequenceClassification with num_labels={spec.num_labels}) before evaluating it."
        )
    data = _rows(task, split, limit)
    device = _model_device(model)
    was_training = model.training
    model.eval()
    predictions = []
    try:
        for batch in _batches(tokenizer, data, spec.text_columns, batch_size, max_length, f"GLUE {task}"):
            logits = model(**batch.to(device)).logits.float()
            predictions += logits[:, 0].tolist() if spec.num_labels == 1 else logits.argmax(-1).tolist()
    finally:
        model.train(was_training)
    scores, source = glue_scores(task, predictions, list(data["label"]))
    return {**scores, "n": len(data), "metric_source": source}


def mean_pooled(model, batch) -> torch.Tensor:
    """Sentence embeddings: the last hidden state averaged over real (unpadded) tokens."""
    out = model(**batch, output_hidden_states=True)
    hidden = out.last_hidden_state if getattr(out, "last_hidden_state", None) is not None else out.hidden_states[-1]
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)


@torch.inference_mode()
def evaluate_sts(model, tokenizer, split: str = "validation", limit: int | None = None, batch_size: int = 64,
                 max_length: int = 128) -> dict:
    """STS-B as sentence-embedding benchmarks report it: Spearman (and Pearson) between the cosine similarity of the
    two sentences' mean-pooled embeddings and the gold score."""
    data = _rows("stsb", split, limit)
    device = _model_device(model)
    was_training = model.training
    model.eval()
    similarities = []
    try:
        for start in tqdm(range(0, len(data), batch_size), desc="STS-B embeddings", unit="batch"):
            rows = data[start : start + batch_size]
            first, second = (
                mean_pooled(model, tokenizer(rows[c], padding=True, truncation=True, max_length=max_length,
                                             return_tensors="pt").to(device))
                for c in ("sentence1", "sentence2")
            )
            similarities += F.cosine_similarity(first.float(), second.float()).tolist()
    finally:
        model.train(was_training)
    gold = list(data["label"])
    scores = {metric: metric_formula(metric, similarities, gold) for metric in ("spearmanr", "pearson")}
    return {**scores, "n": len(data), "metric_source": "optimum-agentos formulas (scipy spearmanr/pearsonr)"}
