"""Recipes: a YAML list of steps (prune, distill, quantize, eval, card, push, export) run in order by
`optimum-agentos run`.

```yaml
model: smollm2-135m              # the starting model (folder, Hub id or alias)
output: recipe-output/int4       # every step's folder goes under it (the command line can override it)
steps:
  - quantize: {bits: 4, group_size: 128, method: gptq}
  - eval: {tasks: [wikitext2, lambada], limit: 200}
  - card: {}
  - export: {format: gguf}
```

A step's keys are the options of the command of the same name, with `_` for `-` (`optimum-agentos quantize
--help` lists them). Steps that write a checkpoint (prune, distill, quantize) feed it to the next step; `eval`
compares the current checkpoint with the recipe's `model` (or its `baseline:` key) and re-renders the card with the
report; `export` writes the current checkpoint in another format (`format: gguf`) beside it, leaving the current
checkpoint as it is. The whole file is validated before anything runs, and errors name the step, the key and the line.
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
STEPS = CHECKPOINT_STEPS + ("eval", "card", "push", "export")
TOP_KEYS = ("model", "output", "steps", "name", "description")
# Options the runner sets itself: a recipe may not (model flow and output folders belong to the recipe).
MANAGED = {"prune": ("model", "output", "overwrite"), "quantize": ("model", "output", "overwrite"),
           "distill": ("output_dir", "overwrite"), "eval": ("model", "output", "overwrite"), "card": ("folder",),
           "push": ("folder",), "export": ("model", "output", "overwrite")}


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


def _read(path: Path) -> tuple[yaml.MappingNode, dict]:
    """The recipe's YAML as nodes (for line numbers) and as data; any parse problem is a `RecipeError`."""
    if not path.is_file():
        raise RecipeError(f"Recipe {path} does not exist" + (" (it is a folder)." if path.is_dir() else "."))
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save the recipe as "
                          "UTF-8.") from None
    try:
        root, data = yaml.compose(text), yaml.safe_load(text)
    except yaml.YAMLError as exc:  # also tags safe_load refuses (`!!python/...`) and unhashable keys
        raise RecipeError(f"{path}: not valid YAML: {exc}") from None
    except (ValueError, TypeError, OverflowError) as exc:  # a tagged value its constructor rejects (`!!int x`)
        raise RecipeError(f"{path}: not valid YAML: a tagged value cannot be read ({exc}).") from None
    except RecursionError:
        raise RecipeError(f"{path}: nested too deeply to be a recipe.") from None
    if not isinstance(root, yaml.MappingNode) or not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a mapping with `model:` and `steps:`.")
    return root, data


def _check_top(path: Path, root: yaml.MappingNode) -> dict:
    top = {}
    for key_node, value_node in root.value:
        if not isinstance(key_node, yaml.ScalarNode) or key_node.value not in TOP_KEYS:
            raise RecipeError(f"{path}:{_node_line(key_node)}: unknown top-level key {key_node.value!r}; "
                              f"known: {', '.join(TOP_KEYS)}.")
        if key_node.value != "steps" and not (isinstance(value_node, yaml.ScalarNode)
                                              and value_node.tag == "tag:yaml.org,2002:str"):
            raise RecipeError(f"{path}:{_node_line(key_node)}: `{key_node.value}:` must be a text value (quote it "
                              "if YAML reads it as a number, date or boolean).")
        top[key_node.value] = value_node
    if "steps" not in top or not isinstance(top["steps"], yaml.SequenceNode) or not top["steps"].value:
        raise RecipeError(f"{path}: `steps:` must be a non-empty list.")
    return top


# What a step's option may hold: what a command line can say (the runner turns options into arguments).
SCALARS = (str, int, float, bool, type(None))


def _check_values(where, name: str, options: dict, known: dict) -> None:
    """Types the runner can pass on: scalars or lists of scalars, booleans for on/off flags, tasks as text."""
    for key, value in options.items():
        items = value if isinstance(value, list) else [value]
        if not all(isinstance(v, SCALARS) for v in items):
            raise RecipeError(f"{where(key)}: {key}={value!r} of step {name!r} must be a number, text, true/false "
                              "or a list of those (quote dates and other special values).")
        action = known.get(key)
        on_off = isinstance(action, (argparse._StoreTrueAction, argparse.BooleanOptionalAction))
        if on_off and not isinstance(value, bool):
            raise RecipeError(f"{where(key)}: {key}={value!r} of step {name!r} is an on/off option: write true or "
                              "false.")
        if name == "eval" and key == "tasks" and not all(isinstance(v, str) for v in items):
            raise RecipeError(f"{where(key)}: tasks={value!r} must be task names: text or a list of text.")


def _check_arguments(name: str, options: dict) -> None:
    """Parse the step's options as its command would (types, choices, required options) and build its configs,
    with placeholders for what the runner sets; raises `RecipeError`/`ValueError` naming the bad value."""
    if name == "distill":  # TrainingArguments fields: checked by HfArgumentParser when the step runs
        return
    from . import cli

    runner_sets = {"quantize": ["--model", "m", "--output", "o"], "prune": ["--model", "m", "--output", "o"],
                   "eval": ["--model", "m"], "card": ["f"], "push": ["f"],
                   "export": ["--model", "m", "--output", "o"]}[name]
    args = step_parser(name).parse_args([*runner_sets, *to_argv(name, options)])
    cli.check_arguments(name, args)


def load_recipe(path: str | Path) -> Recipe:
    """Parse and validate a recipe file; raises `RecipeError` naming the problem and its line.

    Every step's keys and values are checked before anything runs: each must be an option of the step's command,
    of the type and among the choices the command accepts, and the configs it implies must validate.
    """
    path = Path(path)
    root, data = _read(path)
    top = _check_top(path, root)
    steps = []
    for node, raw in zip(top["steps"].value, data["steps"]):
        line = _node_line(node)
        if not isinstance(raw, dict) or len(raw) != 1:
            raise RecipeError(f"{path}:{line}: each step is a mapping with one key, the step name (e.g. `- quantize: "
                              "{bits: 4}`).")
        (name, options), = raw.items()
        if name not in STEPS:
            raise RecipeError(f"{path}:{line}: unknown step {name!r}; known: {', '.join(STEPS)}.")
        options = {} if options is None else options
        if not isinstance(options, dict):
            raise RecipeError(f"{path}:{line}: the options of step {name!r} must be a mapping.")
        known = step_options(name)
        key_lines = {k.value: _node_line(k) for k, _ in node.value[0][1].value} if isinstance(
            node.value[0][1], yaml.MappingNode) else {}

        def where(key, line=line, key_lines=key_lines):
            return f"{path}:{key_lines.get(key, line)}"

        for key in options:
            if not isinstance(key, str):
                raise RecipeError(f"{where(key)}: option names are text; got {key!r} in step {name!r}.")
            if key in MANAGED[name]:
                raise RecipeError(f"{where(key)}: step {name!r} may not set {key!r}: the recipe runner sets it.")
            if key not in known:
                close = [k for k in known if k.startswith(key[:3])][:5]
                raise RecipeError(f"{where(key)}: unknown key {key!r} for step {name!r}"
                                  + (f" (did you mean {', '.join(close)}?)" if close else "")
                                  + f"; see `optimum-agentos {name} --help`.")
        _check_values(where, name, options, known)
        if name == "eval" and "tasks" in options:
            from .evaluation.tasks import check_tasks

            try:
                check_tasks(options["tasks"])
            except ValueError as exc:
                raise RecipeError(f"{where('tasks')}: {exc}") from None
        try:
            _check_arguments(name, options)
        except ValueError as exc:  # RecipeError from the parser, or a config's ValueError
            raise RecipeError(f"{path}:{line}: step {name!r}: {exc}") from None
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
        if isinstance(action, argparse.BooleanOptionalAction):  # --act-order / --no-act-order
            argv.append(action.option_strings[0 if value else 1])
            continue
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
