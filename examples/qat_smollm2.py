"""SmolLM2-135M-Instruct int4 g128: quantize with GPTQ (or load any agentos checkpoint), then quantization-aware
training distilled from the float model on WikiText-2 validation text, saved as a normal agentos checkpoint.

    python examples/qat_smollm2.py --output smollm2-int4-qat --steps 100
    python examples/qat_smollm2.py --start smollm2-int4-gptq --output smollm2-int4-qat   # from a saved checkpoint
"""

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from optimum_agentos import AgentOSConfig, DistillationConfig, DistillationTrainer, QATCallback, Quantizer, prepare_qat
from optimum_agentos.distillation.tasks import lm_dataset
from optimum_agentos.evaluation import perplexity
from optimum_agentos.models import resolve_model


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--output", default="smollm2-int4-qat")
    parser.add_argument("--start", default=None, help="An agentos checkpoint to start from (default: GPTQ now).")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=5e-5)
    args = parser.parse_args()

    source = resolve_model("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(source)
    teacher = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    if args.start:
        student = AutoModelForCausalLM.from_pretrained(args.start, dtype=torch.float32)
    else:
        student = Quantizer.from_pretrained(source).quantize_in_place(
            AgentOSConfig(bits=4, group_size=128, method="gptq"), "wikitext2", num_samples=64, seq_len=512
        )
    print(f"start: WikiText-2 ppl {perplexity(student, tokenizer, num_windows=16):.2f}")

    prepare_qat(student, scale_mode="learned")
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, processing_class=tokenizer, callbacks=[QATCallback()],
        train_dataset=lm_dataset(tokenizer, "wikitext2", "validation", seq_len=512, num_windows=args.steps),
        args=DistillationConfig(output_dir=args.output, max_steps=args.steps, per_device_train_batch_size=1,
                                learning_rate=args.lr, alpha_kd=0.5, temperature=1.0, save_strategy="no",
                                report_to=[], logging_steps=10),
    )
    trainer.train()  # QATCallback packs the model back into agentos layers at the end
    print(f"after QAT: WikiText-2 ppl {perplexity(student.eval(), tokenizer, num_windows=16):.2f}")
    trainer.save_model(args.output)
    tokenizer.save_pretrained(args.output)


if __name__ == "__main__":
    main()
