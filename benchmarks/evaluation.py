"""The SmolLM2 recipes of examples/recipes/ on standard tasks, each beside the fp32 baseline, in one report.

Each recipe's checkpoint steps (prune / distill / quantize) run through `optimum-agentos run` in their own process
(resumable: a second run reuses finished checkpoints); then one `compare` evaluates the baseline once and every
checkpoint on the same tasks and examples, and writes the report (JSON, markdown, plot) and the BENCHMARKS.md table.

    python benchmarks/evaluation.py                   # first 300 examples per zero-shot task, 64 x 512 WikiText-2
    python benchmarks/evaluation.py --limit 0         # full splits (hours on 2 cores)
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import yaml

from common import publish

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ("smollm2-int4-gptq", "smollm2-sparse-int4", "smollm2-depth-distill")
TASKS = ("wikitext2", "lambada", "arc_easy", "piqa", "winogrande")
MARK_BEGIN, MARK_END = "<!-- evaluation:begin -->", "<!-- evaluation:end -->"


def build(recipe: str, work: Path) -> tuple[str, float]:
    """Run the recipe's checkpoint steps; returns the final checkpoint folder and the seconds spent."""
    spec = yaml.safe_load((ROOT / "examples" / "recipes" / f"{recipe}.yaml").read_text())
    spec["steps"] = [s for s in spec["steps"] if next(iter(s)) in ("prune", "distill", "quantize")]
    path = work / f"{recipe}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "optimum_agentos.cli", "run", str(path), "--output", str(work / recipe)],
                   check=True)
    state = yaml.safe_load((work / recipe / "recipe_state.json").read_text())
    return state["steps"][-1]["checkpoint"], time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default=str(ROOT / "benchmarks" / "work" / "evaluation"))
    parser.add_argument("--limit", type=int, default=300, help="Examples per zero-shot task (0: full splits).")
    parser.add_argument("--ppl-windows", type=int, default=64)
    parser.add_argument("--recipes", nargs="*", default=list(RECIPES))
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    checkpoints, build_seconds = {}, {}
    for recipe in args.recipes:
        checkpoints[recipe], build_seconds[recipe] = build(recipe, work)

    from optimum_agentos.evaluation import compare

    start = time.perf_counter()
    report = compare("smollm2-135m", checkpoints, tasks=list(TASKS), limit=args.limit or None,
                     ppl_windows=args.ppl_windows, speed=False, baseline_name="fp32")
    eval_seconds = time.perf_counter() - start
    out = ROOT / "benchmarks" / "results" / "evaluation-report"
    report.save(out)
    subset = f"first {args.limit} examples of each zero-shot split" if args.limit else "full splits"
    section = "\n".join([
        "## Evaluation of the SmolLM2 recipes", "",
        f"`python benchmarks/evaluation.py --limit {args.limit}`: the recipes of `examples/recipes/` (their prune / "
        "distill / quantize steps), each evaluated beside the fp32 SmolLM2-135M-Instruct on the same examples in "
        f"one process: WikiText-2 test perplexity ({args.ppl_windows} x 512 tokens, GPTQ protocol), lm-eval 0-shot "
        f"accuracy ({subset}: LAMBADA-OpenAI test, ARC-Easy test, PIQA validation, WinoGrande validation). "
        f"Speed columns are left to the speed table. Evaluation took {eval_seconds / 60:.0f} min; building the "
        "checkpoints: " + ", ".join(f"{r} {s / 60:.1f} min" for r, s in build_seconds.items()) + ".", "",
        report.to_markdown(), "",
        "![size against quality](benchmarks/results/evaluation-report/size_vs_quality.png)",
    ])
    publish("evaluation", report.rows(), section, MARK_BEGIN, MARK_END)


if __name__ == "__main__":
    main()
