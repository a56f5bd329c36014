"""Quantization-aware training (QAT) + distillation of SmolLM2-135M-Instruct int4 g128, from its GPTQ checkpoint.

Rows, each in its own fresh process, one after the other (checkpoints handed over through a work folder):
- `fp32`: the float model's WikiText-2 test perplexity (and zero-shot accuracy with `--zero-shot-limit`);
- `gptq` (or `rtn` with `--start rtn`): quantize int4 g128, save, reload with `from_pretrained`, evaluate: QAT's start;
- `qat-<mode>[-kd]`: `prepare_qat(start, scale_mode=<mode>)`, `DistillationTrainer` (teacher: the fp32 model) with
  `QATCallback` on WikiText-2 *validation* windows of 512 tokens (the calibration text; never the test split) for at
  most `--max-steps` steps or `--train-budget-s` seconds, convert, save, reload with `from_pretrained`, evaluate.

Protocol (BENCHMARKS.md's): WikiText-2 raw test, first `--eval-windows` windows of 512 tokens, no BOS.

    python benchmarks/qat.py                                  # fp32, gptq, qat-learned (about 30 minutes on 2 cores)
    python benchmarks/qat.py --rows gptq qat-frozen qat-learned qat-minmax --start rtn --max-steps 8 \\
        --eval-windows 4 --no-publish                         # a quick comparison of the scale modes
    python benchmarks/qat.py --render-only
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import time
from pathlib import Path

from common import load_for_render, merge_with_saved, peak_rss_mib, publish, run_meta, run_rows

NAME = "qat"
MARK_BEGIN, MARK_END = f"<!-- {NAME}:begin -->", f"<!-- {NAME}:end -->"
ROWS = ["fp32", "gptq", "qat-frozen", "qat-learned", "qat-minmax", "qat-learned-kd"]
# `-kd` rows train on distillation alone (alpha_kd 1, no hard labels), whatever --alpha-kd says: no term fits the
# training text itself, so the row measures how much of the float model's quality QAT recovers
ZERO_SHOT = ["arc_easy", "piqa", "winogrande", "lambada"]


def base_row(row: str) -> str:
    """The row a name stands for: `qat-learned-kd-15min` (a `--row-suffix` run) is a `qat-learned-kd` row."""
    return max((r for r in ROWS if row == r or row.startswith(f"{r}-")), key=len)


def _evaluate(model, tokenizer, args, result: dict) -> None:
    from optimum_agentos.evaluation import perplexity

    start = time.perf_counter()
    result["ppl"] = perplexity(model.eval(), tokenizer, "wikitext2", "test", 512, args.eval_windows)
    if args.zero_shot_limit:
        from optimum_agentos.evaluation.tasks import evaluate_model

        scores = evaluate_model(model, tokenizer, ZERO_SHOT, limit=args.zero_shot_limit, batch_size=8)
        result["zero_shot"] = {r.task: {"acc": r.value, "n": r.n} for r in scores}
    result["eval_s"] = time.perf_counter() - start


def _training_args(args, out, alpha_kd: float):
    from optimum_agentos.distillation import DistillationConfig

    return DistillationConfig(
        output_dir=str(out), max_steps=args.max_steps, per_device_train_batch_size=args.batch,
        learning_rate=args.lr, lr_scheduler_type="constant",  # the Budget callback sets the rate
        weight_decay=0.0, save_strategy="no", report_to=[], use_cpu=True, seed=0,
        logging_steps=10, disable_tqdm=True, temperature=1.0, alpha_kd=alpha_kd,
        kd_chunk_size=512,
    )


def worker(row: str, args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from optimum_agentos import AgentOSConfig
    from optimum_agentos.distillation import DistillationTrainer
    from optimum_agentos.distillation.tasks import lm_dataset
    from optimum_agentos.formats import folder_size
    from optimum_agentos.formats.folder import save_model_folder
    from optimum_agentos.models import resolve_model
    from optimum_agentos.quantization.qat import QATCallback, prepare_qat, qat_layers

    torch.manual_seed(0)
    source = resolve_model("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(source)
    work = Path(args.work)
    result = {"row": row}
    if args.zero_shot_only:  # the zero-shot tasks on the checkpoints an earlier run left in the work folder
        from optimum_agentos.evaluation.tasks import evaluate_model

        folder = source if row == "fp32" else work / ("start" if row == "gptq" else row)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        start = time.perf_counter()
        scores = evaluate_model(model, tokenizer, ZERO_SHOT, limit=args.zero_shot_limit, batch_size=8)
        return {"row": row, "zero_shot": {r.task: {"acc": r.value, "n": r.n} for r in scores},
                "zero_shot_s": time.perf_counter() - start}
    if row == "fp32":
        _evaluate(AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32), tokenizer, args, result)
        return result
    if row == "gptq":
        from optimum_agentos.quantization.quantizer import Quantizer

        config = AgentOSConfig(bits=4, group_size=128, method=args.start)
        quantizer = Quantizer.from_pretrained(source)
        start = time.perf_counter()
        quantizer.quantize(work / "start", config, None if args.start == "rtn" else "wikitext2",
                           num_samples=args.calib_windows, seq_len=512)
        result.update(start=args.start, compress_s=time.perf_counter() - start, calib_windows=args.calib_windows,
                      size_mb=folder_size(work / "start") / 1e6)
        del quantizer
        _evaluate(AutoModelForCausalLM.from_pretrained(work / "start", dtype=torch.float32), tokenizer, args, result)
        return result

    mode = row.split("-")[1]
    alpha_kd = 1.0 if base_row(row).endswith("-kd") else args.alpha_kd
    teacher = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    student = AutoModelForCausalLM.from_pretrained(work / "start", dtype=torch.float32)
    train = lm_dataset(tokenizer, "wikitext2", "validation", 512)  # every window of the split, in order

    class Budget(TrainerCallback):
        """The learning rate follows a cosine over the wall-clock budget (after a short warmup) and training stops
        when the budget is spent, so a slow (shared) machine still ends in time with a decayed learning rate."""

        def on_step_begin(self, a, state, control, optimizer=None, **kwargs):
            done = min((time.perf_counter() - began) / args.train_budget_s, 1.0)
            warm = min((state.global_step + 1) / 5, 1.0)
            for group in optimizer.param_groups:
                group["lr"] = args.lr * warm * 0.5 * (1 + math.cos(math.pi * done))

        def on_step_end(self, a, state, control, **kwargs):
            if time.perf_counter() - began > args.train_budget_s:
                control.should_training_stop = True

    began = time.perf_counter()
    prepare_qat(student, scale_mode=mode)
    trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, train_dataset=train,
                                  args=_training_args(args, work / f"out-{row}", alpha_kd), processing_class=tokenizer,
                                  callbacks=[QATCallback(), Budget()])
    out = trainer.train()
    qat_s = time.perf_counter() - began
    assert not qat_layers(student), "QATCallback converts the model at the end of training"
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h] or [out.training_loss]
    save_model_folder(student, tokenizer, work / row)
    result.update(scale_mode=mode, alpha_kd=alpha_kd, lr=args.lr, train_budget_s=args.train_budget_s, steps=out.global_step, train_s=out.metrics["train_runtime"], qat_s=qat_s,
                  tokens=out.global_step * args.batch * 512, trainable_params=trainable, first_loss=losses[0],
                  last_loss=losses[-1], peak_rss_mib=peak_rss_mib(), size_mb=folder_size(work / row) / 1e6)
    del trainer, student, teacher
    _evaluate(AutoModelForCausalLM.from_pretrained(work / row, dtype=torch.float32), tokenizer, args, result)
    return result


def write_markdown(results: list[dict], meta: dict) -> str:
    args = meta["args"]
    by_row = {r["row"]: r for r in results}
    fp, start = by_row.get("fp32"), by_row.get("gptq")
    start_name = (start or {}).get("start", args["start"])
    lines = [
        MARK_BEGIN,
        "## Quantization-aware training + distillation: SmolLM2-135M-Instruct int4 g128",
        "",
        f"Written by `python benchmarks/{NAME}.py` on {meta['date']}, {meta['cpu_count']} CPU cores (AMD EPYC, "
        "avx2/avx512 with vnni and bf16, no AMX; the first `qat-learned` run shared the cores with other jobs, so its budget bought fewer steps). Start: the int4 g128 "
        f"{start_name.upper()} checkpoint"
        + (f" ({start['calib_windows']} WikiText-2 validation windows of 512; built in {start['compress_s']:.0f} s)"
           if start and start_name != "rtn" else "")
        + f". QAT: `prepare_qat(model, scale_mode=...)`, then `DistillationTrainer` (teacher: the fp32 model, "
        f"temperature 1, alpha_kd as the table says, the rest of the loss on the hard labels) with "
        f"`QATCallback`, AdamW at the row's lr (5 warmup steps, then a cosine over the row's wall-clock training budget), "
        f"batch {args['batch']} x 512 tokens (at most {args['max_steps']} steps), on WikiText-2 **validation** windows (consecutive, "
        "from the start of the split; the same text GPTQ calibrates on, never the test split). Only the quantized "
        "layers train (embeddings, norms and head frozen). The converted model is saved as a normal agentos "
        "checkpoint (same format), reloaded with `AutoModelForCausalLM.from_pretrained` and evaluated: WikiText-2 "
        f"raw test, first {args['eval_windows']} windows of 512 tokens, no BOS. `QAT time` is prepare + train + "
        "convert. Note: with a hard-label weight above 0 the training also fits WikiText itself (the fp32 model was "
        "not fine-tuned on it), so a QAT row below fp32 shows that domain adaptation, not a quantized model better "
        "than its float one; `--alpha-kd 1` (distillation only) measures how much of the float model's quality "
        "the training recovers. The zero-shot table (when run) checks that general ability was not lost.",
        "",
        "| row | alpha_kd | lr | budget (s) | WikiText-2 ppl | ppl / fp32 | vs start | steps | tokens | QAT time (s) | "
        "peak RSS (MiB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(results, key=lambda r: (ROWS.index(base_row(r["row"])), r["row"])):
        rel = f"{r['ppl'] / fp['ppl']:.3f}" if fp else "-"
        vs = f"{r['ppl'] / start['ppl']:.3f}" if start and r["row"].startswith("qat") else "-"
        name = start_name if r["row"] == "gptq" else r["row"]
        if r["row"].startswith("qat"):
            lines.append(f"| {name} | {r.get('alpha_kd', args['alpha_kd']):g} | {r.get('lr', args['lr']):g} | "
                         f"{r.get('train_budget_s', args['train_budget_s'])} | {r['ppl']:.2f} | {rel} | {vs} | "
                         f"{r['steps']} | {r['tokens']} | "
                         f"{r['qat_s']:.0f} | {r['peak_rss_mib']:.0f} |")
        else:
            lines.append(f"| {name} | - | - | - | {r['ppl']:.2f} | {rel} | {vs} | - | - | - | - |")
    shots = [r for r in sorted(results, key=lambda r: (ROWS.index(base_row(r["row"])), r["row"])) if "zero_shot" in r]
    if shots:
        tasks = list(shots[0]["zero_shot"])
        lines += ["", f"Zero-shot accuracy (lm-eval tasks, first {args['zero_shot_limit']} examples of each split; "
                  "± the standard error sqrt(p(1-p)/(n-1)), as lm-eval reports it: a difference inside it is noise):",
                  "", "| row | " + " | ".join(tasks) + " | mean |", "|---|" + "---:|" * (len(tasks) + 1)]
        for r in shots:
            accs = [r["zero_shot"][t]["acc"] for t in tasks]
            errors = [math.sqrt(a * (1 - a) / max(r["zero_shot"][t]["n"] - 1, 1)) for a, t in zip(accs, tasks)]
            name = start_name if r["row"] == "gptq" else r["row"]
            lines.append(f"| {name} | " + " | ".join(f"{a:.3f} ± {e:.3f}" for a, e in zip(accs, errors))
                         + f" | {sum(accs) / len(accs):.3f} |")
    trained = [r for r in results if r["row"].startswith("qat")]
    if trained:
        lines += ["", "Training loss (the DistillationTrainer's, mean over each 10 steps), first -> last logged: " + "; ".join(f"{r['row']} {r['first_loss']:.3f} -> {r['last_loss']:.3f}"
                                         for r in trained) + "."]
    lines += ["", f"Raw results: `benchmarks/results/{NAME}.json`.", MARK_END]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="*", default=["fp32", "gptq", "qat-learned"], choices=ROWS)
    parser.add_argument("--row-suffix", default="",
                        help="Appended to the QAT rows' names (e.g. '-15min'), so a run with other settings adds "
                             "rows instead of replacing them.")
    parser.add_argument("--start", default="gptq", choices=["gptq", "rtn"], help="How the start checkpoint is made.")
    parser.add_argument("--calib-windows", type=int, default=64)
    parser.add_argument("--eval-windows", type=int, default=64)
    parser.add_argument("--max-steps", type=int, default=10000, help="Step cap; the wall-clock budget ends runs first.")
    parser.add_argument("--train-budget-s", type=int, default=600, help="Training wall-clock budget (seconds).")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--alpha-kd", type=float, default=0.5)
    parser.add_argument("--zero-shot-limit", type=int, default=0, help="Examples per zero-shot task (0: skip them).")
    parser.add_argument("--zero-shot-only", action="store_true",
                        help="Only add zero-shot accuracy to the saved rows, from the checkpoints left in --work.")
    parser.add_argument("--work", default="/tmp/agentos-qat-work",
                        help="Folder for the checkpoints handed between rows.")
    parser.add_argument("--no-publish", action="store_true", help="Print the rows; leave BENCHMARKS.md alone.")
    parser.add_argument("--render-only", action="store_true",
                        help=f"Rewrite the BENCHMARKS.md section from benchmarks/results/{NAME}.json.")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    options = ["start", "calib_windows", "eval_windows", "max_steps", "train_budget_s", "batch", "lr", "alpha_kd",
               "zero_shot_limit"]
    if args.worker:
        Path(args.out).write_text(json.dumps(worker(args.worker, args)))
        return
    if args.render_only:
        results, meta = load_for_render(NAME)
        publish(NAME, results, write_markdown(results, meta), MARK_BEGIN, MARK_END, meta)
        return
    Path(args.work).mkdir(parents=True, exist_ok=True)
    passthrough = [f"--{o.replace('_', '-')}={getattr(args, o)}" for o in options] + [f"--work={args.work}"]
    if args.zero_shot_only:
        if not args.zero_shot_limit:
            raise SystemExit("--zero-shot-only needs --zero-shot-limit N (examples per task).")
        results, meta = load_for_render(NAME)  # the training run's rows and options stay as they were
        meta["args"]["zero_shot_limit"] = args.zero_shot_limit
        for row in args.rows:
            row += args.row_suffix if row.startswith("qat") else ""
            fresh = run_rows(__file__, [row], passthrough + ["--zero-shot-only"])[0]
            for saved in results:
                if saved["row"] == row:
                    saved.update(fresh)
            publish(NAME, results, write_markdown(results, meta), MARK_BEGIN, MARK_END, meta)
        return
    results = []
    for row in args.rows:  # one at a time, each saved at once: an interrupted run keeps its finished rows
        try:
            rows = run_rows(__file__, [row + (args.row_suffix if row.startswith("qat") else "")], passthrough)
        except subprocess.CalledProcessError as err:
            print(f"== {row} failed: {err}", flush=True)
            continue
        results = rows if args.no_publish and not results else (results + rows if args.no_publish else
                                                                  merge_with_saved(NAME, rows))
        if not args.no_publish:
            meta = run_meta(args, options)
            publish(NAME, results, write_markdown(results, meta), MARK_BEGIN, MARK_END, meta)
    if args.no_publish:
        print(write_markdown(results, run_meta(args, options)))


if __name__ == "__main__":
    main()
