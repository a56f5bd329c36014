"""Recipes: validated up front (errors name the step, key and line), steps chained, resumable, card and report."""

import json
import textwrap

import pytest
from huggingface_hub import ModelCard

from optimum_agentos.cli import main
from optimum_agentos.recipes import RecipeError, load_recipe

from .conftest import run_python
from .evaluation.test_report import tiny_lm_folder


def write(tmp_path, text, name="recipe.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


@pytest.mark.parametrize("body, message", [
    ("model: m\nsteps:\n  - quantize: {bits: 4}\n  - quantise: {}\n", r":4: unknown step 'quantise'; known: prune"),
    ("model: m\nsteps:\n  - quantize:\n      bits: 4\n      group_sise: 64\n",
     r":5: unknown key 'group_sise' for step 'quantize' \(did you mean group_size\?\)"),
    ("model: m\nsteps:\n  - quantize:\n      output: x\n", r":4: step 'quantize' may not set 'output'"),
    ("model: m\nsteps:\n  - eval:\n      tasks: [wikitext2, arc_eazy]\n", r":4: Unknown task\(s\) arc_eazy"),
    ("model: m\nstep:\n  - eval: {}\n", r":2: unknown top-level key 'step'"),
    ("model: m\nsteps: []\n", r"`steps:` must be a non-empty list"),
    ("model: m\nsteps:\n  - quantize: {bits: 4}\n    eval: {}\n", r":3: each step is a mapping with one key"),
    ("steps:\n  - quantize: {bits: 4}\n", r"`model:` .* is required"),
    ("model: m\nsteps:\n  - quantize: {group_size: 100}\n", r":3: step 'quantize': group_size=100 must be -1"),
    ("model: m\nsteps:\n  - quantize: {bits: 5}\n", r":3: step 'quantize': argument --bits: invalid choice: 5"),
    ("model: m\nsteps:\n  - quantize:\n      sym: 'yes'\n", r":4: sym='yes' of step 'quantize' is an on/off option"),
    ("model: m\nsteps:\n  - prune: {pattern: '5:4'}\n", r":3: step 'prune': pattern='5:4' needs 0 < N < M"),
    ("model: m\nsteps:\n  - push: {}\n", r"step 'push': the following arguments are required: --repo-id"),
    ("model: m\nsteps:\n  - quantize: {4: 8}\n", r":3: option names are text; got 4"),
    ("model: m\nsteps:\n  - card: {repo_id: 2024-01-01}\n", r"repo_id=datetime.date\(2024, 1, 1\) .*quote dates"),
    ("model: m\nsteps:\n  - quantize: {bits: !!int x}\n", r"not valid YAML: a tagged value cannot be read"),
    ("model: m\nsteps:\n  - quantize: {bits: !!python/tuple [4]}\n", r"not valid YAML: could not determine"),
    ("model: [a, b]\nsteps:\n  - quantize: {}\n", r":1: `model:` must be a text value"),
])
def test_bad_recipes_are_rejected_before_running(tmp_path, body, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(write(tmp_path, body))
    assert not (tmp_path / "out").exists()


def test_boolean_options_reach_the_command_both_ways(tmp_path):
    from optimum_agentos.recipes import step_parser, to_argv

    recipe = load_recipe(write(tmp_path, "model: m\nsteps:\n  - quantize: {act_order: false, sym: true}\n"))
    argv = to_argv("quantize", recipe.steps[0].options)
    assert argv == ["--no-act-order", "--sym"]
    args = step_parser("quantize").parse_args([*argv, "--model", "m", "--output", "o"])
    assert args.act_order is False and args.sym is True


def test_a_recipe_that_is_not_utf8_or_is_a_folder_is_named(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("model: caf\xe9\nsteps:\n  - card: {}\n".encode("latin-1"))
    with pytest.raises(RecipeError, match="not UTF-8 text"):
        load_recipe(path)
    with pytest.raises(RecipeError, match="does not exist \\(it is a folder\\)"):
        load_recipe(tmp_path)


def test_distill_keys_are_checked_too(tmp_path):
    recipe = load_recipe(write(tmp_path, "model: m\nsteps:\n  - distill: {task: sst2, student_layers: 3, "
                                         "temperature: 2.0, per_device_train_batch_size: 8}\n"))
    assert recipe.steps[0].options["temperature"] == 2.0
    with pytest.raises(RecipeError, match="unknown key 'temprature' for step 'distill'"):
        load_recipe(write(tmp_path, "model: m\nsteps:\n  - distill: {temprature: 2.0}\n"))


def test_cli_reports_a_recipe_typo_and_exits_2(tmp_path, capsys):
    path = write(tmp_path, "model: m\nsteps:\n  - prune: {sparsity: 0.5, methd: wanda}\n")
    assert main(["run", str(path)]) == 2
    assert "unknown key 'methd'" in capsys.readouterr().err


def test_example_recipes_validate():
    from pathlib import Path

    recipes = sorted(Path(__file__).resolve().parents[1].glob("examples/recipes/*.yaml"))
    assert len(recipes) >= 4
    for path in recipes:
        assert load_recipe(path).steps


RECIPE = """
model: {model}
steps:
  - quantize: {{bits: 4, group_size: 32, method: rtn}}
  - eval: {{tasks: [wikitext2], ppl_windows: {windows}, seq_len: 64, no_speed: true}}
  - card: {{}}
"""


def test_recipe_runs_chains_and_resumes(tmp_path, capsys):
    model = tiny_lm_folder(tmp_path / "fp32")
    out = tmp_path / "out"
    path = write(tmp_path, RECIPE.format(model=model, windows=2))
    assert main(["run", str(path), "--output", str(out)]) == 0
    state = json.loads((out / "recipe_state.json").read_text())
    assert [s["step"] for s in state["steps"]] == ["quantize", "eval", "card"]
    checkpoint = out / "01-quantize"
    assert state["steps"][0]["checkpoint"] == str(checkpoint)
    report = json.loads((out / "report" / "report.json").read_text())
    assert report["baseline"]["name"] == "fp32" and report["models"][0]["name"] == "recipe"
    value = report["models"][0]["results"][0]["value"]
    for name in ("report.json", "report.md", "size_vs_quality.png"):  # the report travels with the checkpoint
        assert (checkpoint / name).is_file()
    card = ModelCard.load(checkpoint / "README.md")
    assert card.data.eval_results[0].metric_type == "perplexity"
    assert card.data.eval_results[0].metric_value == pytest.approx(value, abs=1e-4)
    assert "![size against quality](size_vs_quality.png)" in card.text
    assert str(tmp_path) not in card.content  # no local path in the card
    out_text = run_python(f"""
        import optimum_agentos
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained({str(checkpoint)!r})
        print(type(m.model.layers[0].mlp.up_proj).__name__)
    """)
    assert "QuantLinear" in out_text
    capsys.readouterr()

    # same recipe again: every step is skipped
    stamp = (checkpoint / "model.safetensors").stat().st_mtime_ns
    assert main(["run", str(path), "--output", str(out)]) == 0
    assert capsys.readouterr().out.count("done earlier") == 3
    assert (checkpoint / "model.safetensors").stat().st_mtime_ns == stamp

    # a changed eval step re-runs it and what follows, not the quantize step before it
    changed = write(tmp_path, RECIPE.format(model=model, windows=3), "changed.yaml")
    assert main(["run", str(changed), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("done earlier") == 1
    assert json.loads((out / "report" / "report.json").read_text())["models"][0]["results"][0]["n"] == 3
    assert (checkpoint / "model.safetensors").stat().st_mtime_ns == stamp
