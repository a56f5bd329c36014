"""Run by test_distributed.py under `accelerate launch --num_processes 2` (and in one process for reference):
distills a tiny BERT student and writes its final weights from the main process."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from safetensors.torch import save_file  # noqa: E402

from optimum_agentos.distillation import DistillationConfig, DistillationTrainer, make_student  # noqa: E402
from tests.distillation.test_trainer import classification_data, tiny_bert  # noqa: E402


def main(out: str, per_device_batch: int) -> None:
    teacher = tiny_bert(4)
    student = make_student(teacher, num_layers=2)
    args = DistillationConfig(
        output_dir=str(Path(out).parent / "trainer"), max_steps=4, per_device_train_batch_size=per_device_batch,
        learning_rate=2e-3, report_to=[], save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True,
        lr_scheduler_type="constant", alpha_kd=0.7, dataloader_drop_last=True,
    )
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args,
                                  train_dataset=classification_data(teacher))
    trainer.train()
    if trainer.accelerator.is_main_process:
        state = {k: v.contiguous() for k, v in trainer.accelerator.unwrap_model(trainer.model).state_dict().items()}
        save_file(state, out, metadata={"world_size": str(trainer.accelerator.num_processes)})


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
