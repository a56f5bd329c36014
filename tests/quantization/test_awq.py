"""AWQ: folded scales keep the float function, lower the rounding error on outlier channels, and reload exactly."""

import pytest
import torch
import transformers

import optimum_agentos  # noqa: F401
from optimum_agentos import AgentOSConfig, Pruner, PruningConfig, Quantizer
from optimum_agentos.calibration.runner import collect_input_stats, run_blocks
from optimum_agentos.nn.qmath import dequantize_codes, quantize_codes, quantize_rtn
from optimum_agentos.nn.targets import resolve_targets
from optimum_agentos.quantization.awq import awq_groups, clip_qparams, fold_block_scales, search_scales

from ..conftest import build_tiny, model_output, read_quant_config, run_python, sample_ids
from .test_smoothquant import relative_error, tiny_llama

INT4 = dict(bits=4, group_size=32)


def fold_only(model, ids):
    """Search and fold AWQ's scales block by block, leaving the layers in float."""
    names = resolve_targets(model, None, AgentOSConfig().ignore)
    groups = awq_groups(model, names)

    def process(block, layers, inputs):
        stats = collect_input_stats(block, layers, inputs)
        fold_block_scales(dict(model.named_modules()), groups, stats, 4, 32, False)

    run_blocks(model, names, ids, process)
    return groups


@pytest.mark.parametrize("kv_heads,groups", [(4, 8), (2, 6)])  # grouped-query attention: v_proj -> o_proj skipped
def test_folded_scales_keep_the_float_outputs(kv_heads, groups):
    model = tiny_llama(kv_heads, outliers=True)
    ids = sample_ids(8, 32)
    before = model_output(model, ids)
    norm = model.model.layers[0].input_layernorm.weight.clone()
    assert len(fold_only(model, ids)) == groups
    after = model_output(model, ids)
    assert (after - before).abs().max() <= 1e-5 * before.abs().max()
    scaled = model.model.layers[0].input_layernorm.weight
    assert not torch.allclose(scaled, norm)  # the search chose scales, not s = 1
    assert scaled[5] < norm[5]  # the outlier channel is scaled down in the norm, up in q/k/v


def test_scale_search_never_loses_to_no_scaling():
    torch.manual_seed(0)
    x = torch.randn(256, 64)
    x[:, [3, 40]] *= 20  # two outlier input channels, as in LLM activations
    hessian = 2 * x.t() @ x / x.shape[0]
    weight = torch.randn(48, 64)
    scales = search_scales([weight], hessian, 3, 32, False)
    error = lambda w: ((w - weight) @ x.t()).pow(2).sum()
    rtn = dequantize_codes(*quantize_rtn(weight, 3, 32, False, torch.float32), 32)
    codes, s, z = quantize_rtn(weight * scales, 3, 32, False, torch.float32)
    assert error(dequantize_codes(codes, s, z, 32) / scales) < 0.9 * error(rtn)
    clip_s, clip_z = clip_qparams(weight, hessian, 3, 32, False, torch.float32)
    clipped = dequantize_codes(quantize_codes(weight, clip_s, clip_z, 3, 32), clip_s, clip_z, 32)
    assert error(clipped) <= error(rtn)


def test_awq_beats_rtn_on_outlier_activations():
    ids = sample_ids(8, 32)
    reference = model_output(tiny_llama(outliers=True), ids)
    errors = {}
    for name, kwargs in {"rtn": dict(method="rtn"), "awq": dict(method="awq"),
                         "awq+gptq": dict(method="gptq", awq=True)}.items():
        model = tiny_llama(outliers=True)
        Quantizer(model).quantize_in_place(AgentOSConfig(**INT4, **kwargs), ids if name != "rtn" else None)
        errors[name] = relative_error(model_output(model, ids), reference)
    assert errors["awq"] < 0.5 * errors["rtn"], errors
    assert errors["awq+gptq"] < 0.5 * errors["rtn"], errors


def test_awq_checkpoint_reloads_bit_exact_in_a_fresh_process(tmp_path):
    ids, test = sample_ids(8, 32), sample_ids(2, 32, seed=7)
    model = Quantizer(tiny_llama(outliers=True)).quantize(tmp_path / "q", AgentOSConfig(**INT4, method="awq"), ids)
    torch.save({"ids": test, "logits": model_output(model, test)}, tmp_path / "expected.pt")
    stored = read_quant_config(tmp_path / "q")
    assert stored["method"] == "awq" and stored["format_version"] == 5 and "awq" not in stored
    stdout = run_python(
        f"""
        import torch, transformers, optimum_agentos
        expected = torch.load({str(tmp_path / 'expected.pt')!r}, weights_only=True)
        model = transformers.AutoModelForCausalLM.from_pretrained({str(tmp_path / 'q')!r})
        with torch.no_grad():
            print("EQUAL", torch.equal(model(input_ids=expected["ids"]).logits, expected["logits"]))
        """
    )
    assert "EQUAL True" in stdout, stdout


def test_a_model_without_the_layout_is_refused():
    with pytest.raises(ValueError, match="AWQ knows no layout of GPT2LMHeadModel.*without awq"):
        Quantizer(build_tiny("gpt2")).quantize_in_place(AgentOSConfig(**INT4, method="awq"), sample_ids())


def test_a_layout_that_does_not_fold_is_named_and_left_unchanged():
    model = tiny_llama(outliers=True)
    for layer in model.model.layers:  # the names match, but gate/up no longer read the norm's output
        layer.post_attention_layernorm.forward = lambda x: x
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="AWQ cannot fold scales into LlamaForCausalLM: scaling "
                                         "post_attention_layernorm -> mlp.gate_proj, mlp.up_proj changed"):
        Quantizer(model).quantize_in_place(AgentOSConfig(**INT4, method="gptq", awq=True), sample_ids())
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=1e-6, atol=0, msg=key)


def test_config_errors_name_the_fix():
    cases = {
        "method='awq' already is AWQ": dict(method="awq", awq=True),
        "for AWQ with round to nearest use method='awq'": dict(method="rtn", awq=True),
        "AWQ is for weight-only quantization": dict(bits=8, group_size=-1, method="awq", activations="int8-dynamic"),
        "rounding_steps sets learned rounding: it needs method='autoround'": dict(method="gptq", rounding_steps=10),
        "awq=.* must be a boolean": dict(method="gptq", awq="yes"),
    }
    for message, kwargs in cases.items():
        with pytest.raises(ValueError, match=message):
            AgentOSConfig(**kwargs)
    with pytest.raises(ValueError, match="method='awq' needs calibration data"):
        Quantizer(tiny_llama()).quantize_in_place(AgentOSConfig(method="awq"))
    with pytest.raises(ValueError, match="The pruner quantizes with method='rtn' or 'gptq', got method='gptq' with "
                                         "awq=True"):
        Pruner(tiny_llama()).prune_in_place(PruningConfig(method="magnitude"),
                                            quantization=AgentOSConfig(method="gptq", awq=True))


def test_config_keys_and_format_version():
    plain, off, on = AgentOSConfig(method="gptq"), AgentOSConfig(method="gptq", awq=False), AgentOSConfig(
        method="gptq", awq=True)
    assert "awq" not in plain.to_dict() and "awq" not in off.to_dict() and plain.stamped().format_version == 1
    assert on.to_dict()["awq"] is True and on.stamped().format_version == 5
    assert AgentOSConfig(method="awq").stamped().format_version == 5
    assert AgentOSConfig.from_dict(on.stamped().to_dict()).to_dict() == on.stamped().to_dict()


def test_quantize_on_load_cannot_run_awq(tiny_folder):
    with pytest.raises(ValueError, match="Quantize-on-load only supports method='rtn'.*got method='awq'"):
        transformers.AutoModelForCausalLM.from_pretrained(tiny_folder("llama"),
                                                          quantization_config=AgentOSConfig(method="awq"))
