"""Distillation benchmark: a 3-layer MiniLM student on SST-2, a depth-pruned SmolLM2 student on WikiText-2, and the
training throughput with the teacher loaded vs from a top-k cache.

Every row runs in its own fresh process, one after the other (the teacher and pruned student are handed over through
a work folder); the tables go to BENCHMARKS.md.

    python benchmarks/distillation.py                  # all rows (about 40 minutes on 2 cores)
    python benchmarks/distillation.py --sst2-steps 200 --lm-steps 10 --eval-windows 4     # a quick smoke run
    python benchmarks/distillation.py --render-only    # BENCHMARKS.md section from benchmarks/results/distillation.json
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

from common import add_row_runner_arguments, load_for_render, peak_rss_mib, publish, run_meta, run_rows, run_worker

MARK_BEGIN, MARK_END = "<!-- distillation:begin -->", "<!-- distillation:end -->"
ROWS = ["sst2-teacher", "sst2-student-plain", "sst2-student-kd", "lm-student", "lm-student-kd", "lm-student-plain",
        "throughput"]


def _sst2(tokenizer, args):
    from transformers import DataCollatorWithPadding

    from optimum_agentos.distillation.tasks import classification_dataset

    train = classification_dataset(tokenizer, "sst2", "train", 64, seed=0)
    dev = classification_dataset(tokenizer, "sst2", "validation", 64)
    return train, dev, DataCollatorWithPadding(tokenizer)


def _training_args(args, out, steps, lr, batch, **extra):
    from optimum_agentos.distillation import DistillationConfig

    return DistillationConfig(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=batch, learning_rate=lr,
        warmup_steps=max(steps // 20, 1), lr_scheduler_type="linear", weight_decay=0.01, save_strategy="no",
        report_to=[], use_cpu=True, seed=0, logging_steps=max(steps // 10, 1), disable_tqdm=True, **extra,
    )


def worker(row: str, args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, Trainer

    from optimum_agentos.distillation import DistillationTrainer, make_student, precompute_teacher_topk
    from optimum_agentos.distillation.tasks import accuracy, lm_dataset
    from optimum_agentos.evaluation import perplexity
    from optimum_agentos.models import resolve_model

    torch.manual_seed(0)
    work = Path(args.work)
    result = {"row": row}
    if row.startswith("sst2"):
        tokenizer = AutoTokenizer.from_pretrained(resolve_model("minilm-l6"))
        train, dev, collator = _sst2(tokenizer, args)
        if row == "sst2-teacher":
            model = AutoModelForSequenceClassification.from_pretrained(resolve_model("minilm-l6"), num_labels=2)
            trainer = Trainer(model=model, train_dataset=train, data_collator=collator,
                              args=_training_args(args, work / "t", args.sst2_steps, args.sst2_lr, 32))
        else:
            teacher = AutoModelForSequenceClassification.from_pretrained(work / "sst2-teacher").eval()
            model = make_student(teacher, num_layers=3)
            if row == "sst2-student-plain":
                trainer = Trainer(model=model, train_dataset=train, data_collator=collator,
                                  args=_training_args(args, work / "s", args.sst2_steps, args.sst2_lr, 32))
            else:
                trainer = DistillationTrainer(
                    model=model, teacher_model=teacher, train_dataset=train, data_collator=collator,
                    args=_training_args(args, work / "s", args.sst2_steps, args.sst2_lr, 32,
                                        temperature=args.sst2_temperature, alpha_kd=args.sst2_alpha_kd,
                                        hidden_loss_weight=args.sst2_hidden_weight, hidden_loss="cosine"),
                )
        out = trainer.train()
        result.update(steps=out.global_step, train_s=out.metrics["train_runtime"], params=model.num_parameters(),
                      accuracy=accuracy(model, dev, collator), dev_examples=len(dev),
                      peak_rss_mib=peak_rss_mib())
        if row == "sst2-teacher":
            model.save_pretrained(work / "sst2-teacher")
        return result

    source = resolve_model("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(source)
    teacher = AutoModelForCausalLM.from_pretrained(source).eval()

    def ppl(model):
        return perplexity(model.eval(), tokenizer, "wikitext2", "test", 512, args.eval_windows)

    if row == "lm-student":
        from optimum_agentos import Pruner, PruningConfig

        pruner = Pruner(teacher, tokenizer)
        model = pruner.prune_in_place(PruningConfig(method=None, layers=args.lm_drop_layers), "wikitext2",
                                      num_samples=16, seq_len=512)
        model.save_pretrained(work / "lm-student")
        result.update(params=model.num_parameters(), layers=model.config.num_hidden_layers, ppl=ppl(model),
                      teacher_ppl=ppl(AutoModelForCausalLM.from_pretrained(source)))
        return result

    student = AutoModelForCausalLM.from_pretrained(work / "lm-student")
    windows = args.lm_steps * args.lm_batch
    train = lm_dataset(tokenizer, "wikitext2", "validation", args.lm_seq_len, max(args.lm_steps, 6) * args.lm_batch)
    if row == "throughput":
        steps = 6
        small = train.select(range(steps * args.lm_batch))
        timing = {}
        for mode in ("teacher", "cache"):
            data, teacher_model = small, teacher
            if mode == "cache":
                start = time.perf_counter()
                data = precompute_teacher_topk(teacher, small, k=64, batch_size=args.lm_batch)
                timing["cache_build_s"] = time.perf_counter() - start
                teacher_model = None
            trainer = DistillationTrainer(model=student, teacher_model=teacher_model, train_dataset=data,
                                          args=_training_args(args, work / "x", steps, 1e-5, args.lm_batch))
            out = trainer.train()
            timing[f"{mode}_steps_per_s"] = out.global_step / out.metrics["train_runtime"]
        result.update(timing, ratio=timing["cache_steps_per_s"] / timing["teacher_steps_per_s"], steps=steps,
                      k=64, batch=args.lm_batch, seq_len=args.lm_seq_len)
        return result
    training = _training_args(args, work / "lm", args.lm_steps, args.lm_lr, args.lm_batch,
                              temperature=1.0, alpha_kd=1.0, alpha_ce=0.0)
    if row == "lm-student-kd":
        trainer = DistillationTrainer(model=student, teacher_model=teacher, train_dataset=train, args=training)
    else:
        trainer = Trainer(model=student, train_dataset=train, args=training)
    out = trainer.train()
    result.update(steps=out.global_step, train_s=out.metrics["train_runtime"], ppl=ppl(student),
                  peak_rss_mib=peak_rss_mib(), tokens=windows * args.lm_seq_len)
    return result


def binomial_se(p: float, n: int) -> float:
    """Standard error of an accuracy p measured on n examples: sqrt(p (1 - p) / n)."""
    return math.sqrt(p * (1 - p) / n)


def write_markdown(results: list[dict], args, meta: dict) -> str:
    by = {r["row"]: r for r in results}
    lines = [
        MARK_BEGIN,
        "## Distillation",
        "",
        f"Written by `python benchmarks/distillation.py` on {meta['date']}, {meta['cpu_count']} CPU cores. "
        "Each row is a fresh process.",
        "",
    ]
    if "sst2-teacher" in by:
        t = by["sst2-teacher"]
        lines += [
            f"### GLUE SST-2 (dev, {t['dev_examples']} sentences)",
            "",
            f"Teacher: all-MiniLM-L6-v2 (6 layers) with a classification head, fine-tuned {args.sst2_steps} steps of "
            f"batch 32 (AdamW, lr {args.sst2_lr}, linear decay, max 64 tokens). Students: 3 layers made by "
            f"`make_student` (teacher layers 0, 2, 4), the same {args.sst2_steps} steps, data order and learning "
            f"rate; `kd` adds the teacher's soft labels (temperature {args.sst2_temperature}, alpha_kd "
            f"{args.sst2_alpha_kd}, hard labels x {1 - args.sst2_alpha_kd:g}, cosine hidden-state loss x "
            f"{args.sst2_hidden_weight:g} on student layers 1-3 to teacher layers 2, 4, 6).",
            "",
            "| model | layers | params | dev accuracy ± se | vs teacher (points) | train time (s) |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        se = {}
        for row, layers in (("sst2-teacher", 6), ("sst2-student-plain", 3), ("sst2-student-kd", 3)):
            if row in by:
                r = by[row]
                se[row] = binomial_se(r["accuracy"], r["dev_examples"])
                lines.append(f"| {row} | {layers} | {r['params'] / 1e6:.1f}M | {100 * r['accuracy']:.2f} ± "
                             f"{100 * se[row]:.2f} | {100 * (r['accuracy'] - t['accuracy']):+.2f} | {r['train_s']:.0f} |")
        gaps = [(a, b) for a, b in (("sst2-student-kd", "sst2-student-plain"), ("sst2-student-plain", "sst2-teacher"),
                                    ("sst2-student-kd", "sst2-teacher")) if a in by and b in by]
        notes = []
        for a, b in gaps:
            gap = 100 * (by[a]["accuracy"] - by[b]["accuracy"])
            two_se = 200 * math.sqrt(se[a] ** 2 + se[b] ** 2)
            notes.append(f"{a} - {b}: {gap:+.2f} points, " + ("noise" if abs(gap) < two_se else "beyond noise")
                         + f" (2 se of the difference: {two_se:.2f})")
        lines += [
            "",
            "se: the binomial standard error of an accuracy p on n examples, sqrt(p (1 - p) / n), in points. A gap "
            "is called noise when it is within 2 standard errors of the difference, 2 sqrt(se_a^2 + se_b^2) "
            "(the two models' errors treated as independent; one training run per row, so seed-to-seed variation "
            "comes on top). " + "; ".join(notes) + ".",
        ]
    if "lm-student" in by:
        s = by["lm-student"]
        gap = s["ppl"] - s["teacher_ppl"]
        lines += [
            "",
            "### SmolLM2-135M-Instruct, depth-pruned student",
            "",
            f"Student: the teacher with {args.lm_drop_layers} of its 30 decoder layers removed by block influence "
            f"(`PruningConfig(method=None, layers={args.lm_drop_layers})`, 16 x 512 calibration windows). Training on "
            f"WikiText-2 *validation* windows ({args.lm_steps} steps of {args.lm_batch} x {args.lm_seq_len} tokens, "
            f"AdamW lr {args.lm_lr}, linear decay); `kd` = forward KL to the dense teacher at temperature 1, `plain` = "
            f"next-token cross-entropy, same steps and data. Perplexity: WikiText-2 raw test, first "
            f"{args.eval_windows} windows of 512 tokens (the core protocol uses 64; the teacher is measured the same "
            f"way here). Gap recovered = (student - after) / (student - teacher).",
            "",
            "| model | params | WikiText-2 ppl | gap recovered | train time (s) | peak RSS (MiB) |",
            "|---|---:|---:|---:|---:|---:|",
            f"| teacher (dense) | - | {s['teacher_ppl']:.2f} | - | - | - |",
            f"| student before training | {s['params'] / 1e6:.1f}M | {s['ppl']:.2f} | 0 | - | - |",
        ]
        for row in ("lm-student-kd", "lm-student-plain"):
            if row in by:
                r = by[row]
                lines.append(f"| {row} | {s['params'] / 1e6:.1f}M | {r['ppl']:.2f} | {(s['ppl'] - r['ppl']) / gap:.3f} | "
                             f"{r['train_s']:.0f} | {r['peak_rss_mib']:.0f} |")
    if "throughput" in by:
        r = by["throughput"]
        lines += [
            "",
            "### Teacher loaded vs top-k cache",
            "",
            f"Training steps per second of the depth-pruned SmolLM2 student ({r['steps']} steps of {r['batch']} x "
            f"{r['seq_len']} tokens): with the teacher run every step, and from a cache of the teacher's top-{r['k']} "
            f"logits built once beforehand (`precompute_teacher_topk`, {r['cache_build_s']:.0f} s for these windows).",
            "",
            "| teacher loaded (steps/s) | top-k cache (steps/s) | cache / teacher |",
            "|---:|---:|---:|",
            f"| {r['teacher_steps_per_s']:.3f} | {r['cache_steps_per_s']:.3f} | {r['ratio']:.2f}x |",
        ]
    lines += ["", "Raw results: `benchmarks/results/distillation.json`.", MARK_END]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="*", default=ROWS, choices=ROWS)
    parser.add_argument("--sst2-steps", type=int, default=800)
    parser.add_argument("--sst2-lr", type=float, default=1e-4)
    parser.add_argument("--sst2-temperature", type=float, default=2.0)
    parser.add_argument("--sst2-alpha-kd", type=float, default=0.7)
    parser.add_argument("--sst2-hidden-weight", type=float, default=1.0)
    parser.add_argument("--lm-drop-layers", type=int, default=6)
    parser.add_argument("--lm-steps", type=int, default=60)
    parser.add_argument("--lm-batch", type=int, default=4)
    parser.add_argument("--lm-seq-len", type=int, default=256)
    parser.add_argument("--lm-lr", type=float, default=1e-4)
    parser.add_argument("--eval-windows", type=int, default=32)
    add_row_runner_arguments(parser, "distillation")
    parser.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if run_worker(args, worker):
        return
    options = ["sst2_steps", "sst2_lr", "sst2_temperature", "sst2_alpha_kd", "sst2_hidden_weight", "lm_drop_layers",
               "lm_steps", "lm_batch", "lm_seq_len", "lm_lr", "eval_windows"]
    if args.render_only:
        results, meta = load_for_render("distillation")
        args = argparse.Namespace(**meta["args"])
        publish("distillation", results, write_markdown(results, args, meta), MARK_BEGIN, MARK_END, meta)
        return
    with tempfile.TemporaryDirectory() as work:
        passthrough = ["--work", work]
        for name in options:
            passthrough += ["--" + name.replace("_", "-"), str(getattr(args, name))]
        results = run_rows(__file__, args.rows, passthrough)
    meta = run_meta(args, options)
    publish("distillation", results, write_markdown(results, args, meta), MARK_BEGIN, MARK_END, meta)


if __name__ == "__main__":
    main()
