"""`DistillationTrainer`: a `transformers.Trainer` whose loss mixes the hard labels with a frozen teacher's outputs.

Only `compute_loss` changes; data loading, optimizers, checkpointing, resuming, logging and the distributed back ends
(DDP, FSDP, DeepSpeed through accelerate) are the Trainer's own. The teacher is laid out like the student
(`placement.py`): replicated under DDP, sharded under FSDP and DeepSpeed ZeRO-3. Launch a script that builds the
trainer with `accelerate launch --config_file fsdp.yaml train.py` (see the README's "Sharded training").
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn
from transformers import PreTrainedModel, Trainer
from transformers.utils import logging

from .cache import TOPK_INDICES, TOPK_LOGITS
from .config import DistillationConfig
from .losses import attention_loss, distillation_loss, hidden_state_loss, topk_distillation_loss
from .placement import prepare_teacher


logger = logging.get_logger(__name__)

MODEL_TAGS = ["optimum-agentos", "distillation"]


def _base_model(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _output_size(model: nn.Module) -> int | None:
    head = _base_model(model).get_output_embeddings() if hasattr(_base_model(model), "get_output_embeddings") else None
    if head is not None and hasattr(head, "weight"):
        return head.weight.shape[0]
    return getattr(_base_model(model).config, "vocab_size", None)


def _is_classifier(model: nn.Module) -> bool:
    return type(_base_model(model)).__name__.endswith("ForSequenceClassification")


def default_hidden_layer_map(student_layers: int, teacher_layers: int) -> dict[int, int]:
    """Student hidden state i (after layer i, 1-based) to teacher hidden state round(i * Lt / Ls): last to last."""
    return {i: round(i * teacher_layers / student_layers) for i in range(1, student_layers + 1)}


def _check_layer_map(layer_map: dict[int, int], student_max: int, teacher_max: int, what: str) -> None:
    bad = {s: t for s, t in layer_map.items() if not 0 <= s <= student_max or not 0 <= t <= teacher_max}
    if bad:
        raise ValueError(
            f"The {what} names layers that do not exist: {bad}. Valid indices: student 0..{student_max}, "
            f"teacher 0..{teacher_max}."
        )


def saved_tokenizer(model: nn.Module):
    """The tokenizer saved beside a model loaded from a folder or the Hub cache (never downloaded, never remote
    code), or None."""
    from transformers import AutoTokenizer

    path = getattr(getattr(_base_model(model), "config", None), "_name_or_path", None)
    if not path:
        return None
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError):
        return None


def check_teacher_student(student: nn.Module, teacher: nn.Module, processing_class=None, teacher_processing_class=None):
    """Fail before training when the teacher cannot teach this student: task, vocabulary, tokenizer, label count."""
    if _is_classifier(student) != _is_classifier(teacher):
        kinds = {True: "a sequence classifier", False: "a language model"}
        raise ValueError(
            f"The student is {kinds[_is_classifier(student)]} but the teacher is {kinds[_is_classifier(teacher)]}; "
            "distill between models of the same task."
        )
    if _is_classifier(student):
        s, t = _base_model(student).config.num_labels, _base_model(teacher).config.num_labels
        if s != t:
            raise ValueError(f"The student has {s} labels but the teacher has {t}; give the student num_labels={t}.")
    else:
        s, t = _output_size(student), _output_size(teacher)
        if s != t:
            raise ValueError(
                f"Vocabulary mismatch: the student predicts {s} tokens, the teacher {t}. Logit distillation needs the "
                "same tokenizer and vocabulary; pick a student from the teacher's family (e.g. make_student)."
            )
    processing_class = processing_class or saved_tokenizer(student)
    teacher_processing_class = teacher_processing_class or saved_tokenizer(teacher)
    if processing_class is None or teacher_processing_class is None:
        logger.info("Teacher and student tokenizers not compared: one of them is neither passed nor saved with its "
                    "model (pass processing_class= and teacher_processing_class=).")
    if processing_class is not None and teacher_processing_class is not None:
        s_vocab = getattr(processing_class, "get_vocab", dict)()
        t_vocab = getattr(teacher_processing_class, "get_vocab", dict)()
        if s_vocab != t_vocab:
            differing = sorted(set(s_vocab.items()) ^ set(t_vocab.items()))[:3]
            raise ValueError(
                f"Tokenizer mismatch: the student's tokenizer has {len(s_vocab)} entries, the teacher's "
                f"{len(t_vocab)}, and they differ (e.g. {differing}). Use the teacher's tokenizer for the student."
            )


class DistillationTrainer(Trainer):
    """A `Trainer` that trains `model` (the student) to match a frozen `teacher_model`, or a top-k cache of it.

    Args:
        model (`PreTrainedModel` or `PeftModel`): the student: `make_student(...)`, any smaller model with the
            teacher's vocabulary (or label set), a pruned or quantized model, or a PEFT model (only adapters train).
        teacher_model (`PreTrainedModel` or `str`, *optional*): the teacher, or a path/Hub id loaded with the
            student's auto class. Frozen, in eval mode, run under `no_grad`. Omit it to train from a top-k cache
            (`precompute_teacher_topk`) held in `train_dataset`.
        args (`DistillationConfig`): training and distillation arguments.
        peft_config (`peft.PeftConfig`, *optional*): wraps the student with `get_peft_model` first.
        teacher_processing_class (*optional*): the teacher's tokenizer, compared with `processing_class`.
        **kwargs: every other `Trainer` argument (`train_dataset`, `eval_dataset`, `processing_class`,
            `data_collator`, `compute_metrics`, `callbacks`, ...).

    Example:

    ```python
    >>> student = make_student(teacher, num_layers=3)
    >>> args = DistillationConfig(output_dir="out", temperature=2.0, alpha_kd=0.5, max_steps=1000)
    >>> trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=train)
    >>> trainer.train()
    ```
    """

    def __init__(self, model=None, teacher_model=None, args: DistillationConfig | None = None, peft_config=None,
                 teacher_processing_class=None, **kwargs):
        if args is None:
            args = DistillationConfig(output_dir="distillation-output")
        if not isinstance(args, DistillationConfig):
            raise TypeError(f"args must be a DistillationConfig (got {type(args).__name__}); it extends TrainingArguments.")
        if model is None:
            raise ValueError("Pass the student as `model=`.")
        if peft_config is not None:
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
        if isinstance(teacher_model, str):
            teacher_model = self._load_teacher(teacher_model, model)
        train_dataset = kwargs.get("train_dataset")
        columns = getattr(train_dataset, "column_names", None) or []
        self.uses_cache = teacher_model is None
        if self.uses_cache:
            if TOPK_LOGITS not in columns or TOPK_INDICES not in columns:
                raise ValueError(
                    "No teacher_model and the train dataset has no cached teacher outputs "
                    f"({TOPK_LOGITS!r}, {TOPK_INDICES!r}): pass teacher_model=, or build the cache with "
                    "precompute_teacher_topk(teacher, dataset)."
                )
            if args.kd_loss != "forward_kl" or args.hidden_loss_weight or args.attention_loss_weight:
                raise ValueError(
                    "Training from a top-k cache supports kd_loss='forward_kl' only, without hidden-state or attention "
                    "losses (they need the teacher itself)."
                )
        else:
            check_teacher_student(model, teacher_model, kwargs.get("processing_class"), teacher_processing_class)
            self._check_layer_maps(model, teacher_model, args)
            if args.attention_loss_weight:
                for m in (model, teacher_model):
                    _base_model(m).set_attn_implementation("eager")  # sdpa returns no attention maps
        if hasattr(_base_model(model), "add_model_tags"):
            _base_model(model).add_model_tags(MODEL_TAGS)
        super().__init__(model=model, args=args, **kwargs)
        # Each loss below is a mean over its own batch; the Trainer then divides by the accumulation steps.
        self.model_accepts_loss_kwargs = False
        fsdp_asked = args.fsdp or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
        if fsdp_asked and not self.is_fsdp_enabled:
            logger.warning(
                f"fsdp is set but accelerate runs this as {self.accelerator.distributed_type}: accelerate enables FSDP "
                "on accelerators (CUDA, XPU, NPU, ...) only. CPU processes train with DDP over gloo when launched "
                "with use_cpu=True or ACCELERATE_USE_CPU=1, each holding the whole student and teacher."
            )
        self.teacher = None if self.uses_cache else prepare_teacher(self.accelerator, teacher_model)

    # ------------------------------------------------------------------------------------------------- set-up

    @staticmethod
    def _load_teacher(name_or_path: str, student: nn.Module) -> PreTrainedModel:
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        auto = AutoModelForSequenceClassification if _is_classifier(student) else AutoModelForCausalLM
        return auto.from_pretrained(name_or_path)

    @staticmethod
    def _check_layer_maps(student: nn.Module, teacher: nn.Module, args: DistillationConfig) -> None:
        s_layers = _base_model(student).config.num_hidden_layers
        t_layers = _base_model(teacher).config.num_hidden_layers
        if args.hidden_loss_weight:
            if args.hidden_layer_map is None:
                args.hidden_layer_map = default_hidden_layer_map(s_layers, t_layers)
            _check_layer_map(args.hidden_layer_map, s_layers, t_layers, "hidden_layer_map (hidden-state indices)")
        if args.attention_loss_weight:
            if args.attention_layer_map is None:
                args.attention_layer_map = {s_layers - 1: t_layers - 1}
            _check_layer_map(args.attention_layer_map, s_layers - 1, t_layers - 1, "attention_layer_map (layer indices)")

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        self._signature_columns = list(dict.fromkeys(self._signature_columns + [TOPK_LOGITS, TOPK_INDICES]))

    # --------------------------------------------------------------------------------------------------- loss

    @staticmethod
    def _positions(inputs: dict, logits: torch.Tensor) -> torch.Tensor | None:
        """Positions whose distributions are matched: None for classification; for language models the real
        (unpadded) tokens whose next-token label is not ignored."""
        if logits.dim() < 3:
            return None
        mask = inputs.get("attention_mask")
        mask = torch.ones(logits.shape[:2], dtype=torch.bool, device=logits.device) if mask is None else mask.bool()
        labels = inputs.get("labels")
        if labels is not None:
            target = torch.full_like(labels, -100)
            target[:, :-1] = labels[:, 1:]
            mask = mask & (target != -100)
        return mask

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args = self.args
        inputs = dict(inputs)
        topk_logits, topk_indices = inputs.pop(TOPK_LOGITS, None), inputs.pop(TOPK_INDICES, None)
        labels = inputs.get("labels")
        use_labels = labels is not None and args.alpha_ce > 0
        model_inputs = inputs if use_labels else {k: v for k, v in inputs.items() if k != "labels"}
        extra = {}
        if args.hidden_loss_weight:
            extra["output_hidden_states"] = True
        if args.attention_loss_weight:
            extra["output_attentions"] = True
        outputs = model(**model_inputs, **extra)
        positions = self._positions(inputs, outputs.logits)
        parts = {}
        if use_labels:
            parts["hard"] = (args.alpha_ce, outputs.loss)
        if topk_logits is not None:
            kd = topk_distillation_loss(
                outputs.logits, topk_logits, topk_indices, positions, args.temperature, args.kd_chunk_size or None
            )
            parts["kd"] = (args.alpha_kd, kd)
        elif self.teacher is not None:
            with torch.no_grad(), self.accelerator.autocast():
                teacher_out = self.teacher(**{k: v for k, v in inputs.items() if k != "labels"}, **extra)
            if args.alpha_kd:
                parts["kd"] = (args.alpha_kd, distillation_loss(
                    outputs.logits, teacher_out.logits, positions, args.temperature, args.kd_loss, args.jsd_beta,
                    args.kd_chunk_size or None,
                ))
            token_mask = inputs.get("attention_mask")
            if args.hidden_loss_weight:
                parts["hidden"] = (args.hidden_loss_weight, hidden_state_loss(
                    outputs.hidden_states, teacher_out.hidden_states, args.hidden_layer_map, token_mask,
                    args.hidden_loss,
                ))
            if args.attention_loss_weight:
                parts["attention"] = (args.attention_loss_weight, attention_loss(
                    outputs.attentions, teacher_out.attentions, args.attention_layer_map, token_mask
                ))
        elif not use_labels:
            raise ValueError("Nothing to learn from: no teacher, no cached teacher outputs and no labels in the batch.")
        loss = sum(weight * value for weight, value in parts.values())
        if model.training:
            self._last_loss_parts = {name: float(value.detach()) for name, (_, value) in parts.items()}
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict, *args, **kwargs) -> None:
        """Adds the latest value of each loss part (`loss_kd`, `loss_hard`, ...) to the training logs."""
        parts = getattr(self, "_last_loss_parts", None)
        if parts and "loss" in logs:
            logs.update({f"loss_{name}": round(value, 4) for name, value in parts.items()})
        super().log(logs, *args, **kwargs)
