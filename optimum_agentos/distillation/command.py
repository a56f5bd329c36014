"""`optimum-agentos distill`: the task's data, a student, `DistillationTrainer`, evaluation, a saved folder with card.

Options are `DistillArguments` plus every `DistillationConfig` (`TrainingArguments`) field, parsed by
`HfArgumentParser`, so `--learning_rate`, `--max_steps`, `--gradient_accumulation_steps`, ... all work.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from transformers.utils import logging

from .tasks import CLASSIFICATION_TASKS, LM_TASKS


logger = logging.get_logger(__name__)


@dataclass
class DistillArguments:
    """What to distill: models, task, data sizes, evaluation."""

    teacher: str = field(default="smollm2-135m", metadata={"help": "Teacher: local folder, Hub id or alias."})
    task: str = field(default="wikitext2", metadata={"help": f"One of {', '.join(CLASSIFICATION_TASKS + LM_TASKS)}."})
    student: str | None = field(default=None, metadata={"help": "Student folder or Hub id (else --student_layers)."})
    student_layers: int | None = field(
        default=None, metadata={"help": "Make the student from the teacher with this many evenly spaced layers."}
    )
    teacher_finetune_steps: int = field(
        default=0, metadata={"help": "Classification: first fine-tune the teacher on the task for this many steps."}
    )
    train_split: str | None = field(
        default=None, metadata={"help": "Training split (default: train; wikitext2: validation, the test stays unseen)."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Rows (classification) or windows (LM)."})
    max_length: int = field(default=64, metadata={"help": "Classification: max tokens per example."})
    seq_len: int = field(default=512, metadata={"help": "Language modelling: window length for training and eval."})
    eval_windows: int = field(default=16, metadata={"help": "Language modelling: WikiText-2 test windows to evaluate."})
    teacher_cache_k: int | None = field(
        default=None, metadata={"help": "Precompute the teacher's top-k logits once and train from that cache."}
    )
    lora_r: int | None = field(default=None, metadata={"help": "Train LoRA adapters of this rank instead (PEFT)."})
    overwrite: bool = field(default=False, metadata={"help": "Replace a non-empty output_dir."})


def _classification(args, dargs, config, tokenizer):
    from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding, Trainer, TrainingArguments

    from .tasks import accuracy, classification_dataset

    train = classification_dataset(tokenizer, dargs.task, dargs.train_split or "train", dargs.max_length,
                                   dargs.max_train_samples, seed=config.seed)
    dev = classification_dataset(tokenizer, dargs.task, "validation", dargs.max_length)
    collator = DataCollatorWithPadding(tokenizer)
    teacher = AutoModelForSequenceClassification.from_pretrained(args["teacher_path"], num_labels=2)
    if dargs.teacher_finetune_steps:
        logger.warning(f"Fine-tuning the teacher on {dargs.task} for {dargs.teacher_finetune_steps} steps")
        teacher_args = TrainingArguments(
            output_dir=str(Path(config.output_dir) / "teacher"), max_steps=dargs.teacher_finetune_steps,
            per_device_train_batch_size=config.per_device_train_batch_size, learning_rate=config.learning_rate,
            warmup_steps=config.warmup_steps, seed=config.seed, save_strategy="no", report_to=[],
            use_cpu=config.use_cpu, logging_steps=config.logging_steps, disable_tqdm=config.disable_tqdm,
        )
        Trainer(model=teacher, args=teacher_args, train_dataset=train, data_collator=collator).train()
    return dict(teacher=teacher, train=train, collator=collator, auto_class="AutoModelForSequenceClassification",
                pipeline="text-classification", evaluate=lambda m: accuracy(m, dev, collator), metric="accuracy",
                split="validation", dataset_type="glue", datasets=["nyu-mll/glue"])


def _language_model(args, dargs, config, tokenizer):
    from transformers import AutoModelForCausalLM, default_data_collator

    from ..evaluation import perplexity
    from .tasks import lm_dataset

    train = lm_dataset(tokenizer, dargs.task, dargs.train_split or "validation", dargs.seq_len, dargs.max_train_samples)
    teacher = AutoModelForCausalLM.from_pretrained(args["teacher_path"])
    return dict(teacher=teacher, train=train, collator=default_data_collator, auto_class="AutoModelForCausalLM",
                pipeline="text-generation", metric="perplexity", split="test", dataset_type="wikitext",
                datasets=["wikitext"],
                evaluate=lambda m: perplexity(m.eval(), tokenizer, dargs.task, "test", dargs.seq_len, dargs.eval_windows))


def run_distill(argv: list[str]) -> dict:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, HfArgumentParser

    from ..formats.folder import check_save_dir, folder_size, save_model_folder
    from ..hub.card import write_card
    from ..models import resolve_model
    from .cache import precompute_teacher_topk
    from .config import DistillationConfig
    from .student import make_student
    from .trainer import DistillationTrainer

    parser = HfArgumentParser((DistillArguments, DistillationConfig), prog="optimum-agentos distill")
    dargs, config = parser.parse_args_into_dataclasses(argv)
    if dargs.task not in CLASSIFICATION_TASKS + LM_TASKS:
        raise SystemExit(f"error: unknown task {dargs.task!r}; known: {', '.join(CLASSIFICATION_TASKS + LM_TASKS)}.")
    if (dargs.student is None) == (dargs.student_layers is None):
        raise SystemExit("error: pass exactly one of --student (a model) or --student_layers (made from the teacher).")
    output = Path(config.output_dir)
    try:
        check_save_dir(output, dargs.overwrite, carry_over=_trainer_output)
    except FileExistsError as err:
        raise SystemExit(f"error: {err}".replace("overwrite=True (CLI: --overwrite)", "--overwrite True")) from None
    start = time.perf_counter()
    teacher_path = resolve_model(dargs.teacher)
    tokenizer = AutoTokenizer.from_pretrained(teacher_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    build = _classification if dargs.task in CLASSIFICATION_TASKS else _language_model
    job = build({"teacher_path": teacher_path}, dargs, config, tokenizer)
    teacher = job["teacher"].eval()
    if dargs.student_layers is not None:
        student = make_student(teacher, num_layers=dargs.student_layers)
    else:
        auto = AutoModelForSequenceClassification if job["pipeline"] == "text-classification" else AutoModelForCausalLM
        student = auto.from_pretrained(resolve_model(dargs.student))
    results = {"teacher": job["evaluate"](teacher), "student_before": job["evaluate"](student)}
    train = job["train"]
    peft_config = None
    if dargs.lora_r:
        from peft import LoraConfig, TaskType

        task_type = TaskType.SEQ_CLS if job["pipeline"] == "text-classification" else TaskType.CAUSAL_LM
        peft_config = LoraConfig(r=dargs.lora_r, lora_alpha=2 * dargs.lora_r, target_modules="all-linear",
                                 task_type=task_type)
    teacher_for_trainer = teacher
    if dargs.teacher_cache_k:
        train = precompute_teacher_topk(teacher, train, k=dargs.teacher_cache_k, data_collator=None
                                        if job["pipeline"] == "text-generation" else job["collator"])
        teacher_for_trainer = None
    trainer = DistillationTrainer(model=student, teacher_model=teacher_for_trainer, args=config, train_dataset=train,
                                  data_collator=job["collator"], processing_class=tokenizer, peft_config=peft_config)
    trained = trainer.train()
    model = trainer.model.merge_and_unload() if dargs.lora_r else trainer.model
    results["student_after"] = job["evaluate"](model)
    params = {"teacher": teacher.num_parameters(), "student": model.num_parameters()}
    loss = (f"temperature {config.temperature}, KD loss {config.kd_loss} x {config.alpha_kd}, hard-label loss x "
            f"{config.alpha_ce}" + (f", hidden-state {config.hidden_loss} x {config.hidden_loss_weight}"
                                    if config.hidden_loss_weight else "")
            + f"; {trained.global_step} steps of batch {config.per_device_train_batch_size}.")
    info = dict(
        kind="distilled", teacher=dargs.teacher, task=dargs.task, pipeline=job["pipeline"], auto_class=job["auto_class"], loss=loss,
        params=params, datasets=job["datasets"],
        command="optimum-agentos distill " + " ".join(shlex.quote(a) for a in argv),
        results=[{"task": dargs.task, "metric": job["metric"], "split": job["split"], "baseline": results["teacher"],
                  "compressed": results["student_after"], "dataset_type": job["dataset_type"]}],
    )

    summary = {
        "output": str(output), "task": dargs.task, "metric": job["metric"], "teacher": round(results["teacher"], 4),
        "student_before": round(results["student_before"], 4), "student_after": round(results["student_after"], 4),
        "teacher_params": params["teacher"], "student_params": params["student"], "steps": trained.global_step,
        "train_seconds": round(trained.metrics.get("train_runtime", 0.0), 1),
    }

    def extra(folder):
        write_card(folder, info)
        summary["size_mb"] = round(folder_size(folder) / 1e6, 1)
        summary["total_seconds"] = round(time.perf_counter() - start, 1)
        Path(folder, "agentos_summary.json").write_text(json.dumps(summary, indent=2))

    # The Trainer's own outputs in output_dir (checkpoint-N for resume_from_checkpoint, logs) stay beside the model.
    save_model_folder(model, tokenizer, output, overwrite=dargs.overwrite, extra=extra, carry_over=_trainer_output)
    return summary


def _trainer_output(name: str) -> bool:
    """Entries `transformers.Trainer` writes into its `output_dir`."""
    return name.startswith(("checkpoint-", "runs", "trainer_state", "training_args")) or name == "all_results.json"


if __name__ == "__main__":
    print(json.dumps(run_distill(sys.argv[1:]), indent=2))
