"""`optimum-agentos {eval,card,push}` and `optimum-cli agentos ...` in real processes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from optimum_agentos.cli import main

from .conftest import REPO
from .evaluation.test_report import tiny_lm_folder
from .hub_server import LocalHub
from .test_hub_push import TOKEN, hub_env


OPTIMUM_CLI = str(Path(sys.executable).parent / "optimum-cli")  # the venv's entry point


def cli(*args, env=None):
    import os

    return subprocess.run([sys.executable, "-m", "optimum_agentos.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})}, timeout=600)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model = tiny_lm_folder(root / "fp32")
    assert main(["quantize", "--model", str(model), "--output", str(root / "int4"), "--bits", "4", "--group-size",
                 "32", "--method", "rtn"]) == 0
    return model, root / "int4"


def test_quantize_cli_keeps_the_library_defaults(folders):
    from .conftest import read_quant_config

    config = read_quant_config(folders[1])
    assert config["act_order"] is True and config["observer"] is None  # AgentOSConfig's defaults, not argparse's


def test_quantize_cli_smoothquant_calibrates_rtn_too(folders, tmp_path):
    from .conftest import read_quant_config

    assert main(["quantize", "--model", str(folders[0]), "--output", str(tmp_path / "w8a8"), "--bits", "8",
                 "--group-size", "-1", "--method", "rtn", "--activations", "int8-dynamic", "--smoothquant-alpha", "0.5",
                 "--num-samples", "4", "--seq-len", "64"]) == 0
    assert read_quant_config(tmp_path / "w8a8")["smoothquant_alpha"] == 0.5


def test_quantize_cli_awq_and_learned_rounding(folders, tmp_path):
    from .conftest import read_quant_config

    assert main(["quantize", "--model", str(folders[0]), "--output", str(tmp_path / "ar"), "--group-size", "32",
                 "--method", "autoround", "--awq", "--rounding-steps", "3", "--num-samples", "4", "--seq-len",
                 "64"]) == 0
    config = read_quant_config(tmp_path / "ar")
    assert (config["method"], config["awq"], config["rounding_steps"]) == ("autoround", True, 3)
    line = _one_error_line(cli("quantize", "--model", "m", "--output", str(tmp_path / "o"), "--method", "rtn", "--awq"))
    assert "for AWQ with round to nearest use method='awq'" in line


def test_quantize_cli_batch_size_sets_the_learned_rounding_batches(folders, tmp_path):
    from safetensors.torch import load_file

    from optimum_agentos import AgentOSConfig, Quantizer

    def run(name, *extra):
        assert main(["quantize", "--model", str(folders[0]), "--output", str(tmp_path / name), "--group-size", "32",
                     "--method", "autoround", "--rounding-steps", "4", "--num-samples", "4", "--seq-len", "32",
                     *extra]) == 0
        return load_file(tmp_path / name / "model.safetensors")

    one, default = run("b1", "--batch-size", "1"), run("b4")
    config = AgentOSConfig(bits=4, group_size=32, method="autoround", rounding_steps=4)
    Quantizer.from_pretrained(str(folders[0])).quantize(tmp_path / "api", config, "wikitext2", 4, 32, batch_size=1)
    api = load_file(tmp_path / "api" / "model.safetensors")
    assert one.keys() == api.keys() and all(torch.equal(one[k], api[k]) for k in one)  # the flag reached the API
    assert any(not torch.equal(one[k], default[k]) for k in one)  # one window per step trains differently
    line = _one_error_line(cli("quantize", "--model", "m", "--output", str(tmp_path / "o"), "--batch-size", "0"))
    assert "--batch-size 0 must be at least 1" in line


def test_optimum_cli_registers_the_agentos_commands():
    proc = subprocess.run([OPTIMUM_CLI, "agentos", "--help"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for command in ("quantize", "prune", "distill", "eval", "card", "push", "run", "export"):
        assert command in proc.stdout
    proc = subprocess.run([OPTIMUM_CLI, "agentos", "quantize", "--help"], capture_output=True, text=True,
                          timeout=300)
    assert "--group-size" in proc.stdout and "(default: 128)" in proc.stdout


def test_eval_threshold_sets_the_exit_code(folders, tmp_path):
    model, int4 = folders
    args = ["eval", "--model", str(int4), "--baseline", str(model), "--tasks", "wikitext2", "--ppl-windows", "2",
            "--seq-len", "64", "--no-speed", "--output", str(tmp_path / "r")]
    proc = cli(*args, "--min-recovery", "1.5")  # a random tiny model cannot keep 150% of its quality
    assert proc.returncode == 1, proc.stderr
    assert "Recovery below 1.5" in proc.stdout
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["rows"][0]["recovery"] < 1.5
    proc = cli(*args)  # the report exists: refused without --overwrite, nothing replaced
    assert proc.returncode != 0 and "--overwrite" in proc.stderr
    proc = cli(*args, "--overwrite", "--min-recovery", "0.01", "--update-card")
    assert proc.returncode == 0, proc.stderr
    card = (int4 / "README.md").read_text()
    assert "| wikitext2 | perplexity |" in card and "size_vs_quality.png" in card


def test_eval_device(folders, tmp_path):
    """`--device cpu` evaluates; a device the machine lacks is refused before any model loads."""
    import torch

    model, int4 = folders
    args = ["eval", "--model", str(int4), "--baseline", str(model), "--tasks", "wikitext2", "--ppl-windows", "2",
            "--seq-len", "64", "--no-speed"]
    proc = cli(*args, "--device", "cpu", "--output", str(tmp_path / "cpu"))
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "cpu" / "report.json").read_text())["rows"][0]["compressed"] > 0
    if not torch.cuda.is_available():
        proc = cli(*args, "--device", "cuda", "--output", str(tmp_path / "cuda"))
        assert proc.returncode != 0 and "device='cuda' is not available" in proc.stderr
        assert not (tmp_path / "cuda").exists()


def test_card_command_rerenders_with_a_repo_id(folders):
    _, int4 = folders
    assert main(["card", str(int4), "--repo-id", "me/tiny-int4"]) == 0
    card = (int4 / "README.md").read_text()
    assert 'from_pretrained("me/tiny-int4")' in card and "import optimum_agentos" in card
    assert "optimum-agentos quantize" in card  # how it was made


def test_push_command_uploads_model_card_and_report(folders, tmp_path):
    _, int4 = folders
    with LocalHub() as hub:
        proc = cli("push", str(int4), "--repo-id", "me/cli-int4", "--private", env=hub_env(hub, tmp_path, "home"))
        assert proc.returncode == 0, proc.stderr
        files = hub.files("me/cli-int4")
        assert {"config.json", "model.safetensors", "README.md", "tokenizer.json"} <= set(files)
        assert hub.repos["me/cli-int4"]["private"] is True
        assert TOKEN.encode() not in files["README.md"]


def test_push_without_token_fails_before_anything(folders, tmp_path):
    _, int4 = folders
    with LocalHub() as hub:
        env = {**hub_env(hub, tmp_path, "anon", token=False), "HF_TOKEN": ""}
        proc = cli("push", str(int4), "--repo-id", "me/nothing", env=env)
        assert proc.returncode == 2 and "No Hugging Face token" in proc.stderr
        assert hub.requests == [] and hub.repos == {}


def _one_error_line(proc) -> str:
    """The user mistake is one `error:` line on stderr, exit code 2, and no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def test_a_missing_model_is_one_clear_line(tmp_path):
    offline = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub-cache")}
    line = _one_error_line(cli("quantize", "--model", "no-such-model", "--output", str(tmp_path / "out"),
                               "--bits", "4", env=offline))
    assert "'no-such-model' not found locally or in the Hub cache" in line
    assert "local folder holding config.json" in line and "smollm2-135m" in line and "Hub id" in line
    assert not (tmp_path / "out").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    line = _one_error_line(cli("prune", "--model", str(empty), "--output", str(tmp_path / "out"), env=offline))
    assert f"{empty} is a folder without config.json" in line
    line = _one_error_line(cli("eval", "--model", str(tmp_path / "nowhere" / "int4"), "--no-speed", env=offline))
    assert "no such folder, and not a Hub id" in line


def test_bad_values_and_refused_folders_are_one_clear_line(tmp_path):
    occupied = tmp_path / "mine"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("keep me")
    line = _one_error_line(cli("quantize", "--model", "m", "--output", str(occupied), "--overwrite"))
    assert "notes.txt" in line and (occupied / "notes.txt").read_text() == "keep me"
    line = _one_error_line(cli("quantize", "--model", "m", "--output", str(tmp_path / "o"), "--group-size", "100"))
    assert "group_size=100 must be -1" in line
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model: m\nsteps:\n  - quantize: {sym: 'yes'}\n")
    line = _one_error_line(cli("run", str(recipe)))
    assert "recipe.yaml:3: sym='yes' of step 'quantize' is an on/off option" in line
