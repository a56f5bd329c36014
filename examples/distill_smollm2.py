"""SmolLM2-135M-Instruct: remove decoder layers (block influence), then recover by distilling from the dense model on
WikiText-2 validation text. Pass --cache-k to precompute the teacher's top-k logits once and train without it.

    python examples/distill_smollm2.py --output smollm2-24l-distilled --drop-layers 6 --steps 100
"""

import argparse

from transformers import AutoModelForCausalLM, AutoTokenizer

from optimum_agentos import DistillationConfig, DistillationTrainer, Pruner, PruningConfig, precompute_teacher_topk
from optimum_agentos.distillation.tasks import lm_dataset
from optimum_agentos.evaluation import perplexity
from optimum_agentos.models import resolve_model


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--output", default="smollm2-distilled")
    parser.add_argument("--drop-layers", type=int, default=6)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--cache-k", type=int, default=None)
    args = parser.parse_args()

    source = resolve_model("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(source)
    teacher = AutoModelForCausalLM.from_pretrained(source).eval()
    student = Pruner.from_pretrained(source).prune_in_place(
        PruningConfig(method=None, layers=args.drop_layers), "wikitext2", num_samples=16, seq_len=512
    )
    print(f"student before: WikiText-2 ppl {perplexity(student, tokenizer, num_windows=16):.2f}")

    train = lm_dataset(tokenizer, "wikitext2", "validation", seq_len=256, num_windows=4 * args.steps)
    if args.cache_k:
        train = precompute_teacher_topk(teacher, train, k=args.cache_k)
    trainer = DistillationTrainer(
        model=student, teacher_model=None if args.cache_k else teacher, train_dataset=train,
        processing_class=tokenizer,
        args=DistillationConfig(output_dir=args.output, max_steps=args.steps, per_device_train_batch_size=4,
                                learning_rate=1e-4, alpha_kd=1.0, alpha_ce=0.0, temperature=1.0, save_strategy="no",
                                report_to=[], logging_steps=10),
    )
    trainer.train()
    print(f"student after: WikiText-2 ppl {perplexity(student.eval(), tokenizer, num_windows=16):.2f}")
    trainer.save_model(args.output)


if __name__ == "__main__":
    main()
