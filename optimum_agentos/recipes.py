"""Recipes: a YAML list of steps (prune, distill, quantize, eval, card, push) run in order by `optimum-agentos run`.

```yaml
model: smollm2-135m              # the starting model (folder, Hub id or alias)
output: recipe-output/int4       # every step's folder goes under it (the command line can override it)
steps:
  - quantize: {bits: 4, group_size: 128, method: gptq}
  - eval: {tasks: [wikitext2, lambada], limit: 200}
  - card: {}
```

A step's keys are the options of the command of the same name, with `_` for `-` (`optimum-agentos quantize
--help` lists them). Steps that write a checkpoint (prune, distill, quantize) feed it to the next step; `eval`
compares the current checkpoint with the recipe's `model` (or its `baseline:` key) and re-renders the card with the
report. The whole file is validated before anything runs, and errors name the step, the key and the line.
Finished steps are recorded in `<output>/recipe_state.json`; running the recipe again resumes after the last one
whose settings did not change.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import yaml
from transformers.utils import logging


logger = logging.get_logger(__name__)

CHECKPOINT_STEPS = ("prune", "distill", "quantize")
STEPS = CHECKPOINT_STEPS + ("eval", "card", "push")
TOP_KEYS = ("model", "output", "steps", "name", "description")
# Options the runner sets itself: a recipe may not (model flow and output folders belong to the recipe).
MANAGED = {"prune": ("model", "output", "overwrite"), "quantize": ("model", "output", "overwrite"),
           "distill": ("output_dir", "overwrite"), "eval": ("model", "output", "overwrite"), "card": ("folder",),
           "push": ("folder",)}


class RecipeError(ValueError):
    """A recipe that cannot run: unknown step or key, wrong shape; the message names the line."""


@dataclass
class Step:
    name: str
    options: dict
    line: int

    def fingerprint(self, source: str) -> str:
        payload = json.dumps({"step": self.name, "options": self.options, "source": source}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass
class Recipe:
    model: str
    output: str | None
    steps: list[Step]
    path: str
    name: str


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise RecipeError(message)


def step_options(step: str) -> dict[str, argparse.Action | None]:
    """The options a step accepts: `{name: argparse action}` (None for `distill`'s dataclass fields)."""
    if step == "distill":
        import dataclasses

        from .distillation.command import DistillArguments
        from .distillation.config import DistillationConfig

        return {f.name: None for cls in (DistillArguments, DistillationConfig) for f in dataclasses.fields(cls)}
    parser = step_parser(step)
    return {a.dest: a for a in parser._actions if a.dest != "help"}


def step_parser(step: str) -> argparse.ArgumentParser:
    from . import cli

    root = _Parser(prog="optimum-agentos")
    sub = root.add_subparsers(dest="command", parser_class=_Parser)
    return cli.SUBCOMMANDS[step][0](sub)


def _node_line(node) -> int:
    return node.start_mark.line + 1


def load_recipe(path: str | Path) -> Recipe:
    """Parse and validate a recipe file; raises `RecipeError` naming the problem and its line."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"Recipe {path} does not exist.")
    text = path.read_text()
    try:
        root = yaml.compose(text)
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(root, yaml.MappingNode):
        raise RecipeError(f"{path}: a recipe is a mapping with `model:` and `steps:`.")
    top = {}
    for key_node, value_node in root.value:
        if key_node.value not in TOP_KEYS:
            raise RecipeError(f"{path}:{_node_line(key_node)}: unknown top-level key {key_node.value!r}; "
                              f"known: {', '.join(TOP_KEYS)}.")
        top[key_node.value] = value_node
    if "steps" not in top or not isinstance(top["steps"], yaml.SequenceNode) or not top["steps"].value:
        raise RecipeError(f"{path}: `steps:` must be a non-empty list.")
    data = yaml.safe_load(text)
    steps = []
    for node, raw in zip(top["steps"].value, data["steps"]):
        line = _node_line(node)
        if not isinstance(raw, dict) or len(raw) != 1:
            raise RecipeError(f"{path}:{line}: each step is a mapping with one key, the step name (e.g. `- quantize: "
                              "{bits: 4}`).")
        (name, options), = raw.items()
        if name not in STEPS:
            raise RecipeError(f"{path}:{line}: unknown step {name!r}; known: {', '.join(STEPS)}.")
        options = options or {}
        if not isinstance(options, dict):
            raise RecipeError(f"{path}:{line}: the options of step {name!r} must be a mapping.")
        known = step_options(name)
        key_lines = {k.value: _node_line(k) for k, _ in node.value[0][1].value} if isinstance(
            node.value[0][1], yaml.MappingNode) else {}
        for key in options:
            where = f"{path}:{key_lines.get(key, line)}"
            if key in MANAGED[name]:
                raise RecipeError(f"{where}: step {name!r} may not set {key!r}: the recipe runner sets it.")
            if key not in known:
                close = [k for k in known if k.startswith(key[:3])][:5]
                raise RecipeError(f"{where}: unknown key {key!r} for step {name!r}"
                                  + (f" (did you mean {', '.join(close)}?)" if close else "")
                                  + f"; see `optimum-agentos {name} --help`.")
        if name == "eval" and "tasks" in options:
            from .evaluation.tasks import check_tasks

            try:
                check_tasks(options["tasks"])
            except ValueError as exc:
                raise RecipeError(f"{path}:{key_lines.get('tasks', line)}: {exc}") from None
        steps.append(Step(name, options, line))
    model = data.get("model")
    if not model and steps[0].name != "distill":
        raise RecipeError(f"{path}: `model:` (the starting model) is required.")
    return Recipe(model=model, output=data.get("output"), steps=steps, path=str(path),
                  name=str(data.get("name") or path.stem))


def to_argv(step: str, options: dict) -> list[str]:
    """Command-line arguments of a step's command from its recipe options."""
    known = step_options(step)
    argv = []
    for key, value in options.items():
        action = known.get(key)
        flag = (action.option_strings[-1] if action is not None and action.option_strings else f"--{key}")
        if isinstance(action, argparse._StoreTrueAction) or (action is None and isinstance(value, bool)):
            if step == "distill":
                argv += [flag, str(value)]
            elif value:
                argv.append(flag)
            continue
        if action is not None and not action.option_strings:  # positional
            argv.insert(0, str(value))
            continue
        if isinstance(value, (list, tuple)):
            joined = [",".join(map(str, value))] if key == "tasks" else [str(v) for v in value]
            argv += [flag, *joined]
        elif value is not None:
            argv += [flag, str(value)]
    return argv
