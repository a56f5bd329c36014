"""SmoothQuant: the smoothed float model computes the same function, and its W8A8 checkpoint is more accurate."""

import pytest
import torch
import transformers

import optimum_agentos  # noqa: F401
from optimum_agentos import AgentOSConfig, Pruner, PruningConfig, Quantizer, QuantLinear
from optimum_agentos.nn import dynamic_int8
from optimum_agentos.nn.dynamic_int8 import Int8DynamicKernel
from optimum_agentos.quantization.smoothquant import smooth_model, smoothing_scales
from optimum_agentos.nn.targets import resolve_targets

from ..conftest import build_tiny, model_output, needs_fbgemm, read_quant_config, run_python, sample_ids

W8A8 = dict(bits=8, group_size=-1, activations="int8-dynamic")


def tiny_llama(kv_heads=4, outliers=False):
    """Tiny Llama (4 heads; `kv_heads=4`: no grouped-query attention, so v_proj -> o_proj is smoothed too). With
    `outliers`, one channel of each norm's output is 30x larger, as in real LLMs."""
    model = build_tiny("llama", num_key_value_heads=kv_heads)
    if outliers:
        with torch.no_grad():
            for layer in model.model.layers:
                layer.input_layernorm.weight[5] = 30.0
                layer.post_attention_layernorm.weight[17] = 30.0
    return model


def relative_error(output, reference):
    return ((output - reference).pow(2).mean().sqrt() / reference.pow(2).mean().sqrt()).item()


def test_scales_balance_activation_and_weight_ranges():
    act_max = torch.tensor([8.0, 0.5, 0.0, 2.0])
    weights = [torch.tensor([[0.5, 2.0, 1.0, -0.1]]), torch.tensor([[-0.125, 1.0, 3.0, 0.4]])]
    scales = smoothing_scales(act_max, weights, alpha=0.5)
    weight_max = torch.tensor([0.5, 2.0, 3.0, 0.4])
    live = act_max > 0
    # alpha = 0.5: after smoothing each live channel's activation and weight ranges are equal
    torch.testing.assert_close((act_max / scales)[live], (weight_max * scales)[live])
    assert scales[2] == 1  # a channel that never fired is left alone
    torch.testing.assert_close(smoothing_scales(act_max, weights, 0.8)[live], (act_max.pow(0.8) / weight_max.pow(0.2))[live])


@pytest.mark.parametrize("kv_heads,groups", [(4, 8), (2, 6)])  # grouped-query attention: v_proj -> o_proj skipped
def test_smoothed_float_model_computes_the_same(kv_heads, groups):
    model = tiny_llama(kv_heads, outliers=True)
    ids = sample_ids(8, 32)
    before = model_output(model, ids)
    norm = model.model.layers[0].input_layernorm.weight.clone()
    names = resolve_targets(model, None, AgentOSConfig().ignore)
    smoothed = smooth_model(model, names, ids, alpha=0.5)
    assert len(smoothed) == groups
    assert any(producer.endswith("v_proj") for producer, _ in smoothed) == (kv_heads == 4)
    after = model_output(model, ids)
    assert (after - before).abs().max() <= 1e-4 * before.abs().max()
    weight = model.model.layers[0].input_layernorm.weight
    assert weight[5] < norm[5] / 4  # the outlier channel was moved into the weights


def test_unknown_architecture_names_the_fix():
    model = build_tiny("gpt2")
    names = resolve_targets(model, None, AgentOSConfig().ignore)
    with pytest.raises(ValueError, match="SmoothQuant knows no mapping for GPT2LMHeadModel.*drop smoothquant_alpha"):
        smooth_model(model, names, sample_ids(), alpha=0.5)


def test_a_mapping_that_changes_the_model_is_undone():
    model = tiny_llama(outliers=True)
    for layer in model.model.layers:  # the names match, but gate/up no longer read the norm's output
        layer.post_attention_layernorm.forward = lambda x: x
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="changed LlamaForCausalLM's float outputs.*undone"):
        smooth_model(model, resolve_targets(model, None, AgentOSConfig().ignore), sample_ids(4, 16), alpha=0.5)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=1e-5, atol=0, msg=key)


def test_smoothing_needs_calibration_data_and_w8a8():
    with pytest.raises(ValueError, match="smoothquant_alpha needs calibration data: pass calibration_dataset"):
        Quantizer(tiny_llama()).quantize_in_place(AgentOSConfig(**W8A8, smoothquant_alpha=0.5))
    with pytest.raises(ValueError, match="needs activations='int8-dynamic'"):
        AgentOSConfig(bits=8, group_size=-1, smoothquant_alpha=0.5)
    for alpha in (0, 1, 1.5, -0.5, True, "0.5"):
        with pytest.raises(ValueError, match="smoothquant_alpha=.* must be a (finite )?number"):
            AgentOSConfig(**W8A8, smoothquant_alpha=alpha)


def test_config_key_only_when_set():
    plain, smoothed = AgentOSConfig(**W8A8), AgentOSConfig(**W8A8, smoothquant_alpha=0.5)
    assert "smoothquant_alpha" not in plain.to_dict() and plain.stamped().format_version == 1
    assert smoothed.to_dict()["smoothquant_alpha"] == 0.5 and smoothed.stamped().format_version == 4
    assert AgentOSConfig.from_dict(smoothed.stamped().to_dict()).to_dict() == smoothed.stamped().to_dict()


def test_quantize_on_load_cannot_smooth(tiny_folder):
    with pytest.raises(ValueError, match="Quantize-on-load cannot apply smoothquant_alpha.*calibration_dataset"):
        transformers.AutoModelForCausalLM.from_pretrained(
            tiny_folder("llama"), quantization_config=AgentOSConfig(**W8A8, smoothquant_alpha=0.5))


@needs_fbgemm
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_smoothed_w8a8_checkpoint_reloads_in_a_fresh_process(method, tmp_path):
    ids, test = sample_ids(8, 32), sample_ids(2, 32, seed=7)
    config = AgentOSConfig(**W8A8, method=method, smoothquant_alpha=0.5)
    model = Quantizer(tiny_llama(outliers=True)).quantize(tmp_path / "q", config, calibration_dataset=ids)
    assert {m.kernel for m in model.modules() if isinstance(m, QuantLinear)} == {Int8DynamicKernel}
    torch.save({"ids": test, "logits": model_output(model, test)}, tmp_path / "expected.pt")
    stored = read_quant_config(tmp_path / "q")
    assert stored["smoothquant_alpha"] == 0.5 and stored["format_version"] == 4
    stdout = run_python(
        f"""
        import torch, transformers, optimum_agentos
        from optimum_agentos import QuantLinear
        from optimum_agentos.nn.dynamic_int8 import Int8DynamicKernel
        expected = torch.load({str(tmp_path / 'expected.pt')!r}, weights_only=True)
        model = transformers.AutoModelForCausalLM.from_pretrained({str(tmp_path / 'q')!r})
        assert {{m.kernel for m in model.modules() if isinstance(m, QuantLinear)}} == {{Int8DynamicKernel}}
        with torch.no_grad():
            print("EQUAL", torch.equal(model(input_ids=expected["ids"]).logits, expected["logits"]))
        """
    )
    assert "EQUAL True" in stdout, stdout


@needs_fbgemm
@pytest.mark.parametrize("threshold", [float("inf"), dynamic_int8.OUTLIER_THRESHOLD])  # pure int8, LLM.int8() split
def test_smoothing_lowers_the_w8a8_error_on_outlier_channels(threshold, monkeypatch):
    monkeypatch.setattr(dynamic_int8, "OUTLIER_THRESHOLD", threshold)
    ids, test = sample_ids(8, 32), sample_ids(2, 32, seed=7)
    reference = model_output(tiny_llama(outliers=True), test)
    errors = {}
    for alpha in (None, 0.5):
        config = AgentOSConfig(**W8A8, smoothquant_alpha=alpha)
        model = Quantizer(tiny_llama(outliers=True)).quantize_in_place(config, ids if alpha else None)
        assert {m.kernel for m in model.modules() if isinstance(m, QuantLinear)} == {Int8DynamicKernel}
        errors[alpha] = relative_error(model_output(model, test), reference)
    # measured: 0.028 -> 0.013 (pure int8) and 0.020 -> 0.013 (fp32 outlier split); a no-op smoothing fails this
    assert errors[0.5] < 0.8 * errors[None], errors


def test_the_pruner_refuses_smoothing():
    with pytest.raises(ValueError, match="The pruner does not apply smoothquant_alpha.*Quantizer"):
        Pruner(tiny_llama()).prune_in_place(PruningConfig(method="magnitude"),
                                            quantization=AgentOSConfig(**W8A8, smoothquant_alpha=0.5))
