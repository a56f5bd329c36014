"""`optimum-agentos eval`: a model (and optionally its baseline) on standard tasks, with a compression report."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub):
    from ..evaluation.tasks import TASKS

    p = sub.add_parser("eval", help="Evaluate a model against its baseline; writes report.json/md and a plot.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="Checkpoint folder, Hub id or alias of the (compressed) model.")
    p.add_argument("--baseline", default=None, help="The uncompressed model to compare with (folder, Hub id, alias).")
    p.add_argument("--name", default=None, help="The model's name in the report (default: its folder name).")
    p.add_argument("--tasks", default="wikitext2", help=f"Comma-separated; known: {','.join(TASKS)}.")
    p.add_argument("--limit", type=int, default=None, help="First N examples of zero-shot/GLUE tasks (default all).")
    p.add_argument("--ppl-windows", type=int, default=64, help="Perplexity windows of --seq-len tokens (0: all).")
    p.add_argument("--seq-len", type=int, default=512, help="Perplexity window length (GPTQ protocol: 512).")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cpu", help="Where the tasks run: cpu, cuda, cuda:N or auto (an accelerator "
                   "when there is one). Speed is measured on the CPU.")
    p.add_argument("--output", default=None, help="Report folder (default: <model>/report for a local folder).")
    p.add_argument("--no-speed", action="store_true", help="Skip load time / speed / peak memory measurement.")
    p.add_argument("--min-recovery", type=float, default=None,
                   help="Exit non-zero when any task keeps less than this fraction of the baseline (e.g. 0.95).")
    p.add_argument("--update-card", action="store_true",
                   help="Also re-render the model folder's card with the results (and copy the report into it).")
    p.add_argument("--overwrite", action="store_true", help="Replace an existing report folder.")
    return p


def report_folder(args) -> Path:
    if args.output:
        return Path(args.output)
    if Path(args.model, "config.json").is_file():
        return Path(args.model) / "report"
    return Path("agentos-report")


def run(args) -> dict:
    from ..evaluation.report import REPORT_FILES, compare
    from ..evaluation.tasks import check_tasks

    tasks = check_tasks(args.tasks)  # before any model loads
    output = report_folder(args)
    if any((output / f).exists() for f in REPORT_FILES) and not args.overwrite:
        raise SystemExit(f"error: {output} already holds a report; pass --overwrite to replace it.")
    baseline = args.baseline or args.model
    compressed = {args.name or Path(args.model).name or args.model: args.model} if args.baseline else {}
    report = compare(baseline, compressed, tasks=tasks, limit=args.limit, ppl_windows=args.ppl_windows or None,
                     speed=not args.no_speed, baseline_name=Path(baseline).name or baseline,
                     batch_size=args.batch_size, seq_len=args.seq_len, device=args.device)
    report.save(output)
    print(report.to_markdown())
    summary = {"report": str(output)}
    for row in report.rows():
        summary[f"{row['task']}_{row['metric']}"] = round(row["compressed"], 4)
        summary[f"{row['task']}_recovery"] = round(row["recovery"], 4)
    if not report.models:
        summary.update({f"{r['task']}_{r['metric']}": round(r["value"], 4) for r in report.baseline.results})
    if args.update_card and Path(args.model, "config.json").is_file():
        from ..hub.card import refresh_card

        refresh_card(args.model, output)
        summary["card"] = str(Path(args.model, "README.md"))
    if args.min_recovery is not None:
        failed = report.failures(args.min_recovery)
        summary["recovery_check"] = "failed" if failed else "passed"
        if failed:
            summary["exit_code"] = 1
            worst = ", ".join(f"{r['task']} {r['recovery']:.3f}" for r in failed)
            print(f"Recovery below {args.min_recovery}: {worst}")
    return summary
