"""`DistillationConfig`: `TrainingArguments` plus the distillation knobs, so `HfArgumentParser` gives a CLI."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from transformers import TrainingArguments

from .losses import KD_LOSSES


def parse_layer_map(value) -> dict[int, int] | None:
    """`{student: teacher}` from a dict, a JSON object string or `"0:0,1:2,2:4"`; None stays None."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("{"):
            value = json.loads(text)
        else:
            try:
                value = dict(pair.split(":") for pair in text.split(","))
            except ValueError:
                raise ValueError(
                    f"Cannot read the layer map {text!r}; write it as 'student:teacher' pairs, e.g. '1:2,2:4,3:6'."
                ) from None
    try:
        return {int(s): int(t) for s, t in dict(value).items()}
    except (TypeError, ValueError):
        raise ValueError(f"The layer map {value!r} must map integer student indices to integer teacher indices.") from None


@dataclass
class DistillationConfig(TrainingArguments):
    """Training arguments of `DistillationTrainer`: every `TrainingArguments` field plus the distillation loss.

    The loss is `alpha_ce * hard_label_loss + alpha_kd * kd_loss + hidden_loss_weight * hidden_loss
    + attention_loss_weight * attention_loss`.

    Example:

    ```python
    >>> args = DistillationConfig(output_dir="out", temperature=2.0, alpha_kd=0.5, max_steps=100)
    ```
    """

    temperature: float = field(default=2.0, metadata={"help": "Softmax temperature of the KD loss (> 0)."})
    alpha_kd: float = field(default=0.5, metadata={"help": "Weight of the soft-label (KD) loss."})
    alpha_ce: float | None = field(
        default=None,
        metadata={"help": "Weight of the hard-label loss on `labels`; defaults to 1 - alpha_kd. Ignored without labels."},
    )
    kd_loss: str = field(
        default="forward_kl", metadata={"help": f"Soft-label loss: one of {', '.join(KD_LOSSES)}."}
    )
    jsd_beta: float = field(default=0.5, metadata={"help": "Teacher weight in the generalized JSD mixture (0 < beta < 1)."})
    kd_chunk_size: int = field(
        default=1024,
        metadata={"help": "Positions per chunk of the vocabulary-wide KL (recomputed in backward); 0 = all at once."},
    )
    hidden_loss_weight: float = field(default=0.0, metadata={"help": "Weight of the hidden-state loss (0 = off)."})
    hidden_loss: str = field(default="mse", metadata={"help": "Hidden-state distance: 'mse' or 'cosine'."})
    hidden_layer_map: str | None = field(
        default=None,
        metadata={
            "help": "Student-to-teacher map of hidden-state indices (0 = embeddings, i = after layer i), as "
            "'1:2,2:4,3:6', a JSON object or a dict. Default: student layer i to teacher layer i * Lt / Ls."
        },
    )
    attention_loss_weight: float = field(
        default=0.0,
        metadata={"help": "Weight of the attention-map KL (MiniLM-style; needs equal head counts; runs eager attention)."},
    )
    attention_layer_map: str | None = field(
        default=None,
        metadata={"help": "Student-to-teacher map of layer indices (0-based) for the attention loss; default: last to last."},
    )

    def __post_init__(self):
        super().__post_init__()
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 (got {self.temperature}); 1.0 leaves the logits as they are.")
        if self.alpha_ce is None:
            self.alpha_ce = 1.0 - self.alpha_kd
        for name in ("alpha_kd", "alpha_ce", "hidden_loss_weight", "attention_loss_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (got {getattr(self, name)}).")
        if self.alpha_kd + self.alpha_ce + self.hidden_loss_weight + self.attention_loss_weight == 0:
            raise ValueError("Every loss weight is 0: set alpha_kd, alpha_ce, hidden_loss_weight or attention_loss_weight.")
        if self.kd_loss not in KD_LOSSES:
            raise ValueError(f"kd_loss must be one of {KD_LOSSES} (got {self.kd_loss!r}).")
        if not 0 < self.jsd_beta < 1:
            raise ValueError(f"jsd_beta must be strictly between 0 and 1 (got {self.jsd_beta}).")
        if self.kd_chunk_size < 0:
            raise ValueError(f"kd_chunk_size must be >= 0 (got {self.kd_chunk_size}).")
        if self.hidden_loss not in ("mse", "cosine"):
            raise ValueError(f"hidden_loss must be 'mse' or 'cosine' (got {self.hidden_loss!r}).")
        # Validated (and normalized to JSON-friendly dicts) now, checked against the models by the trainer.
        self.hidden_layer_map = parse_layer_map(self.hidden_layer_map)
        self.attention_layer_map = parse_layer_map(self.attention_layer_map)
