"""The input-column criterion (`method="column_magnitude"`): exact choices on a hand-made layer, real removal where
the producer is known (down_proj neurons, o_proj key/value groups) giving the same logits as zeroing the columns,
zeroed-and-sparse elsewhere, save and reload in a fresh process, the CLI and recipe keys."""

import copy
import json

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from optimum_agentos import Pruner, PruningConfig, SparseLinear
from optimum_agentos.cli import main
from optimum_agentos.pruning.columns import plan_columns
from optimum_agentos.recipes import load_recipe
from tests.conftest import build_tiny, model_output, run_python, sample_ids

from .test_threshold import CALIBRATION, W


def _toy() -> nn.Module:
    """One 4-input layer whose column sums of |W| are 0.4, 0.9, 0.25, 0.6 (mean 0.5375)."""
    model = nn.Sequential(nn.Linear(4, 2, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(W)
    return model


@pytest.mark.parametrize("kwargs,columns", [
    (dict(threshold=0.5, scope="global"), [0, 2]),  # 0.4, 0.25 < 0.5
    (dict(threshold=1.2, scope="layer"), [0, 2, 3]),  # < 1.2 x 0.5375 = 0.645
    (dict(sparsity=0.25), [2]),  # the lowest round(4 x 0.25) = 1
    (dict(sparsity=0.5, scope="global"), [0, 2]),
])
def test_column_choice_by_hand(kwargs, columns):
    model = _toy()
    plan = plan_columns(model, ["0"], PruningConfig(method="column_magnitude", **kwargs))
    assert plan.units == {"0": columns} and not plan.producer
    mask = plan.zero_masks(model)["0"]
    assert mask.tolist() == [[j in columns for j in range(4)]] * 2
    assert plan.report() == {"layers": {"0": {"removed": len(columns), "of": 4, "how": "zeroed"}},
                             "removed": len(columns), "of": 4, "fraction": len(columns) / 4}


def test_calibrated_column_choice_by_hand():
    mean_squares = {"0": torch.tensor([4.0, 1.0, 0.0, 0.25])}  # scores 0.8, 0.9, 0, 0.3
    config = PruningConfig(method="column_magnitude", threshold=0.85, scope="global", calibrated=True)
    assert plan_columns(_toy(), ["0"], config, mean_squares).units == {"0": [0, 2, 3]}


def _reference(model, names, threshold):
    """Independently: per target layer the columns whose |W| sum is under `threshold` x the layer mean, with
    o_proj's columns judged by their key/value group's mean (two groups of 48 columns in the tiny Llama)."""
    modules, chosen = dict(model.named_modules()), {}
    for name in names:
        sums = modules[name].weight.detach().abs().sum(0)
        limit = threshold * sums.mean()
        if name.endswith("o_proj"):
            chosen[name] = [c for g in range(2) if sums[g * 48:(g + 1) * 48].mean() < limit
                            for c in range(g * 48, (g + 1) * 48)]
        else:
            chosen[name] = torch.nonzero(sums < limit).flatten().tolist()
    return chosen


def _zeroed_copy(model, chosen):
    """The model with the chosen columns set to zero and nothing removed."""
    zeroed = copy.deepcopy(model)
    modules = dict(zeroed.named_modules())
    with torch.no_grad():
        for name, columns in chosen.items():
            modules[name].weight[:, columns] = 0
    return zeroed


def test_removal_is_exact_saves_and_reloads_in_a_fresh_process(tmp_path):
    model = build_tiny("llama")
    names = [n for n, m in model.named_modules() if n.startswith("model.layers.") and isinstance(m, nn.Linear)]
    chosen = _reference(model, names, 1.0)  # o_proj: exactly its lower group goes
    expected = model_output(_zeroed_copy(model, chosen), sample_ids())
    pruner = Pruner(model)
    pruner.prune(tmp_path / "out", PruningConfig(method="column_magnitude", threshold=1.0), float_dtype="float32")
    features = pruner.report["input_features"]["layers"]
    assert {n: v["removed"] for n, v in features.items()} == {n: len(c) for n, c in chosen.items()}
    for i in range(2):  # producers known: neurons and whole key/value groups are gone, shapes shrank
        layer, prefix = pruner.model.model.layers[i], f"model.layers.{i}"
        neurons = 160 - len(chosen[f"{prefix}.mlp.down_proj"])
        assert layer.mlp.down_proj.weight.shape == (96, neurons) and layer.mlp.gate_proj.out_features == neurons
        assert layer.self_attn.o_proj.in_features == 96 - len(chosen[f"{prefix}.self_attn.o_proj"])
        assert features[f"{prefix}.mlp.down_proj"]["how"] == features[f"{prefix}.self_attn.o_proj"]["how"] == "removed"
        assert features[f"{prefix}.self_attn.q_proj"]["how"] == "zeroed"
    assert all(len(chosen[f"model.layers.{i}.self_attn.o_proj"]) == 48 for i in range(2))
    sparse = {n: m for n, m in pruner.model.named_modules() if isinstance(m, SparseLinear)}
    assert sorted(sparse) == sorted(n for n in names if not n.endswith(("down_proj", "o_proj")))
    # gate_proj: its zeroed columns, on the rows of the neurons that stay
    gate = sparse["model.layers.0.mlp.gate_proj"].dequantize(torch.float32)
    assert bool((gate[:, chosen["model.layers.0.mlp.gate_proj"]] == 0).all())
    assert pruner.report["params_after"] < pruner.report["params_before"]
    logits = model_output(pruner.model, sample_ids())
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)  # removed == zeroed, up to summation order
    torch.save(logits, tmp_path / "logits.pt")
    out = run_python(f"""
        import torch, optimum_agentos
        from transformers import AutoModelForCausalLM
        from tests.conftest import model_output, sample_ids
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "out")!r})
        expected = torch.load({str(tmp_path / "logits.pt")!r}, weights_only=True)
        print(torch.equal(model_output(model, sample_ids()), expected), model.model.layers[0].mlp.down_proj.in_features)
    """)
    assert out.split() == ["True", str(160 - len(chosen["model.layers.0.mlp.down_proj"]))]
    card = (tmp_path / "out" / "README.md").read_text()
    assert "column_magnitude threshold 1, layer scope" in card and "Input features removed" in card


def test_down_proj_fraction_gives_a_plain_transformers_checkpoint(tmp_path):
    model = build_tiny("qwen2")
    pruner = Pruner(model)
    pruner.prune(tmp_path / "out", PruningConfig(method="column_magnitude", sparsity=0.25, target=["down_proj"]),
                 float_dtype="float32")
    stored = json.loads((tmp_path / "out" / "config.json").read_text())
    assert stored["intermediate_size"] == 120 and "quantization_config" not in stored  # 160 - round(160 x 0.25)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")  # no quantization_config: plain transformers
    assert type(reloaded.model.layers[1].mlp.down_proj) is nn.Linear and reloaded.config.intermediate_size == 120
    assert torch.equal(model_output(reloaded, sample_ids()), model_output(pruner.model.float(), sample_ids()))


def test_calibrated_columns_match_an_independent_reference():
    model = build_tiny("llama")
    seen = []
    handle = model.model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        model(input_ids=CALIBRATION)
    handle.remove()
    rms = torch.cat(seen).reshape(-1, 160).double().pow(2).mean(0).sqrt().float()
    scores = model.model.layers[1].mlp.down_proj.weight.detach().abs().sum(0) * rms
    removed = set(torch.topk(scores, 40, largest=False).indices.tolist())
    gate = model.model.layers[1].mlp.gate_proj.weight.detach().clone()
    config = PruningConfig(method="column_magnitude", sparsity=0.25, calibrated=True, target=["down_proj"])
    pruner = Pruner(model)
    pruner.prune_in_place(config, CALIBRATION)
    assert pruner.stats["input_features"]["layers"]["model.layers.1.mlp.down_proj"] == {
        "removed": 40, "of": 160, "how": "removed"}
    kept = [j for j in range(160) if j not in removed]
    assert torch.equal(pruner.model.model.layers[1].mlp.gate_proj.weight, gate[kept])


def test_conv1d_columns_are_zeroed_and_stored_sparse(tmp_path):
    pruner = Pruner(build_tiny("gpt2"))
    pruner.prune(tmp_path / "out", PruningConfig(method="column_magnitude", sparsity=0.25, calibrated=True), CALIBRATION)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert torch.equal(model_output(reloaded, sample_ids()), model_output(pruner.model, sample_ids()))
    layer = reloaded.transformer.h[0].mlp.c_proj  # Conv1D 384 -> 96: 96 of its inputs zeroed, every row alike
    dense = layer.dequantize(torch.float32)
    zero_columns = (dense == 0).all(0)
    assert isinstance(layer, SparseLinear) and int(zero_columns.sum()) == 96 and layer.nnz == 96 * (384 - 96)
    assert pruner.report["input_features"]["fraction"] == pytest.approx(0.25, abs=0.01)


def test_cli_threshold_and_recipe_keys(tmp_path, capsys):
    folder = tmp_path / "fp"
    build_tiny("llama").save_pretrained(folder)
    args = ["prune", "--model", str(folder), "--method", "column_magnitude", "--scope", "layer", "--target", "down_proj",
            "o_proj", "--float-dtype", "float32", "--threshold"]
    assert main([*args, "0.9", "--output", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "agentos_sparsity.json").read_text())
    assert 0 < report["input_features"]["fraction"] < 1
    assert "input_features_removed" in capsys.readouterr().out
    assert main([*args, "1e-9", "--output", str(tmp_path / "none")]) != 0
    assert "removes no input feature" in capsys.readouterr().err and not (tmp_path / "none").exists()
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model: m\nsteps:\n  - prune: {method: column_magnitude, threshold: 0.9, scope: global, "
                      "calibrated: true}\n")
    assert load_recipe(recipe).steps[0].options["threshold"] == 0.9
    recipe.write_text("model: m\nsteps:\n  - prune: {method: magnitude, threshold: 0.1, sparsity: 0.5}\n")
    with pytest.raises(ValueError, match=r":3: step 'prune': .*exactly one of threshold and sparsity"):
        load_recipe(recipe)


def test_columns_then_gptq_in_one_pass(tmp_path):
    from optimum_agentos import AgentOSConfig

    pruner = Pruner(build_tiny("llama"))
    pruner.prune(tmp_path / "out", PruningConfig(method="column_magnitude", threshold=1.0), CALIBRATION,
                 quantization=AgentOSConfig(bits=4, group_size=32, method="gptq"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert torch.equal(model_output(reloaded, sample_ids()), model_output(pruner.model, sample_ids()))
    features = pruner.report["input_features"]["layers"]
    for i in range(2):  # the zeroed columns decode to exactly 0 (GPTQ keeps the mask); the removed ones are gone
        gate = reloaded.model.layers[i].mlp.gate_proj
        zeroed = (gate.dequantize(torch.float32) == 0).all(0)
        assert int(zeroed.sum()) == features[f"model.layers.{i}.mlp.gate_proj"]["removed"] > 0
        assert gate.out_features == 160 - features[f"model.layers.{i}.mlp.down_proj"]["removed"]


def test_a_float_checkpoint_with_per_layer_widths_fine_tunes_without_adapters(tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    config = PruningConfig(method="column_magnitude", threshold=0.95, target=["down_proj"])  # widths differ per layer
    Pruner(build_tiny("llama")).prune(tmp_path / "out", config, float_dtype="float32")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.quantization_config.module_shapes and model.config.quantization_config.bits is None
    before = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    ids = sample_ids().tolist()
    args = TrainingArguments(output_dir=str(tmp_path / "train"), max_steps=1, per_device_train_batch_size=4,
                             learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no")
    Trainer(model=model.train(), args=args, train_dataset=Dataset.from_dict({"input_ids": ids, "labels": ids})).train()
    assert not torch.equal(model.model.layers[0].mlp.down_proj.weight, before)
