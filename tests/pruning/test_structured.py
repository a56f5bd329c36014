"""Structured pruning on tiny Llama/Qwen2: shapes really shrink, the right units go, the result saves and reloads."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from optimum_agentos.formats.shapes import apply_module_shapes, module_shapes
from optimum_agentos.pruning.structured import (
    attention_group_scores, block_influence, mlp_neuron_scores,
    prune_attention_heads, prune_mlp_neurons, remove_layers,
)
from tests.conftest import build_tiny, model_output, sample_ids


IDS = sample_ids()
CALIBRATION = sample_ids(n=6, length=16, seed=3)
HIDDEN, INTERMEDIATE, HEAD_DIM = 96, 160, 24


def _num_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _reload(model, tmp_path):
    model.save_pretrained(tmp_path / "pruned")
    return AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()


def _zero_mlp_neurons(model, layer: int, neurons: list[int]) -> None:
    """Neurons whose down_proj column is zero write nothing: removing them must not change the output."""
    with torch.no_grad():
        model.model.layers[layer].mlp.down_proj.weight[:, neurons] = 0


def _zero_kv_group(model, layer: int, group: int) -> None:
    """Zero the o_proj columns of every query head of one KV group: the group writes nothing."""
    attn = model.model.layers[layer].self_attn
    width = attn.num_key_value_groups * attn.head_dim
    with torch.no_grad():
        attn.o_proj.weight[:, group * width:(group + 1) * width] = 0


def _wide_gqa_llama(num_layers: int = 3):
    """Tiny Llama with 8 query heads over 4 KV heads (head_dim 12), so layers can lose different numbers of groups."""
    return build_tiny("llama", intermediate_size=64, num_hidden_layers=num_layers, num_attention_heads=8,
                      num_key_value_heads=4)


# ------------------------------------------------------------------------------------------------------------ scores


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_scores_have_one_entry_per_unit(kind):
    model = build_tiny(kind)
    for ids in (None, CALIBRATION):
        neurons = mlp_neuron_scores(model, ids)
        groups = attention_group_scores(model, ids)
        assert [s.shape for s in neurons] == [torch.Size([INTERMEDIATE])] * 2
        assert [s.shape for s in groups] == [torch.Size([2])] * 2
        assert all(bool((s >= 0).all()) and bool(torch.isfinite(s).all()) for s in neurons + groups)


def test_calibrated_neuron_score_is_rms_input_times_down_column_norm():
    model = build_tiny("llama")
    inputs = []
    handle = model.model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda m, a: inputs.append(a[0]))
    with torch.no_grad():
        model(input_ids=CALIBRATION)
    handle.remove()
    x = inputs[0].reshape(-1, INTERMEDIATE)
    expected = x.pow(2).mean(0).sqrt() * model.model.layers[1].mlp.down_proj.weight.norm(dim=0)
    torch.testing.assert_close(mlp_neuron_scores(model, CALIBRATION, batch_size=4)[1], expected, rtol=1e-5, atol=1e-7)


def test_zero_units_score_zero():
    model = build_tiny("llama")
    _zero_mlp_neurons(model, 0, [3, 7])
    _zero_kv_group(model, 1, 0)
    for ids in (None, CALIBRATION):
        assert mlp_neuron_scores(model, ids)[0][[3, 7]].tolist() == [0.0, 0.0]
        assert float(attention_group_scores(model, ids)[1][0]) == 0.0


# --------------------------------------------------------------------------------------------------------------- MLP


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_uniform_mlp_pruning_shrinks_and_reloads(kind, tmp_path):
    model = build_tiny(kind)
    before = _num_params(model)
    removed = prune_mlp_neurons(model, 0.25, mlp_neuron_scores(model, CALIBRATION))
    assert {k: len(v) for k, v in removed.items()} == {"model.layers.0.mlp": 40, "model.layers.1.mlp": 40}
    assert before - _num_params(model) == 2 * 40 * 3 * HIDDEN  # gate row + up row + down column per neuron
    assert model.config.intermediate_size == 120
    for layer in model.model.layers:
        mlp = layer.mlp
        assert mlp.gate_proj.weight.shape == mlp.up_proj.weight.shape == (120, HIDDEN)
        assert mlp.down_proj.weight.shape == (HIDDEN, 120)
        assert (mlp.gate_proj.out_features, mlp.down_proj.in_features) == (120, 120)
    logits = model_output(model, IDS)
    assert torch.isfinite(logits).all()
    assert module_shapes(model) == {}
    torch.testing.assert_close(model_output(_reload(model, tmp_path), IDS), logits, rtol=0, atol=1e-6)


def test_removing_silent_neurons_keeps_logits():
    model = build_tiny("llama")
    silent = {0: list(range(0, 160, 4)), 1: list(range(1, 160, 4))}  # 40 per layer = 25%
    for layer, neurons in silent.items():
        _zero_mlp_neurons(model, layer, neurons)
    reference = model_output(model, IDS)
    removed = prune_mlp_neurons(model, 0.25, mlp_neuron_scores(model, CALIBRATION))
    assert removed == {f"model.layers.{i}.mlp": n for i, n in silent.items()}
    torch.testing.assert_close(model_output(model, IDS), reference, rtol=1e-5, atol=1e-6)


def test_weight_only_mlp_pruning_keeps_dtype():
    model = build_tiny("qwen2").to(torch.bfloat16)
    prune_mlp_neurons(model, 0.1)
    mlp = model.model.layers[0].mlp
    assert mlp.up_proj.weight.dtype == torch.bfloat16 and mlp.up_proj.weight.shape == (144, HIDDEN)
    assert model.config.intermediate_size == 144


def test_nonuniform_mlp_pruning_roundtrips_through_module_shapes():
    model = build_tiny("llama")
    _zero_mlp_neurons(model, 0, list(range(40)))  # 40 = 12.5% of the 320 neurons, all in layer 0
    reference = model_output(model, IDS)
    removed = prune_mlp_neurons(model, 0.125, uniform=False)
    assert removed == {"model.layers.0.mlp": list(range(40)), "model.layers.1.mlp": []}
    assert model.config.intermediate_size == INTERMEDIATE
    torch.testing.assert_close(model_output(model, IDS), reference, rtol=1e-5, atol=1e-6)
    shapes = module_shapes(model)
    assert shapes == {
        "model.layers.0.mlp.gate_proj": [120, HIDDEN], "model.layers.0.mlp.up_proj": [120, HIDDEN],
        "model.layers.0.mlp.down_proj": [HIDDEN, 120],
    }
    fresh = AutoModelForCausalLM.from_config(model.config).eval()
    apply_module_shapes(fresh, shapes)
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(model_output(fresh, IDS), model_output(model, IDS), rtol=0, atol=1e-6)


def test_apply_module_shapes_on_meta_model():
    model = build_tiny("llama")
    prune_mlp_neurons(model, 0.1, [torch.arange(160.0), torch.ones(160)], uniform=False)
    shapes = module_shapes(model)
    assert shapes and all(name.startswith("model.layers.0.") for name in shapes)
    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(model.config)
    apply_module_shapes(fresh, shapes)
    assert fresh.model.layers[0].mlp.down_proj.weight.device.type == "meta"
    assert {n: list(fresh.get_submodule(n).weight.shape) for n in shapes} == shapes
    fresh.load_state_dict(model.state_dict(), assign=True)  # strict: every key present, every shape matching
    assert all(torch.equal(t, model.state_dict()[n]) for n, t in fresh.state_dict().items())


def test_mlp_argument_errors():
    model = build_tiny("llama")
    with pytest.raises(ValueError, match="sparsity=1"):
        prune_mlp_neurons(model, 1.0)
    with pytest.raises(ValueError, match="one tensor per decoder layer"):
        prune_mlp_neurons(model, 0.5, [torch.ones(160)])
    with pytest.raises(ValueError, match="not a decoder-layer nn.Linear"):
        apply_module_shapes(model, {"lm_head": [10, 96]})


# --------------------------------------------------------------------------------------------------------- attention


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_uniform_head_pruning_shrinks_and_reloads(kind, tmp_path):
    model = build_tiny(kind)
    before = _num_params(model)
    removed = prune_attention_heads(model, 1, attention_group_scores(model, CALIBRATION))
    assert all(len(v) == 1 for v in removed.values()) and len(removed) == 2
    per_layer = (2 * HEAD_DIM + 2 * HEAD_DIM + 2 * HEAD_DIM) * HIDDEN  # q rows, k+v rows, o columns
    biases = 2 * HEAD_DIM + 2 * HEAD_DIM if kind == "qwen2" else 0  # q/k/v biases
    assert before - _num_params(model) == 2 * (per_layer + biases)
    config = model.config
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (2, 1, HEAD_DIM)
    for layer in model.model.layers:
        attn = layer.self_attn
        assert (attn.head_dim, attn.num_key_value_groups) == (HEAD_DIM, 2)
        assert attn.q_proj.weight.shape == (2 * HEAD_DIM, HIDDEN) and attn.k_proj.weight.shape == (HEAD_DIM, HIDDEN)
        assert attn.o_proj.weight.shape == (HIDDEN, 2 * HEAD_DIM) and attn.o_proj.in_features == 2 * HEAD_DIM
        if kind == "qwen2":
            assert attn.q_proj.bias.shape == (2 * HEAD_DIM,) and attn.v_proj.bias.shape == (HEAD_DIM,)
    logits = model_output(model, IDS)
    assert torch.isfinite(logits).all()
    assert module_shapes(model) == {}
    reloaded = _reload(model, tmp_path)
    assert reloaded.config.head_dim == HEAD_DIM
    torch.testing.assert_close(model_output(reloaded, IDS), logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_removing_silent_group_keeps_logits(kind):
    model = build_tiny(kind)
    _zero_kv_group(model, 0, 1)
    _zero_kv_group(model, 1, 0)
    reference = model_output(model, IDS)
    removed = prune_attention_heads(model, 1, attention_group_scores(model, CALIBRATION))
    assert removed == {"model.layers.0.self_attn": [1], "model.layers.1.self_attn": [0]}
    torch.testing.assert_close(model_output(model, IDS), reference, rtol=1e-5, atol=1e-6)


def test_head_pruning_errors():
    model = build_tiny("llama")
    with pytest.raises(ValueError, match="would remove every head"):
        prune_attention_heads(model, 2)
    with pytest.raises(ValueError, match="non-negative"):
        prune_attention_heads(model, -1)
    assert model.model.layers[0].self_attn.q_proj.out_features == 4 * HEAD_DIM  # nothing changed


def test_nonuniform_head_pruning_roundtrips_through_module_shapes():
    model = _wide_gqa_llama()
    for layer, group in ((0, 0), (0, 2), (2, 3)):  # 3 groups = 1 per layer on average, unevenly spread
        _zero_kv_group(model, layer, group)
    reference = model_output(model, IDS)
    removed = prune_attention_heads(model, 1, uniform=False)
    assert removed == {f"model.layers.{i}.self_attn": g for i, g in enumerate([[0, 2], [], [3]])}
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (8, 4)
    torch.testing.assert_close(model_output(model, IDS), reference, rtol=1e-5, atol=1e-6)
    shapes = module_shapes(model)
    assert shapes == {
        "model.layers.0.self_attn.q_proj": [48, 96], "model.layers.0.self_attn.k_proj": [24, 96],
        "model.layers.0.self_attn.v_proj": [24, 96], "model.layers.0.self_attn.o_proj": [96, 48],
        "model.layers.2.self_attn.q_proj": [72, 96], "model.layers.2.self_attn.k_proj": [36, 96],
        "model.layers.2.self_attn.v_proj": [36, 96], "model.layers.2.self_attn.o_proj": [96, 72],
    }
    fresh = AutoModelForCausalLM.from_config(model.config).eval()
    apply_module_shapes(fresh, shapes)
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(model_output(fresh, IDS), model_output(model, IDS), rtol=0, atol=1e-6)
    greedy = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(fresh.generate(IDS[:1, :8], **greedy), model.generate(IDS[:1, :8], **greedy, use_cache=False))


def test_apply_module_shapes_rejects_partial_heads():
    fresh = build_tiny("llama")
    with pytest.raises(ValueError, match="not whole heads"):
        apply_module_shapes(fresh, {"model.layers.0.self_attn.q_proj": [50, 96]})


# ------------------------------------------------------------------------------------------------------------ layers


def test_block_influence_range_and_identity_layer():
    model = build_tiny("llama")
    influence = block_influence(model, CALIBRATION)
    assert influence.shape == (2,) and bool(((influence > 0) & (influence <= 2)).all())
    layer = model.model.layers[1]
    with torch.no_grad():  # a block that adds nothing to the residual stream: output == input
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    influence = block_influence(model, CALIBRATION, batch_size=2)
    assert float(influence[1]) == pytest.approx(0.0, abs=1e-6) and float(influence[0]) > 0.01


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_remove_layers_generates_and_reloads(kind, tmp_path):
    model = build_tiny(kind)
    identity = model.model.layers[0]
    with torch.no_grad():
        identity.self_attn.o_proj.weight.zero_()
        identity.mlp.down_proj.weight.zero_()
    reference = model_output(model, IDS)
    kept = model.model.layers[1]
    remove_layers(model, [0])
    assert model.config.num_hidden_layers == 1 and len(model.model.layers) == 1
    assert model.model.layers[0] is kept and kept.self_attn.layer_idx == 0
    if kind == "qwen2":
        assert model.config.layer_types == ["full_attention"]
    torch.testing.assert_close(model_output(model, IDS), reference, rtol=1e-5, atol=1e-6)  # layer 0 was a no-op
    prompt = IDS[:2, :8]
    cached = model.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=0)
    uncached = model.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=0, use_cache=False)
    assert cached.shape == (2, 13) and torch.equal(cached, uncached)
    reloaded = _reload(model, tmp_path)
    assert reloaded.config.num_hidden_layers == 1
    torch.testing.assert_close(model_output(reloaded, IDS), model_output(model, IDS), rtol=0, atol=1e-6)


def test_remove_layers_renumbers_cache_slots():
    model = _wide_gqa_llama(num_layers=3)
    remove_layers(model, [1])
    assert [l.self_attn.layer_idx for l in model.model.layers] == [0, 1]
    with torch.no_grad():
        out = model(input_ids=IDS[:1, :6], use_cache=True)
    assert len(out.past_key_values.layers) == 2


@pytest.mark.parametrize("indices, message", [
    ([2], "out of range"), ([-1], "out of range"), ([0, 0], "duplicates"), ([0, 1], "remove all"),
])
def test_remove_layers_errors(indices, message):
    model = build_tiny("llama")
    with pytest.raises(ValueError, match=message):
        remove_layers(model, indices)
    assert len(model.model.layers) == 2 and model.config.num_hidden_layers == 2


# ------------------------------------------------------------------------------------------------------- unsupported


@pytest.mark.parametrize("call", [
    lambda m: mlp_neuron_scores(m), lambda m: prune_mlp_neurons(m, 0.25), lambda m: prune_attention_heads(m, 1),
    lambda m: remove_layers(m, [0]), lambda m: block_influence(m, CALIBRATION), lambda m: module_shapes(m),
])
def test_unsupported_model_is_named(call):
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*Supported: Llama-style"):
        call(build_tiny("gpt2"))


def test_replaced_linear_is_rejected():
    from optimum_agentos.nn.sparse_linear import SparseLinear

    model = build_tiny("llama")
    down = model.model.layers[1].mlp.down_proj
    model.model.layers[1].mlp.down_proj = SparseLinear.from_dense(down.weight.detach(), down.weight != 0, None)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj` is a SparseLinear"):
        prune_mlp_neurons(model, 0.25)
