"""Pruner end to end on tiny models: prune, save, reload with plain from_pretrained, exact logits and sparsity."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import optimum_agentos  # noqa: F401
from optimum_agentos import AgentOSConfig, Pruner, PruningConfig, SparseLinear
from optimum_agentos.formats import folder_size
from optimum_agentos.nn.sparse_linear import SparseCheckpointError
from tests.conftest import build_tiny, model_output, run_python, sample_ids


CALIBRATION = torch.randint(2, 128, (16, 32), generator=torch.Generator().manual_seed(0))

CASES = {
    "magnitude": (dict(method="magnitude"), None),
    "wanda": (dict(method="wanda"), None),
    "sparsegpt": (dict(method="sparsegpt"), None),
    "sparsegpt-2:4": (dict(method="sparsegpt", pattern="2:4"), None),
    "wanda-4:8": (dict(method="wanda", pattern="4:8"), None),
    "sparsegpt+gptq-int4": (dict(method="sparsegpt"), dict(bits=4, group_size=32, method="gptq")),
    "magnitude+rtn-int8": (dict(method="magnitude", sparsity=0.3), dict(bits=8, group_size=-1, method="rtn")),
}


def _zeros_within_groups(layer: SparseLinear, config: PruningConfig) -> None:
    """The stored layer has the requested sparsity to within one element per selection group."""
    total = layer.in_features * layer.out_features
    zeros = total - layer.nnz
    if config.n_m:
        per_group = (~layer.kept()).view(layer.out_features, -1, config.n_m[1]).sum(-1)
        assert bool((per_group == config.n_m[1] - config.n_m[0]).all())
        return
    groups = {
        "magnitude": 1,  # one ranking over the whole matrix
        "wanda": layer.out_features,  # per output row
        "sparsegpt": math.ceil(layer.in_features / config.block_size),  # per block of columns
    }[config.method]
    assert abs(zeros - config.sparsity * total) <= groups


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("case", list(CASES))
def test_prune_save_reload_is_exact(tmp_path, kind, case):
    prune_kwargs, quant_kwargs = CASES[case]
    config = PruningConfig(**prune_kwargs)
    quantization = AgentOSConfig(**quant_kwargs) if quant_kwargs else None
    pruner = Pruner(build_tiny(kind))
    pruner.prune(tmp_path / "out", config, CALIBRATION, quantization=quantization)
    expected = model_output(pruner.model, sample_ids())

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert torch.equal(model_output(reloaded, sample_ids()), expected)
    stored = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert stored["format_version"] == 2 and stored["pruning"]["method"] == config.method
    sparse = {n: m for n, m in reloaded.named_modules() if isinstance(m, SparseLinear)}
    assert sorted(sparse) == sorted(stored["sparse_layers"]) and len(sparse) == {"llama": 14, "gpt2": 8}[kind]
    for layer in sparse.values():
        _zeros_within_groups(layer, config)
        assert torch.equal(layer.dequantize(torch.float32) == 0, ~layer.kept()) or quantization is not None
    assert (layer.bits is None) == (quantization is None)
    assert abs(pruner.report["sparsity"] - config.sparsity) < 0.02
    assert "Pruning" in (tmp_path / "out" / "README.md").read_text()


def test_sparse_checkpoint_is_smaller_than_dense(tmp_path):
    model = build_tiny("llama")
    model.to(torch.bfloat16).save_pretrained(tmp_path / "dense")
    Pruner(build_tiny("llama")).prune(tmp_path / "sparse", PruningConfig(method="magnitude"), float_dtype="bfloat16")
    Pruner(build_tiny("llama")).prune(
        tmp_path / "sparse-int4", PruningConfig(method="magnitude"), quantization=AgentOSConfig(bits=4, group_size=32)
    )
    dense, sparse, int4 = (folder_size(tmp_path / d) for d in ("dense", "sparse", "sparse-int4"))
    # the tiny model is 14% embeddings (kept dense); its linear layers shrink to 0.5625x
    assert sparse < 0.65 * dense
    assert int4 < 0.6 * sparse  # 3 bits per weight (half the 4-bit codes + the mask) plus group scales


def test_pruned_checkpoint_loads_in_a_fresh_process(tmp_path):
    pruner = Pruner(build_tiny("qwen2"))
    pruner.prune(tmp_path / "out", PruningConfig(method="wanda", pattern="2:4"), CALIBRATION,
                 quantization=AgentOSConfig(bits=4, group_size=32, method="gptq"))
    torch.save(model_output(pruner.model, sample_ids()), tmp_path / "expected.pt")
    out = run_python(f"""
        import torch, optimum_agentos
        from transformers import AutoModelForCausalLM
        from tests.conftest import sample_ids
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "out")!r})
        expected = torch.load({str(tmp_path / "expected.pt")!r}, weights_only=True)
        with torch.no_grad():
            print(torch.equal(model(input_ids=sample_ids()).logits, expected), type(model.model.layers[0].mlp.up_proj).__name__)
    """)
    assert out.split() == ["True", "SparseLinear"]


def test_dequantize_gives_dense_layers_with_the_zeros(tmp_path):
    Pruner(build_tiny("llama")).prune(tmp_path / "out", PruningConfig(method="magnitude"), float_dtype=None)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    expected = model_output(model, sample_ids())
    model.dequantize()
    layer = model.model.layers[0].mlp.down_proj
    assert type(layer) is torch.nn.Linear and abs(float((layer.weight == 0).float().mean()) - 0.5) < 1e-3
    assert torch.allclose(model_output(model, sample_ids()), expected, atol=1e-5)


def _saved(tmp_path):
    Pruner(build_tiny("llama")).prune(tmp_path / "out", PruningConfig(method="magnitude"), float_dtype=None)
    return tmp_path / "out"


def test_a_flipped_bitmask_bit_is_a_clear_error(tmp_path):
    folder = _saved(tmp_path)
    path = folder / "model.safetensors"
    tensors = load_file(path)
    key = "model.layers.0.mlp.up_proj.weight_mask"
    tensors[key][0] ^= 1  # one more or one fewer kept weight than values stored
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(SparseCheckpointError, match="model.layers.0.mlp.up_proj: the bitmask marks"):
        AutoModelForCausalLM.from_pretrained(folder)


def test_a_count_that_does_not_match_the_values_is_a_clear_error(tmp_path):
    folder = _saved(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["sparse_layers"]["model.layers.1.self_attn.q_proj"] += 3
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(SparseCheckpointError, match="model.layers.1.self_attn.q_proj: config.json records"):
        AutoModelForCausalLM.from_pretrained(folder)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(sparsity=1.0), r"sparsity=1.0 must be in \[0, 1\)"),
        (dict(sparsity=-0.1), "must be in"),
        (dict(pattern="2-4"), "must look like 'N:M'"),
        (dict(pattern="4:2"), "0 < N < M"),
        (dict(pattern="2:4", sparsity=0.3), "removes 0.50 of the weights"),
        (dict(method="obs"), "method='obs' is not supported"),
        (dict(method=None), "Nothing to prune"),
        (dict(method="wanda", scope="global"), "scope='global'"),
        (dict(layer_sparsity={"mlp": 1.5}), r"layer_sparsity\['mlp'\]"),
        (dict(attention_groups=-1), "attention_groups=-1"),
    ],
)
def test_bad_config_names_the_fix(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PruningConfig(**kwargs)


def test_config_json_round_trip():
    config = PruningConfig(method="wanda", pattern="2:4", target=["mlp"], mlp_neurons=0.25)
    assert PruningConfig.from_dict(json.loads(config.to_json_string())) == config
    with pytest.raises(ValueError, match="Unknown PruningConfig keys \\['sparsty'\\]"):
        PruningConfig.from_dict({"sparsty": 0.5})


@pytest.mark.parametrize(
    "config,calibration,match",
    [
        (PruningConfig(method="wanda", pattern="1:5"), CALIBRATION, "96 input features, not a multiple of M=5"),
        (PruningConfig(method="sparsegpt"), None, "needs calibration data"),
        (PruningConfig(method="sparsegpt"), torch.zeros(0, 8, dtype=torch.long), "has 0 tokens"),
        (PruningConfig(method="wanda"), CALIBRATION[:1, :8], "has 8 tokens; wanda needs at least 160"),
        (PruningConfig(method="magnitude", target=["norm"]), None, "unsupported layer types \\['LlamaRMSNorm'\\]"),
        (PruningConfig(method="magnitude", target=["nope"]), None, "matches no module"),
    ],
)
def test_bad_input_fails_early_and_keeps_the_old_checkpoint(tmp_path, config, calibration, match):
    Pruner(build_tiny("llama")).prune(tmp_path / "out", PruningConfig(method="magnitude"))
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    with pytest.raises(ValueError, match=match):
        Pruner(build_tiny("llama")).prune(tmp_path / "out", config, calibration)
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before


def test_already_compressed_model_is_refused(tmp_path):
    folder = _saved(tmp_path)
    with pytest.raises(ValueError, match="already agentos-quantized"):
        Pruner(AutoModelForCausalLM.from_pretrained(folder)).prune(tmp_path / "again", PruningConfig(method="magnitude"))


STRUCTURED = {
    "mlp-uniform": dict(method=None, mlp_neurons=0.25),
    "heads-uniform": dict(method=None, attention_groups=1),
    "layers": dict(method=None, layers=1),
    "mlp-non-uniform+wanda": dict(method="wanda", mlp_neurons=0.25, uniform=False, target=["re:.*self_attn.*"]),
    "heads-non-uniform": dict(method=None, attention_groups=1, uniform=False),
}


@pytest.mark.parametrize("case", list(STRUCTURED))
def test_structured_prune_reloads_with_from_pretrained(tmp_path, case):
    config = PruningConfig(**STRUCTURED[case])
    pruner = Pruner(build_tiny("llama"))
    before = pruner.model.num_parameters()
    pruner.prune(tmp_path / "out", config, CALIBRATION, float_dtype=None)
    expected = model_output(pruner.model, sample_ids())
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert torch.equal(model_output(reloaded, sample_ids()), expected)
    assert pruner.report["params_after"] < before == pruner.report["params_before"]
    if config.uniform and not config.method:
        assert "quantization_config" not in saved  # a plain checkpoint: loads without optimum-agentos
        assert (saved["intermediate_size"], saved["num_key_value_heads"], saved["num_hidden_layers"]) == {
            "mlp-uniform": (120, 2, 2), "heads-uniform": (160, 1, 2), "layers": (160, 2, 1)}[case]
    else:
        shapes = saved["quantization_config"]["module_shapes"]
        assert shapes and all(list(reloaded.get_submodule(n).weight.shape) == s or
                              [reloaded.get_submodule(n).out_features, reloaded.get_submodule(n).in_features] == s
                              for n, s in shapes.items())


def test_structured_on_an_unsupported_architecture_names_it():
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        Pruner(build_tiny("gpt2")).prune_in_place(PruningConfig(method=None, mlp_neurons=0.25))


def test_uniform_structured_checkpoint_is_saved_in_float_dtype(tmp_path):
    from safetensors import safe_open

    pruner = Pruner(build_tiny("llama"))
    pruner.prune(tmp_path / "out", PruningConfig(method=None, mlp_neurons=0.25), CALIBRATION, float_dtype="bfloat16")
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).state_dict()
    for name, value in pruner.model.state_dict().items():
        assert torch.equal(reloaded[name], value.float()), name
