"""Distill SmolLM2-135M-Instruct into a student with fewer layers on several processes or machines: the same script
runs under DDP, FSDP2 or DeepSpeed ZeRO-3, chosen by the accelerate config it is launched with. The teacher is
sharded like the student (FSDP2, ZeRO-3) or kept whole on each process (DDP).

    accelerate launch --config_file examples/accelerate/fsdp2.yaml examples/distill_sharded.py --output out
    accelerate launch --config_file examples/accelerate/zero3.yaml examples/distill_sharded.py --output out
    accelerate launch --multi_gpu --num_processes 2 examples/distill_sharded.py --output out     # DDP
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 examples/distill_sharded.py  # DDP, CPU, gloo
"""

import argparse

from transformers import AutoModelForCausalLM, AutoTokenizer

from optimum_agentos import DistillationConfig, DistillationTrainer, make_student
from optimum_agentos.distillation.tasks import lm_dataset
from optimum_agentos.models import resolve_model


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--teacher", default="smollm2-135m")
    parser.add_argument("--output", default="smollm2-sharded-student")
    parser.add_argument("--student-layers", type=int, default=15)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4, help="Windows per process and step.")
    args = parser.parse_args()

    config = DistillationConfig(
        output_dir=args.output, max_steps=args.steps, per_device_train_batch_size=args.batch, learning_rate=1e-4,
        alpha_kd=1.0, alpha_ce=0.0, temperature=1.0, save_strategy="no", report_to=[], logging_steps=10,
    )
    source = resolve_model(args.teacher)
    tokenizer = AutoTokenizer.from_pretrained(source)
    teacher = AutoModelForCausalLM.from_pretrained(source)
    student = make_student(teacher, num_layers=args.student_layers)
    windows = args.steps * args.batch * config.world_size
    train = lm_dataset(tokenizer, "wikitext2", "validation", seq_len=args.seq_len, num_windows=windows)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=config, train_dataset=train,
                                  processing_class=tokenizer)
    trainer.train()
    trainer.save_model(args.output)  # gathers the sharded student; written by the main process


if __name__ == "__main__":
    main()
