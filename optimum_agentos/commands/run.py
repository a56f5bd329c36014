"""`optimum-agentos run RECIPE`: run a recipe's steps in order, each checkpoint feeding the next, resumable."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from transformers.utils import logging


logger = logging.get_logger(__name__)

STATE_FILE = "recipe_state.json"


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("run", help="Run a YAML recipe (prune -> distill -> quantize -> eval -> card -> push).",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("recipe", help="Recipe file (see examples/recipes/).")
    p.add_argument("--output", default=None, help="Output folder (default: the recipe's `output:`).")
    p.add_argument("--restart", action="store_true", help="Ignore finished steps and run every step again.")
    p.add_argument("--dry-run", action="store_true", help="Validate the recipe and print the steps, run nothing.")
    return p


def _write_state(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, path)


def _execute(step, index: int, current: str, recipe, output: Path) -> tuple[dict, str | None]:
    """Run one step; returns its summary and the checkpoint it produced (None: the current one stays)."""
    from .. import cli
    from ..recipes import step_parser, to_argv

    folder = output / f"{index + 1:02d}-{step.name}"
    argv = to_argv(step.name, step.options)
    if step.name in ("quantize", "prune"):
        args = step_parser(step.name).parse_args(
            [*argv, "--model", current, "--output", str(folder), "--overwrite"])
        args.argv = [step.name, *argv, "--model", current, "--output", folder.name]
        summary = cli.SUBCOMMANDS[step.name][1](args)
        Path(folder, "agentos_summary.json").write_text(json.dumps(summary, indent=2))
        from ..formats.folder import record_written

        record_written(Path(folder, "agentos_summary.json"))
        return summary, str(folder)
    if step.name == "distill":
        from ..distillation.command import run_distill

        extra = ["--output_dir", str(folder), "--overwrite", "True"]
        if "teacher" not in step.options:
            extra += ["--teacher", recipe.model]
        if "student" not in step.options and "student_layers" not in step.options:
            extra += ["--student", current]
        return run_distill(argv + extra), str(folder)
    if step.name == "eval":
        extra = ["--model", current, "--output", str(output / "report"), "--overwrite"]
        if "baseline" not in step.options and recipe.model and current != recipe.model:
            extra += ["--baseline", recipe.model]
        if "name" not in step.options:
            extra += ["--name", recipe.name]
        if Path(current, "config.json").is_file():
            extra.append("--update-card")
        args = step_parser("eval").parse_args([*argv, *extra])
        return cli.SUBCOMMANDS["eval"][1](args), None
    if step.name == "card":
        report = output / "report"
        args = step_parser("card").parse_args(
            [current, *argv] + (["--report", str(report)] if (report / "report.json").is_file() else []))
        return cli.SUBCOMMANDS["card"][1](args), None
    if step.name == "export":  # a leaf: the exported folder sits beside the checkpoints, the current one stays
        args = step_parser("export").parse_args([*argv, "--model", current, "--output", str(folder), "--overwrite"])
        return cli.SUBCOMMANDS["export"][1](args), None
    args = step_parser("push").parse_args([current, *argv])
    return cli.SUBCOMMANDS["push"][1](args), None


def run(args) -> dict:
    from ..recipes import load_recipe

    recipe = load_recipe(args.recipe)  # every step and key validated before anything runs
    output = Path(args.output or recipe.output or Path(args.recipe).stem + "-output")
    if args.dry_run:
        return {f"step {i + 1} ({s.name}, line {s.line})": json.dumps(s.options) for i, s in enumerate(recipe.steps)}
    output.mkdir(parents=True, exist_ok=True)
    state_path = output / STATE_FILE
    state = {"recipe": str(args.recipe), "steps": []}
    if state_path.is_file() and not args.restart:
        state = json.loads(state_path.read_text())
    current = recipe.model
    summary = {"output": str(output)}
    exit_code = 0
    for index, step in enumerate(recipe.steps):
        fingerprint = step.fingerprint(current or "")
        done = state["steps"][index] if index < len(state["steps"]) else None
        if done and done["fingerprint"] == fingerprint and (not done.get("checkpoint")
                                                          or Path(done["checkpoint"], "config.json").is_file()):
            logger.warning(f"Step {index + 1} ({step.name}) already finished: skipped (--restart runs it again)")
            current = done.get("checkpoint") or current
            summary[f"{index + 1:02d}-{step.name}"] = "done earlier"
            continue
        del state["steps"][index:]  # this step and everything after it run again
        logger.warning(f"Step {index + 1}/{len(recipe.steps)}: {step.name} {json.dumps(step.options)}")
        start = time.perf_counter()
        result, checkpoint = _execute(step, index, current, recipe, output)
        exit_code = max(exit_code, int(result.pop("exit_code", 0)))
        current = checkpoint or current
        state["steps"].append({"step": step.name, "fingerprint": fingerprint, "checkpoint": checkpoint,
                               "seconds": round(time.perf_counter() - start, 1)})
        _write_state(state_path, state)
        summary[f"{index + 1:02d}-{step.name}"] = f"{time.perf_counter() - start:.0f} s"
    summary["final_checkpoint"] = current
    if exit_code:
        summary["exit_code"] = exit_code
    return summary
