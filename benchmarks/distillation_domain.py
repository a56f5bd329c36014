"""When does distillation pay? A depth-pruned SmolLM2 student trained on text from another domain than the evaluation.

`benchmarks/distillation.py` trains the student on WikiText-2 validation and scores it on WikiText-2 test: the
training text is the evaluation's domain, so plain cross-entropy wins (it fits the domain; the teacher only adds its
own errors). Users rarely have that luck: they fine-tune on the text they own (reviews, tickets, chat) and still
expect the model to keep its general ability. Here the training text is GLUE SST-2 *train* sentences (movie
reviews, lower-cased and tokenized, one per line), and the student is scored on what it was not trained on:
WikiText-2 test perplexity and zero-shot ARC-Easy and LAMBADA (lm-eval), plus the perplexity on held-out SST-2 *dev*
sentences (the training domain) to show what each loss buys there.

Rows (each a fresh process, one after the other):
- `teacher`: the dense SmolLM2-135M-Instruct (30 layers).
- `student`: the teacher with `--drop-layers` decoder layers removed by block influence (as distillation.py does),
  before training.
- `ce`: next-token cross-entropy on the SST-2 text (`transformers.Trainer`).
- `kd`: forward KL to the teacher at temperature 1 (`DistillationTrainer`, alpha_kd=1, alpha_ce=0).
- `kd+ce`: KD at temperature 1 plus cross-entropy, 0.5 each.
- `kd+ce-t2`: the `DistillationConfig` defaults before this study (temperature 2, alpha_kd 0.5, alpha_ce 0.5).
Same steps, data order, batch, learning rate and schedule in every training row.

    python benchmarks/distillation_domain.py                # every row (about 45 minutes on 2 cores)
    python benchmarks/distillation_domain.py --rows student kd --steps 2 --batch 1 --eval-windows 1 \
        --sst2-windows 1 --zero-shot-limit 4 --no-publish                                       # a smoke run
    python benchmarks/distillation_domain.py --render-only
"""

from __future__ import annotations

import argparse
import math
import subprocess
import tempfile
from pathlib import Path

from common import (add_row_runner_arguments, load_for_render, merge_with_saved, peak_rss_mib, publish, run_meta,
                    run_rows, run_worker)

NAME = "distillation_domain"
MARK_BEGIN, MARK_END = f"<!-- {NAME}:begin -->", f"<!-- {NAME}:end -->"
LOSSES = {  # training row -> DistillationConfig loss settings (None: plain cross-entropy with transformers.Trainer)
    "ce": None,
    "kd": dict(temperature=1.0, alpha_kd=1.0, alpha_ce=0.0),
    "kd+ce": dict(temperature=1.0, alpha_kd=0.5, alpha_ce=0.5),
    "kd+ce-t2": dict(temperature=2.0, alpha_kd=0.5, alpha_ce=0.5),
}
ROWS = ["teacher", "student", *LOSSES]
ZERO_SHOT = ["arc_easy", "lambada"]


def sst2_text(split: str) -> str:
    """The SST-2 sentences of a split, one per line: the training domain of this study."""
    from optimum_agentos.evaluation.glue import load_glue

    return "\n".join(load_glue("sst2", split)["sentence"])


def evaluate(model, tokenizer, args) -> dict:
    """WikiText-2 test perplexity, SST-2 dev perplexity (the training domain, held out) and zero-shot accuracy."""
    from optimum_agentos.data import tokenize_text
    from optimum_agentos.evaluation import perplexity
    from optimum_agentos.evaluation.perplexity import perplexity_from_ids
    from optimum_agentos.evaluation.tasks import evaluate_model

    model.eval()
    out = {"wikitext2_ppl": perplexity(model, tokenizer, "wikitext2", "test", 512, args.eval_windows),
           "sst2_dev_ppl": perplexity_from_ids(model, tokenize_text(tokenizer, sst2_text("validation")),
                                               args.seq_len, args.sst2_windows or None)}
    if args.zero_shot_limit:
        scores = evaluate_model(model, tokenizer, ZERO_SHOT, limit=args.zero_shot_limit, batch_size=8)
        out["zero_shot"] = {r.task: {"acc": r.value, "n": r.n} for r in scores}
    return out


def worker(row: str, args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer

    from optimum_agentos import Pruner, PruningConfig
    from optimum_agentos.distillation import DistillationConfig, DistillationTrainer
    from optimum_agentos.distillation.tasks import lm_dataset_from_text
    from optimum_agentos.models import resolve_model

    torch.manual_seed(0)
    work = Path(args.work)
    source = resolve_model("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(source)
    teacher = AutoModelForCausalLM.from_pretrained(source).eval()
    result = {"row": row}
    if row == "teacher":
        return {**result, "params": teacher.num_parameters(), "layers": teacher.config.num_hidden_layers,
                **evaluate(teacher, tokenizer, args)}
    if row == "student":
        student = Pruner(teacher, tokenizer).prune_in_place(PruningConfig(method=None, layers=args.drop_layers),
                                                            "wikitext2", num_samples=16, seq_len=512)
        student.save_pretrained(work / "student")
        return {**result, "params": student.num_parameters(), "layers": student.config.num_hidden_layers,
                **evaluate(student, tokenizer, args)}
    student = AutoModelForCausalLM.from_pretrained(work / "student")
    train = lm_dataset_from_text(tokenizer, sst2_text("train"), args.seq_len, args.steps * args.batch)
    loss = LOSSES[row]
    training = DistillationConfig(
        output_dir=str(work / row), max_steps=args.steps, per_device_train_batch_size=args.batch,
        learning_rate=args.lr, warmup_steps=max(args.steps // 20, 1), lr_scheduler_type="linear", weight_decay=0.01,
        save_strategy="no", report_to=[], use_cpu=True, seed=0, logging_steps=max(args.steps // 10, 1),
        disable_tqdm=True, **(loss or {}))
    if loss is None:
        trainer = Trainer(model=student, train_dataset=train, args=training)
    else:
        trainer = DistillationTrainer(model=student, teacher_model=teacher, train_dataset=train, args=training)
    out = trainer.train()
    return {**result, "steps": out.global_step, "train_s": out.metrics["train_runtime"],
            "tokens": args.steps * args.batch * args.seq_len, "peak_rss_mib": peak_rss_mib(), "loss": loss,
            **evaluate(student, tokenizer, args)}


def _accuracy(r: dict, task: str) -> str:
    if "zero_shot" not in r:
        return "-"
    acc, n = r["zero_shot"][task]["acc"], r["zero_shot"][task]["n"]
    return f"{acc:.3f} ± {math.sqrt(acc * (1 - acc) / max(n - 1, 1)):.3f}"


def _windows(count) -> str:
    return f"first {count} windows" if count else "every window"


def write_markdown(results: list[dict], meta: dict) -> str:
    args = meta["args"]
    by = {r["row"]: r for r in results}
    lines = [
        MARK_BEGIN,
        "## Distillation where it pays: training text from another domain",
        "",
        f"Written by `python benchmarks/{NAME}.py` on {meta['date']}, {meta['cpu_count']} CPU cores, rows one at a "
        f"time, each a fresh process. Student: SmolLM2-135M-Instruct with {args['drop_layers']} of its 30 decoder "
        "layers removed by block influence (`PruningConfig(method=None)`, 16 WikiText-2 validation windows of 512 to "
        f"rank the layers). Training: {args['steps']} steps of {args['batch']} x {args['seq_len']} tokens of GLUE "
        f"SST-2 *train* sentences (movie reviews, one per line), AdamW lr {args['lr']}, linear decay, the same data "
        "order in every row. Scores on text the student never trained on: WikiText-2 raw test (first "
        f"{args['eval_windows']} windows of 512, no BOS), zero-shot ARC-Easy and LAMBADA (lm-eval, first "
        f"{args['zero_shot_limit']} examples, ± the standard error sqrt(p(1-p)/(n-1))), and the training domain's "
        f"held-out SST-2 *dev* sentences ({_windows(args.get('sst2_windows'))} of {args['seq_len']} tokens). "
        "`kd`: forward KL to the dense teacher; "
        "`kd+ce`: KL and cross-entropy, 0.5 each; `t2`: temperature 2.",
        "",
        "| row | layers | WikiText-2 ppl | " + " | ".join(ZERO_SHOT) + " | SST-2 dev ppl | train time (s) | "
        "peak RSS (MiB) |",
        "|---|---:|---:|" + "---:|" * len(ZERO_SHOT) + "---:|---:|---:|",
    ]
    layers = by.get("student", {}).get("layers", "-")
    for row in ROWS:
        if row not in by:
            continue
        r = by[row]
        train = f"{r['train_s']:.0f} | {r['peak_rss_mib']:.0f}" if "train_s" in r else "- | -"
        lines.append(f"| {row} | {r.get('layers', layers)} | {r['wikitext2_ppl']:.2f} | "
                     + " | ".join(_accuracy(r, t) for t in ZERO_SHOT) + f" | {r['sst2_dev_ppl']:.2f} | {train} |")
    missing = [row for row in ROWS if row not in by]
    if missing:
        lines += ["", f"Not run yet: {', '.join(missing)}."]
    lines += ["", f"Raw results: `benchmarks/results/{NAME}.json`.", MARK_END]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="*", default=ROWS, choices=ROWS)
    parser.add_argument("--drop-layers", type=int, default=6)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--zero-shot-limit", type=int, default=200)
    parser.add_argument("--sst2-windows", type=int, default=0, help="SST-2 dev windows to score (0: all).")
    parser.add_argument("--no-publish", action="store_true", help="Print the section only (smoke runs).")
    add_row_runner_arguments(parser, NAME)
    parser.add_argument("--work", default=None, help="Folder for the student between rows (default: a temporary one; "
                        "give one to run training rows in a later call).")
    args = parser.parse_args()
    if run_worker(args, worker):
        return
    options = ["drop_layers", "steps", "batch", "seq_len", "lr", "eval_windows", "zero_shot_limit", "sst2_windows"]
    if args.render_only:
        results, meta = load_for_render(NAME)
        publish(NAME, results, write_markdown(results, meta), MARK_BEGIN, MARK_END, meta)
        return
    meta = run_meta(args, options)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        passthrough = ["--work", str(work)] + [f"--{o.replace('_', '-')}={getattr(args, o)}" for o in options]
        results = []
        for row in args.rows:  # each saved at once: an interrupted run keeps its finished rows
            if row in LOSSES and not (work / "student").exists():
                raise SystemExit(f"Row {row} needs the student: run the 'student' row first (or pass --work).")
            try:
                fresh = run_rows(__file__, [row], passthrough)
            except subprocess.CalledProcessError as err:
                print(f"== {row} failed: {err}", flush=True)
                continue
            results = results + fresh if args.no_publish else merge_with_saved(NAME, fresh)
            if args.no_publish:
                print(write_markdown(results, meta))
            else:
                publish(NAME, results, write_markdown(results, meta), MARK_BEGIN, MARK_END, meta)


if __name__ == "__main__":
    main()
