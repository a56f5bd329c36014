"""The teacher's placement in one process and the DeepSpeed config it gets (the launched runs are in
test_distributed.py)."""

import pytest

from optimum_agentos.distillation import DistillationConfig, DistillationTrainer, make_student
from optimum_agentos.distillation.placement import teacher_deepspeed_config

from .test_trainer import lm_data, tiny_llama


TRAINING = {
    "optimizer": {"type": "AdamW", "params": {"lr": "auto"}}, "scheduler": {"type": "WarmupLR"},
    "train_micro_batch_size_per_gpu": 4, "bf16": {"enabled": True},
    "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                          "stage3_param_persistence_threshold": "auto", "overlap_comm": True},
}


def test_zero3_teacher_keeps_stage_3_without_optimizer_and_sizes_its_auto_buckets():
    config = teacher_deepspeed_config(TRAINING, hidden_size=64)
    assert "optimizer" not in config and "scheduler" not in config
    assert config["zero_optimization"] == {"stage": 3, "reduce_bucket_size": 4096, "stage3_prefetch_bucket_size": 3686,
                                           "stage3_param_persistence_threshold": 640, "overlap_comm": True}
    assert config["bf16"] == {"enabled": True} and config["train_micro_batch_size_per_gpu"] == 4
    assert TRAINING["zero_optimization"]["reduce_bucket_size"] == "auto" and "optimizer" in TRAINING  # not modified


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_stages_that_do_not_partition_parameters_run_the_teacher_as_stage_0(stage):
    config = teacher_deepspeed_config({**TRAINING, "zero_optimization": {"stage": stage, "overlap_comm": True}}, 64)
    assert config["zero_optimization"] == {"stage": 0}


def test_auto_bucket_without_a_hidden_size_names_the_setting():
    with pytest.raises(ValueError, match="zero_optimization.reduce_bucket_size='auto'"):
        teacher_deepspeed_config(TRAINING, hidden_size=None)


def test_one_process_teacher_is_frozen_on_the_device_and_not_handed_to_the_accelerator(tmp_path):
    teacher = tiny_llama(layers=4)
    args = DistillationConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=1,
                              per_device_train_batch_size=4)
    trainer = DistillationTrainer(model=make_student(teacher, num_layers=2), teacher_model=teacher, args=args,
                                  train_dataset=lm_data(n=8))
    assert trainer.teacher is teacher and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    # Only the student is the accelerator's: evaluate() before train() prepares it, checkpoints hold it alone.
    assert trainer.accelerator._models == []
    trainer.train()
    assert [m is trainer.model for m in trainer.accelerator._models] == [True]
