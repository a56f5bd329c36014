"""AWQ and learned rounding beside RTN and GPTQ on SmolLM2-135M-Instruct: perplexity, compression time, peak RSS.

Every row runs in its own fresh process (peak RSS is that row's alone), quantizes, saves the checkpoint, reloads it
from disk with `AutoModelForCausalLM.from_pretrained` and evaluates it, one row after the other, GPTQ among them.
Protocol (BENCHMARKS.md's): WikiText-2 raw test, first 64 windows of 512 tokens, no BOS; calibration on WikiText-2
validation, 64 windows of 512 tokens (GPTQ's), except learned rounding, which trains on `--rounding-windows` windows
(one per step, `--rounding-steps` steps per block) to keep its run near 15 minutes on 2 cores.

    python benchmarks/advanced_quantization.py                      # every row (about 90 minutes on 2 cores)
    python benchmarks/advanced_quantization.py --rows int4-g128-gptq int4-g128-awq
    python benchmarks/advanced_quantization.py --render-only
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import tempfile
import time
from pathlib import Path

from common import (
    cpu_description, cpu_note, load_for_render, markers, merge_with_saved, peak_rss_mib, publish, run_meta, run_rows,
)

NAME = "advanced_quantization"

INT4, INT3, INT2 = dict(bits=4, group_size=128), dict(bits=3, group_size=128), dict(bits=2, group_size=64)
ROWS = {  # the table's order; --rows picks the run order
    "fp32": None,
    "int4-g128-rtn": dict(**INT4, method="rtn"),
    "int4-g128-gptq": dict(**INT4, method="gptq"),
    "int4-g128-awq": dict(**INT4, method="awq"),
    "int4-g128-awq+gptq": dict(**INT4, method="gptq", awq=True),
    "int4-g128-autoround": dict(**INT4, method="autoround"),
    "int3-g128-gptq": dict(**INT3, method="gptq"),
    "int3-g128-autoround": dict(**INT3, method="autoround"),
    "int2-g64-gptq": dict(**INT2, method="gptq"),
    "int2-g64-autoround": dict(**INT2, method="autoround"),
    # AutoRound's published step count (its 200 iterations) on 64 windows: does more training close the gap?
    "int3-g128-autoround-200": dict(**INT3, method="autoround", rounding_steps=200, windows=64),
    "int2-g64-autoround-200": dict(**INT2, method="autoround", rounding_steps=200, windows=64),
    # AWQ's scales first, then GPTQ or learned rounding on the scaled weights: do the two gains add up?
    "int3-g128-awq+gptq": dict(**INT3, method="gptq", awq=True),
    "int4-g128-awq+autoround-200": dict(**INT4, method="autoround", awq=True, rounding_steps=200, windows=64),
    "int3-g128-awq+autoround-200": dict(**INT3, method="autoround", awq=True, rounding_steps=200, windows=64),
}


# what learned rounding trains towards: the float model's block outputs since 81ef8f6 (rows without the key: the float
# block's output on the quantized model's inputs)
FLOAT_MODEL = "float model"
ZERO_SHOT = ["arc_easy", "lambada"]  # the two tasks for "better than GPTQ" (lm-eval)


def worker(row: str, args) -> dict:
    """One row in this process: quantize (or not), save, reload from disk, evaluate."""
    import torch
    from transformers import AutoModelForCausalLM

    from optimum_agentos import AgentOSConfig
    from optimum_agentos.evaluation import perplexity
    from optimum_agentos.formats import folder_size
    from optimum_agentos.models import resolve_model
    from optimum_agentos.quantization.quantizer import Quantizer

    torch.manual_seed(0)
    source = resolve_model("smollm2-135m")
    result = {"row": row, "compress_s": 0.0, "cpu": cpu_description()}
    quantizer = Quantizer.from_pretrained(source)
    tokenizer = quantizer.tokenizer
    with tempfile.TemporaryDirectory() as tmp:
        folder = source
        if ROWS[row] is not None:
            settings = dict(ROWS[row])
            learned = settings["method"] == "autoround"
            rounding_windows = settings.pop("windows", args.rounding_windows)
            if learned:
                settings.setdefault("rounding_steps", args.rounding_steps)
                result["rounding_steps"] = settings["rounding_steps"]
                result["rounding_targets"] = FLOAT_MODEL
            config = AgentOSConfig(**settings)
            windows, batch = (rounding_windows, 1) if learned else (args.calib_windows, 4)
            calibration = None if config.method == "rtn" else "wikitext2"
            start = time.perf_counter()
            quantizer.quantize(Path(tmp) / "q", config, calibration, num_samples=windows, seq_len=512,
                               batch_size=batch)
            result["compress_s"] = time.perf_counter() - start
            result["calib_windows"] = windows if calibration else 0
            blocks = quantizer.stats.get("blocks")
            if blocks:
                result["block_error_rtn"] = sum(b["loss_rtn"] for b in blocks) / len(blocks)
                result["block_error"] = sum(b["loss"] for b in blocks) / len(blocks)
            folder = Path(tmp) / "q"
        result["compress_peak_rss_mib"] = peak_rss_mib()
        result["size_mb"] = folder_size(folder) / 1e6
        del quantizer
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        result["ppl"] = perplexity(model, tokenizer, "wikitext2", "test", 512, args.eval_windows)
        if args.zero_shot_limit:
            from optimum_agentos.evaluation.tasks import evaluate_model

            scores = evaluate_model(model, tokenizer, args.zero_shot_tasks, limit=args.zero_shot_limit, batch_size=8,
                                    per_example=True)
            # per example (in split order) for the paired comparison with GPTQ on the same examples
            result["zero_shot"] = {r.task: {"acc": r.value, "n": r.n, "correct": r.extra["per_example"][r.metric]}
                                   for r in scores}
    return result


def paired(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean of the per-example differences `a - b` on the same examples, and its standard error sd(d)/sqrt(n): the
    paired test, which the per-row standard errors overstate when both models get most examples equally right."""
    d = [x - y for x, y in zip(a, b)]
    mean = sum(d) / len(d)
    var = sum((x - mean) ** 2 for x in d) / max(len(d) - 1, 1)
    return mean, math.sqrt(var / len(d))


def _counts(row: dict, tasks: list[str]) -> str:
    """The `n` cell: each task's example count, in the tasks' order (whole splits differ in size)."""
    return " / ".join(str(row["zero_shot"][task]["n"]) for task in tasks)


def paired_markdown(shots: list[dict], by_row: dict, tasks: list[str]) -> list[str]:
    """Each row against GPTQ at its bits and group size, where both kept per-example results for the same n."""
    rows = []
    for r in shots:
        gptq = by_row.get("-".join(r["row"].split("-")[:2]) + "-gptq")
        if gptq is None or gptq is r or "zero_shot" not in gptq:
            continue
        cells = []
        for task in tasks:
            mine, theirs = r["zero_shot"][task], gptq["zero_shot"][task]
            if "correct" not in mine or "correct" not in theirs or mine["n"] != theirs["n"]:
                break
            diff, se = paired(mine["correct"], theirs["correct"])
            cells.append(f"{diff:+.3f} ± {se:.3f} ({diff / se if se else float('inf'):+.1f} SE)")
        if len(cells) == len(tasks):
            rows.append(f"| {r['row']} | " + " | ".join(cells) + f" | {_counts(r, tasks)} |")
    if not rows:
        return []
    return ["", "Against GPTQ on the same examples (paired: accuracy difference ± sd(per-example difference)"
            "/sqrt(n); "
            "beyond 2 SE is a shown difference, inside it noise):", "",
            "| row | " + " | ".join(tasks) + " | n |", "|---|" + "---:|" * (len(tasks) + 1), *rows]


def write_markdown(results: list[dict], meta: dict) -> str:
    args = meta["args"]
    name = meta.get("name", NAME)
    tasks = args.get("zero_shot_tasks") or ZERO_SHOT  # runs before --zero-shot-tasks evaluated both
    results = sorted(results, key=lambda r: list(ROWS).index(r["row"]))
    by_row = {r["row"]: r for r in results}
    fp = by_row.get("fp32")
    command = f"python benchmarks/{NAME}.py" + ("" if name == NAME else f" --name {name}")
    lines = [
        markers(name)[0],
        "## AWQ and learned rounding beside GPTQ: SmolLM2-135M-Instruct"
        + ("" if name == NAME else f" ({name.replace('-', ' ')})"),
        "",
        f"Written by `{command}` on {meta['date']}, {meta['cpu_count']} CPU cores, rows one "
        f"at a time. WikiText-2 raw test, first {args['eval_windows']} windows of 512 tokens, "
        f"no BOS; calibration on WikiText-2 validation: {args['calib_windows']} windows of 512 for GPTQ and AWQ, "
        f"{args['rounding_windows']} windows of 512 for learned rounding (`method='autoround'`, "
        f"{args['rounding_steps']} signed-gradient steps of one window per block, lr 1/steps decayed linearly). "
        "Each row is a fresh process; the checkpoint is saved, reloaded with `AutoModelForCausalLM.from_pretrained` "
        "and evaluated. `awq+gptq` is `AgentOSConfig(method='gptq', awq=True)`, `awq+autoround` "
        "`AgentOSConfig(method='autoround', awq=True)`. Peak RSS (MiB) is the whole process "
        "up to the end of compression. `vs GPTQ`: perplexity relative to GPTQ at the same bits and group size. "
        + cpu_note(results),
        "",
        "| row | WikiText-2 ppl | ppl / fp32 | vs GPTQ | compress time (s) | peak RSS (MiB) | size on disk (MB) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        prefix = "-".join(r["row"].split("-")[:2])  # bits and group size
        gptq = by_row.get(f"{prefix}-gptq")
        vs = f"{r['ppl'] / gptq['ppl']:.3f}" if gptq and r["row"] != "fp32" else "-"
        rel = f"{r['ppl'] / fp['ppl']:.3f}" if fp else "-"
        lines.append(f"| {r['row']} | {r['ppl']:.2f} | {rel} | {vs} | {r['compress_s']:.0f} | "
                     f"{r['compress_peak_rss_mib']:.0f} | {r['size_mb']:.1f} |")
    longer = [r for r in results if r.get("rounding_steps", args["rounding_steps"]) != args["rounding_steps"]]
    if longer:
        lines += ["", "Rows ending in a step count train longer: " + "; ".join(
            f"{r['row']} {r['rounding_steps']} steps on {r['calib_windows']} windows" for r in longer) + "."]
    shots = [r for r in results if "zero_shot" in r]
    if shots:
        lines += ["", "Zero-shot accuracy (lm-eval, first examples of each split as `n` says; ± the standard error "
                  "sqrt(p(1-p)/(n-1)), as lm-eval reports it: a difference inside it is noise):", "",
                  "| row | " + " | ".join(tasks) + " | n |", "|---|" + "---:|" * (len(tasks) + 1)]
        for r in shots:
            cells = []
            for task in tasks:
                acc, n = r["zero_shot"][task]["acc"], r["zero_shot"][task]["n"]
                cells.append(f"{acc:.3f} ± {math.sqrt(acc * (1 - acc) / max(n - 1, 1)):.3f}")
            lines.append(f"| {r['row']} | " + " | ".join(cells) + f" | {_counts(r, tasks)} |")
    lines += paired_markdown(shots, by_row, tasks)
    learned = [r for r in results if "block_error" in r]
    if learned:
        older = [r["row"] for r in learned if r.get("rounding_targets") != FLOAT_MODEL]
        lines += ["", "Learned rounding trains each block, fed the quantized blocks' outputs, towards the float model's "
                  "output at that block (since 81ef8f6)" + (
                      f"; rows measured before it trained towards the float block's output on the quantized inputs: "
                      f"{', '.join(older)}" if older else "") + ". Its block-output mean squared error against those "
                  "targets (mean over blocks, first 4 calibration windows): " + "; ".join(
                      f"{r['row']} {r['block_error_rtn']:.3g} at the start (round to nearest) -> {r['block_error']:.3g}"
                      for r in learned) + "."]
    lines += ["", f"Raw results: `benchmarks/results/{name}.json`.", markers(name)[1]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--eval-windows", type=int, default=64)
    parser.add_argument("--calib-windows", type=int, default=64)
    parser.add_argument("--rounding-windows", type=int, default=32)
    parser.add_argument("--rounding-steps", type=int, default=32)
    parser.add_argument("--render-only", action="store_true",
                        help=f"Rewrite the BENCHMARKS.md section from benchmarks/results/{NAME}.json.")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--zero-shot-limit", type=int, default=0,
                        help="Examples per zero-shot task (the first of each split; more than a split holds: all "
                             "of it); 0 skips them.")
    parser.add_argument("--zero-shot-tasks", nargs="+", default=ZERO_SHOT, choices=ZERO_SHOT)
    parser.add_argument("--name", default=NAME,
                        help="Results file and BENCHMARKS.md section (another name: a second table beside the "
                             "main one, e.g. zero-shot on whole splits for a few rows).")
    args = parser.parse_args()
    options = ["eval_windows", "calib_windows", "rounding_windows", "rounding_steps", "zero_shot_limit",
               "zero_shot_tasks"]
    if args.worker:
        Path(args.out).write_text(json.dumps(worker(args.worker, args)))
        return
    if args.render_only:
        results, meta = load_for_render(args.name)
    else:
        passthrough = [f"--{o.replace('_', '-')}={getattr(args, o)}" for o in options if o != "zero_shot_tasks"]
        passthrough += ["--zero-shot-tasks", *args.zero_shot_tasks]
        results = []
        for row in args.rows:  # one at a time, each saved at once: a long run interrupted keeps its finished rows
            try:
                results = merge_with_saved(args.name, run_rows(__file__, [row], passthrough))
            except subprocess.CalledProcessError as err:  # a failed row is reported, the others still run
                print(f"== {row} failed: {err}", flush=True)
                continue
            meta = {**run_meta(args, options), "name": args.name}
            publish(args.name, results, write_markdown(results, meta), *markers(args.name), meta)
        return
    publish(args.name, results, write_markdown(results, meta), *markers(args.name), meta)


if __name__ == "__main__":
    main()
