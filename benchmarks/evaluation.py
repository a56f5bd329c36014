"""The SmolLM2 recipes of examples/recipes/ on standard tasks, each beside the fp32 baseline, in one report.

Each recipe's checkpoint steps (prune / distill / quantize) run through `optimum-agentos run` in their own process
(resumable: a second run reuses finished checkpoints); then one `compare` evaluates the baseline once and every
checkpoint on the same tasks and examples, and writes the report (JSON, markdown, plot) and the BENCHMARKS.md table.
The checkpoints' model cards go to `model_cards/<recipe>/`: each checkpoint's card inputs (`agentos_card.json`)
are copied there and the card is rendered with the report by `refresh_card` (what `optimum-agentos card --report`
does), so `model_cards/` holds the cards of the models this project would publish.

    python benchmarks/evaluation.py                   # first 300 examples per zero-shot task, 64 x 512 WikiText-2
    python benchmarks/evaluation.py --limit 0         # full splits (hours on 2 cores)
    python benchmarks/evaluation.py --render-only     # BENCHMARKS.md section and model_cards/ from the saved files
    python benchmarks/evaluation.py --cards-only      # build (or reuse) the checkpoints, render their cards with
                                                      # the saved report; no evaluation

Accuracies carry their standard error: lm-eval's `acc_stderr` where the report kept it, else the same formula from
the accuracy p and the example count n (for a 0/1 score, lm-eval's sample standard deviation over sqrt(n) is
sqrt(p (1 - p) / (n - 1))).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml
from common import drop_unmarked_section, publish

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ("smollm2-int4-gptq", "smollm2-sparse-int4", "smollm2-depth-distill")
TASKS = ("wikitext2", "lambada", "arc_easy", "piqa", "winogrande")
MARK_BEGIN, MARK_END = "<!-- evaluation:begin -->", "<!-- evaluation:end -->"
LEGACY_HEADING = "## Evaluation of the SmolLM2 recipes"  # the section written before it had markers
REPORT_DIR = ROOT / "benchmarks" / "results" / "evaluation-report"
META = ROOT / "benchmarks" / "results" / "evaluation.meta.json"
CARDS = ROOT / "model_cards"
CHANCE = {"piqa": 0.5, "winogrande": 0.5}  # two answer options: guessing scores 0.5
PROPORTIONS = ("acc", "acc_norm")  # metrics that are a mean of 0/1 scores per example


def build(recipe: str, work: Path) -> tuple[str, float, bool]:
    """Run the recipe's checkpoint steps; returns the final checkpoint folder, the seconds spent and whether a
    finished earlier run was resumed (then the seconds are not a build time)."""
    spec = yaml.safe_load((ROOT / "examples" / "recipes" / f"{recipe}.yaml").read_text())
    spec["steps"] = [s for s in spec["steps"] if next(iter(s)) in ("prune", "distill", "quantize")]
    path = work / f"{recipe}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    state_file = work / recipe / "recipe_state.json"
    resumed = state_file.is_file()
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "optimum_agentos.cli", "run", str(path), "--output", str(work / recipe)],
                   check=True)
    state = yaml.safe_load(state_file.read_text())
    return state["steps"][-1]["checkpoint"], time.perf_counter() - start, resumed


def standard_error(result: dict) -> float | None:
    """A task result's standard error: the stored lm-eval stderr, else sqrt(p (1 - p) / (n - 1)) for 0/1 metrics."""
    stored = (result.get("extra") or {}).get(f"{result['metric']}_stderr")
    if isinstance(stored, (int, float)):
        return float(stored)
    if result["metric"] in PROPORTIONS and result.get("n", 0) > 1:
        p = result["value"]
        return math.sqrt(p * (1 - p) / (result["n"] - 1))
    return None


def within_noise(base: dict, other: dict) -> bool | None:
    """Whether two results differ by less than 2 standard errors of the difference (errors taken as independent)."""
    se_b, se_o = standard_error(base), standard_error(other)
    if se_b is None or se_o is None:
        return None
    return abs(other["value"] - base["value"]) < 2 * math.hypot(se_b, se_o)


def rows_with_se(report) -> list[dict]:
    """The report's rows (one per model and task) with both standard errors and the noise call."""
    base = {r["task"]: r for r in report.baseline.results}
    out = []
    for row in report.rows():
        entry = next(m for m in report.models if m.name == row["model"])
        result = next(r for r in entry.results if r["task"] == row["task"])
        se_b, se_c = standard_error(base[row["task"]]), standard_error(result)
        out.append({**row, "baseline_se": se_b, "compressed_se": se_c,
                    "within_2se": within_noise(base[row["task"]], result)})
    return out


def table(report) -> str:
    """Values `value ± se` (recovery in brackets, `noise` when within 2 standard errors of the baseline)."""
    names = [m.name for m in report.models]
    by_model = {m.name: {r["task"]: r for r in m.results} for m in report.models}
    from optimum_agentos.evaluation.report import recovery

    def cell(r: dict) -> str:
        se = standard_error(r)
        return f"{r['value']:.4f} ± {se:.4f}" if se is not None else f"{r['value']:.2f}"

    lines = ["| task | metric | n | " + " | ".join([report.baseline.name] + names) + " |",
             "|---|---|---:|" + "---:|" * (1 + len(names))]
    at_chance = []
    for b in report.baseline.results:
        cells = [cell(b)]
        for name in names:
            r = by_model[name].get(b["task"])
            if r is None:
                cells.append("-")
                continue
            rec = recovery(r["value"], b["value"], r["higher_is_better"])
            noise = within_noise(b, r)
            cells.append(f"{cell(r)} ({rec:.3f}{', noise' if noise else ''})")
        lines.append(f"| {b['task']} | {b['metric']} | {b['n']} | " + " | ".join(cells) + " |")
        se = standard_error(b)
        if b["task"] in CHANCE and se is not None and abs(b["value"] - CHANCE[b["task"]]) < 2 * se:
            at_chance.append(f"{b['task']} ({b['value']:.4f} ± {se:.4f}, chance {CHANCE[b['task']]})")
    lines += [
        "",
        "Accuracies as value ± standard error; the recovery in brackets (compressed / baseline; baseline / compressed "
        "for perplexity: 1.0 = no loss). Standard error of an accuracy p on n examples: lm-eval's `acc_stderr`, "
        "sample standard deviation of the 0/1 scores over sqrt(n) = sqrt(p (1 - p) / (n - 1)), here computed from "
        "the measured p and n (the saved report predates keeping lm-eval's stderr). `noise`: the difference from "
        "the baseline is within 2 standard errors of the difference, 2 sqrt(se_baseline^2 + se_compressed^2) "
        "(both models answer the same examples, so this unpaired bound is conservative); such a recovery, above or "
        "below 1, is not evidence of a change. Perplexity is one corpus-level figure over fixed windows and has no "
        "standard error here.",
    ]
    if at_chance:
        lines += ["", "At chance (within 2 standard errors of guessing, two answer options): the fp32 baseline on "
                  + ", ".join(at_chance) + "; its recoveries say nothing about the compression."]
    return "\n".join(lines)


def cards_line(report) -> str:
    names = [m.name for m in report.models]
    have = [n for n in names if (CARDS / n / "README.md").is_file()]
    if have == names:
        return "Their model cards, rendered with this report: `model_cards/`."
    missing = ", ".join(n for n in names if n not in have)
    return (f"Model cards not rendered for {missing}: the inputs of their cards (`agentos_card.json` of each "
            "checkpoint) were not kept by this run; `--cards-only` builds the checkpoints and renders them.")


def section(report, meta: dict) -> str:
    args = meta["args"]
    subset = f"first {args['limit']} examples of each zero-shot split" if args["limit"] else "full splits"
    builds = []
    for recipe, minutes in meta["build_minutes"].items():
        builds.append(f"{recipe} {minutes:.1f} min" + (" (resumed from an earlier run of this script: not a build "
                                                       "time)" if recipe in meta.get("resumed", []) else ""))
    when = f" on {meta['date']}, {meta['cpu_count']} CPU cores" if meta.get("date") else ""
    from optimum_agentos.evaluation.report import _stats_table

    return "\n".join([
        MARK_BEGIN,
        "## Evaluation of the SmolLM2 recipes", "",
        f"`python benchmarks/evaluation.py --limit {args['limit']}`{when}: the recipes of `examples/recipes/` (their "
        "prune / distill / quantize steps), each evaluated beside the fp32 SmolLM2-135M-Instruct on the same examples "
        f"in one process: WikiText-2 test perplexity ({args['ppl_windows']} x 512 tokens, GPTQ protocol), lm-eval "
        f"0-shot accuracy ({subset}: LAMBADA-OpenAI test, ARC-Easy test, PIQA validation, WinoGrande validation). "
        f"Speed columns are left to the speed table. Evaluation took {meta['eval_minutes']:.0f} min; building the "
        "checkpoints: " + ", ".join(builds) + ". " + cards_line(report), "",
        table(report), "",
        "Sizes on disk in MB (10^6 bytes).", "",
        _stats_table([report.baseline] + report.models), "",
        "![size against quality](benchmarks/results/evaluation-report/size_vs_quality.png)",
        "",
        "Raw results: `benchmarks/results/evaluation.json` (with the standard errors), "
        "`benchmarks/results/evaluation-report/`.",
        MARK_END,
    ])


def render_cards(checkpoints: dict[str, str] | None = None) -> list[Path]:
    """Cards of the recipe checkpoints into model_cards/<recipe>/, rendered with the saved report.

    With `checkpoints`, each checkpoint's `agentos_card.json` (what its card was rendered from when it was saved)
    is copied first; without, the inputs already in model_cards/ are re-rendered."""
    from optimum_agentos.hub.card import CARD_INFO, refresh_card

    written = []
    for recipe in RECIPES:
        folder = CARDS / recipe
        if checkpoints and recipe in checkpoints:
            source = Path(checkpoints[recipe], CARD_INFO)
            if not source.is_file():
                print(f"{recipe}: {source} is missing, no card")
                continue
            folder.mkdir(parents=True, exist_ok=True)
            (folder / CARD_INFO).write_text(source.read_text())
        if (folder / CARD_INFO).is_file():
            written.append(refresh_card(folder, REPORT_DIR, model_name=recipe))
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default=str(ROOT / "benchmarks" / "work" / "evaluation"))
    parser.add_argument("--limit", type=int, default=300, help="Examples per zero-shot task (0: full splits).")
    parser.add_argument("--ppl-windows", type=int, default=64)
    parser.add_argument("--recipes", nargs="*", default=list(RECIPES))
    parser.add_argument("--render-only", action="store_true",
                        help="Rewrite the BENCHMARKS.md section and re-render model_cards/ from the saved report.")
    parser.add_argument("--cards-only", action="store_true",
                        help="Build (or reuse) the checkpoints and render their cards with the saved report.")
    args = parser.parse_args()

    from optimum_agentos.evaluation.report import CompressionReport

    if args.render_only:
        report, meta = CompressionReport.load(REPORT_DIR), json.loads(META.read_text())
        render_cards()
    else:
        work = Path(args.work)
        work.mkdir(parents=True, exist_ok=True)
        checkpoints, build_seconds, resumed = {}, {}, []
        for recipe in args.recipes:
            checkpoints[recipe], build_seconds[recipe], was_resumed = build(recipe, work)
            if was_resumed:
                resumed.append(recipe)
        if args.cards_only:
            for path in render_cards(checkpoints):
                print(f"card: {path}")
            return

        from optimum_agentos.evaluation import compare

        start = time.perf_counter()
        report = compare("smollm2-135m", checkpoints, tasks=list(TASKS), limit=args.limit or None,
                         ppl_windows=args.ppl_windows, speed=False, baseline_name="fp32")
        eval_seconds = time.perf_counter() - start
        report.save(REPORT_DIR)
        meta = {"date": time.strftime("%Y-%m-%d"), "cpu_count": os.cpu_count(),
                "args": {"limit": args.limit, "ppl_windows": args.ppl_windows},
                "eval_minutes": eval_seconds / 60, "build_minutes": {r: s / 60 for r, s in build_seconds.items()},
                "resumed": resumed}
        render_cards(checkpoints)
    drop_unmarked_section(LEGACY_HEADING, MARK_BEGIN)
    publish("evaluation", rows_with_se(report), section(report, meta), MARK_BEGIN, MARK_END, meta)


if __name__ == "__main__":
    main()
