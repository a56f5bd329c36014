"""Knowledge distillation: `DistillationTrainer` (a `transformers.Trainer`), its `DistillationConfig`, students made
from the teacher (`make_student`), a top-k teacher cache and the losses as pure functions."""

from .cache import TOPK_INDICES, TOPK_LOGITS, precompute_teacher_topk
from .config import DistillationConfig
from .losses import attention_loss, distillation_loss, hidden_state_loss, topk_distillation_loss
from .student import make_student, uniform_layer_selection
from .trainer import DistillationTrainer, check_teacher_student

__all__ = [
    "DistillationConfig", "DistillationTrainer", "TOPK_INDICES", "TOPK_LOGITS", "attention_loss",
    "check_teacher_student", "distillation_loss", "hidden_state_loss", "make_student", "precompute_teacher_topk",
    "topk_distillation_loss", "uniform_layer_selection",
]
