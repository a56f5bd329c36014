"""Mixed precision under a size budget: exact sizes, the plan fits on disk and reloads bit-exact in a fresh
process, sensitive layers get more bits, clear errors for impossible or pointless budgets, CLI and recipe."""

import json

import pytest
import torch

from optimum_agentos import AgentOSConfig, QuantLinear
from optimum_agentos.formats import folder_size
from optimum_agentos.formats.checks import check_safetensors
from optimum_agentos.quantization.budget import checkpoint_bytes, frontier, greedy_plan
from optimum_agentos.quantization.mixed import float16_bytes, plan_mixed_precision
from optimum_agentos.quantization.quantizer import Quantizer

from ..conftest import build_tiny, model_output, read_quant_config, run_python, sample_ids

CALIBRATION = torch.randint(2, 128, (8, 32), generator=torch.Generator().manual_seed(3))
CANDIDATES = [(8, -1), (4, 32), (3, 32), (2, 32)]


def stored_tensor_bytes(folder) -> int:
    header = check_safetensors(folder / "model.safetensors")
    return max(entry["data_offsets"][1] for entry in header.values())


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_checkpoint_bytes_are_exact(kind, tmp_path):
    config = AgentOSConfig(bits=4, group_size=32, embedding_bits=8 if kind != "gpt2" else None,
                           layer_overrides={next(n for n, m in build_tiny(kind).named_modules()
                                                 if isinstance(m, (torch.nn.Linear,)) and "attn" in n): {"bits": 8}}
                           if kind == "llama" else None)
    model = build_tiny(kind)
    data, bound = checkpoint_bytes(model, config)
    Quantizer(model).quantize(tmp_path / "q", config)
    assert stored_tensor_bytes(tmp_path / "q") == data
    assert data < folder_size(tmp_path / "q") <= bound < folder_size(tmp_path / "q") + 2000


def test_plan_fits_on_disk_and_reloads_bit_exact_in_a_fresh_process(tmp_path):
    model = build_tiny("llama", num_hidden_layers=3)
    budget_mb = 0.16
    quantizer = Quantizer(model)
    quantizer.quantize_to_budget(tmp_path / "q", budget_mb, CALIBRATION, candidates=CANDIDATES, error_samples=4)
    plan, report = quantizer.plan, quantizer.mixed_report
    assert folder_size(tmp_path / "q") <= budget_mb * 1e6
    assert stored_tensor_bytes(tmp_path / "q") == plan.tensor_bytes
    assert len(plan.formats()) > 1  # really mixed at this budget
    stored = read_quant_config(tmp_path / "q")
    assert stored["format_version"] == 5 and stored["layer_overrides"]
    formats = {n: (m.bits, m.group_size) for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert formats == {n: (d["bits"], d["group_size"]) for n, d in plan.layers.items()}
    # the errors of one block's layers add up: measured within a factor 2 of the prediction
    assert 0.5 * report["predicted_error"] <= report["measured_error"] <= 2 * report["predicted_error"]
    saved = json.loads((tmp_path / "q" / "mixed_precision.json").read_text())
    assert saved["layers"] == plan.layers and saved["max_size_mb"] == budget_mb
    ids = sample_ids()
    torch.save({"ids": ids, "logits": model_output(model, ids)}, tmp_path / "expected.pt")
    out = run_python(f"""
        import torch, optimum_agentos
        from transformers import AutoModelForCausalLM
        expected = torch.load({str(tmp_path / 'expected.pt')!r}, weights_only=True)
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'q')!r})
        with torch.no_grad():
            print("EQUAL", torch.equal(model(input_ids=expected["ids"]).logits, expected["logits"]))
    """)
    assert "EQUAL True" in out, out


def test_a_larger_budget_buys_less_error_and_one_sensitivity_pass_serves_both():
    model = build_tiny("llama", num_hidden_layers=3)
    small = plan_mixed_precision(model, CALIBRATION, 0.12, CANDIDATES, error_samples=4)
    large = plan_mixed_precision(model, CALIBRATION, 0.2, CANDIDATES, sensitivity=small.sensitivity)
    assert small.size_bound <= 0.12e6 and large.size_bound <= 0.2e6
    assert large.predicted_error < small.predicted_error
    assert sum(d["bits"] for d in large.layers.values()) > sum(d["bits"] for d in small.layers.values())
    rtn = plan_mixed_precision(model, CALIBRATION, 0.12, CANDIDATES, error_samples=4, sensitivity_method="rtn")
    assert rtn.size_bound <= 0.12e6  # RTN-measured errors: larger than GPTQ's (which minimizes them) at 2 bits
    assert sum(e[-1] for e in rtn.sensitivity.values()) > sum(e[-1] for e in small.sensitivity.values())


def test_the_solver_gives_a_sensitive_layer_more_bits():
    sensitive = "model.layers.1.mlp.up_proj"
    plain = build_tiny("llama", num_hidden_layers=2)
    model = build_tiny("llama", num_hidden_layers=2)
    with torch.no_grad():  # a few huge weights: every low-bit group holding one rounds the rest coarsely
        weight = model.get_submodule(sensitive).weight
        picked = torch.rand(weight.shape, generator=torch.Generator().manual_seed(0)) < 0.02
        weight[picked] *= 30
    before = plan_mixed_precision(plain, CALIBRATION, 0.1, CANDIDATES, error_samples=4)
    after = plan_mixed_precision(model, CALIBRATION, 0.1, CANDIDATES, error_samples=4)
    assert after.sensitivity[sensitive][-1] > 3 * before.sensitivity[sensitive][-1]  # measured: far more sensitive
    assert after.layers[sensitive]["bits"] > before.layers[sensitive]["bits"]
    assert after.size_bound <= 0.1e6 and before.size_bound <= 0.1e6


def test_greedy_plan_on_known_numbers():
    # two layers, options (bytes, error): the steep one is upgraded first, then what the budget allows
    items = {"flat": [(10, 1.0), (20, 0.9), (40, 0.8)], "steep": [(10, 5.0), (20, 1.0), (40, 0.1)]}
    assert greedy_plan(items, 20) == {"flat": 0, "steep": 0}
    assert greedy_plan(items, 30) == {"flat": 0, "steep": 1}
    assert greedy_plan(items, 50) == {"flat": 0, "steep": 2}
    assert greedy_plan(items, 80) == {"flat": 2, "steep": 2}
    assert frontier([(10, 1.0), (15, 2.0), (20, 0.5)]) == [0, 2]  # (15, 2.0) costs more and errs more
    with pytest.raises(ValueError, match="smallest plan takes 20 bytes"):
        greedy_plan(items, 19)


def test_impossible_and_pointless_budgets_are_named_and_nothing_is_written(tmp_path):
    model = build_tiny("llama", num_hidden_layers=2)
    with pytest.raises(ValueError, match=r"max_size_mb=0.01 is below the smallest checkpoint these candidates allow: "
                                         r"0\.\d+ MB \(every layer at its smallest format, int8 embeddings\)"):
        Quantizer(model).quantize_to_budget(tmp_path / "q", 0.01, CALIBRATION, candidates=CANDIDATES)
    fp16 = float16_bytes(model) / 1e6
    with pytest.raises(ValueError, match=rf"holds the whole model unquantized in 16-bit floats \({fp16:.1f} MB\): "
                                         "nothing needs quantizing"):
        Quantizer(model).quantize_to_budget(tmp_path / "q", 10.0, CALIBRATION)
    for bad, message in (([(5, 128)], "bits=5 is not supported"), ([], "candidates is empty"),
                         ([(4, 100)], "group_size=100 must be -1")):
        with pytest.raises(ValueError, match=message):
            plan_mixed_precision(model, CALIBRATION, 0.1, bad)
    with pytest.raises(ValueError, match="max_size_mb=-1 must be a positive number"):
        plan_mixed_precision(model, CALIBRATION, -1)
    assert not (tmp_path / "q").exists()


@pytest.mark.data
@pytest.mark.model("smollm2-135m")
def test_auto_cli_and_recipe_step(tmp_path):
    from optimum_agentos.cli import main
    from optimum_agentos.recipes import load_recipe

    from ..evaluation.test_report import tiny_lm_folder

    model = tiny_lm_folder(tmp_path / "fp32")
    args = ["--model", str(model), "--max-size-mb", "8", "--num-samples", "4", "--seq-len", "64",
            "--sensitivity-samples", "2", "--sensitivity-method", "rtn", "--candidates", "8:-1", "4:32", "2:32"]
    assert main(["auto", *args, "--output", str(tmp_path / "auto")]) == 0
    summary = json.loads((tmp_path / "auto" / "agentos_summary.json").read_text())
    assert summary["size_bytes"] <= 8e6 and summary["embeddings"] == "int8"
    assert json.loads((tmp_path / "auto" / "mixed_precision.json").read_text())["formats"]
    assert main(["auto", *args[:-3], "--candidates", "4:100", "--output", str(tmp_path / "bad")]) == 2
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {model}\noutput: {tmp_path / 'out'}\nsteps:\n"
                      "  - quantize: {max_size_mb: 8, candidates: ['8:-1', '4:32']}\n")
    assert load_recipe(recipe).steps[0].options["max_size_mb"] == 8
    recipe.write_text(f"model: {model}\noutput: {tmp_path / 'out'}\nsteps:\n  - quantize: {{max_size_mb: 8, "
                      "candidates: ['4:100']}\n")
    with pytest.raises(ValueError, match="group_size=100"):
        load_recipe(recipe)
