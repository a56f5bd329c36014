"""fbgemm int8 kernel (int8 activations per token) against the dequantize reference, within its rounding bound."""

import pytest
import torch
import torch.nn.functional as F
import transformers

import optimum_agentos  # noqa: F401
from optimum_agentos import AgentOSConfig, QuantLinear
from optimum_agentos.nn.dynamic_int8 import (
    ONEDNN_MIN_TOKENS,
    OUTLIER_THRESHOLD,
    Int8DynamicKernel,
    activation_step,
    engine_check,
    onednn_matmul,
)
from optimum_agentos.nn.prepare import prepare_kernels

from ..conftest import needs_fbgemm, save_llama_with_short_groups


pytestmark = needs_fbgemm  # every test here runs the fbgemm / oneDNN int8 kernel


def layer(in_features=576, out_features=192, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=g) * 0.05
    b = torch.randn(out_features, generator=g) if bias else None
    module = QuantLinear.from_float(weight, b, 8, -1, sym=False)
    assert prepare_kernels(module, activations="int8-dynamic") == {"": Int8DynamicKernel.name}
    return module


def reference(module, x):
    return F.linear(x, module.dequantize(x.dtype), module.bias)


def _step(module, x, exact_channels):
    """Each token's grid step (channels computed in float32 excluded from the grid's range)."""
    flat = x.reshape(-1, module.in_features).clone()
    flat[:, list(exact_channels)] = 0
    engine = "onednn" if module.kernel_packed_large is not None and len(flat) >= ONEDNN_MIN_TOKENS else "fbgemm"
    return activation_step(flat, engine_check(engine)[0])  # [tokens, 1]


def rounding_bound(module, x, exact_channels=()):
    """Largest output error activation rounding can cause: half a grid step times sum_k |w[n, k]|, plus float32
    slack."""
    weight_l1 = module.dequantize().abs().sum(dim=1)  # [out]
    slack = 1e-4 * reference(module, x).abs().amax()
    return (_step(module, x, exact_channels) / 2 * weight_l1 * 1.001 + slack).reshape(*x.shape[:-1], -1)


def typical_error(module, x, exact_channels=()):
    """Standard deviation of that error for rounding errors uniform over a step: step / sqrt(12) * |w[n]|_2."""
    weight_l2 = module.dequantize().norm(dim=1)
    return (_step(module, x, exact_channels) / 12**0.5 * weight_l2).reshape(*x.shape[:-1], -1)


def test_this_cpu_runs_asymmetric_int8_weights_exactly():
    reduce_range, reason = engine_check("fbgemm")
    assert reason is None and reduce_range is not None
    module = layer()
    assert (module.kernel_packed_large is None) == (engine_check("onednn")[1] is not None)


def test_the_onednn_weight_is_ours_without_the_zero_points():
    module = layer()
    if module.kernel_packed_large is None:
        pytest.skip(f"no oneDNN int8 here: {engine_check('onednn')[1]}")
    tokens = torch.randint(0, 256, (40, 576), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = onednn_matmul(tokens, module.kernel_packed_large, module.kernel_scale)
    weight = (module.codes().double() - 128) * module.weight_scale[:, :1].double()  # w + zero_term
    exact = (tokens.double() - 128) @ weight.t()
    assert (out.double() - exact).abs().max() <= 1e-6 * exact.abs().max()


def test_packed_weight_is_our_codes_bit_for_bit():
    module = layer()
    weight, bias = torch.ops.quantized.linear_unpack(module.kernel_packed)
    assert bias is None
    assert torch.equal((weight.int_repr().to(torch.int16) + 128).to(torch.uint8), module.codes())
    assert torch.equal(weight.q_per_channel_scales().float(), module.weight_scale[:, 0].float())
    assert torch.equal(weight.q_per_channel_zero_points(), module.weight_zero[:, 0].long() - 128)
    assert torch.equal(weight.dequantize(), module.dequantize())


@pytest.mark.parametrize("tokens", [1, 5, ONEDNN_MIN_TOKENS + 32])  # the last: oneDNN, where it works
@pytest.mark.parametrize("bias", [True, False])
def test_output_is_within_the_activation_rounding_bound(tokens, bias):
    module = layer(bias=bias)
    g = torch.Generator().manual_seed(tokens)
    scales = torch.linspace(0.1, 2, tokens).view(1, tokens, 1)  # tokens of unlike scale
    x = torch.randn(2, tokens, 576, generator=g).clamp(-2.2, 2.2) * scales
    x[:, :, 7] += 1.5  # a one-sided channel: asymmetric token ranges
    assert x.abs().max() < OUTLIER_THRESHOLD
    with torch.no_grad():
        fast, ref = module(x), reference(module, x)
    assert fast.shape == ref.shape == (2, tokens, 192)
    assert ((fast - ref).abs() <= rounding_bound(module, x)).all()
    assert ((fast - ref).abs() <= 6 * typical_error(module, x)).all()
    assert not torch.equal(fast, ref)  # it really ran in int8
    assert (fast - ref).abs().max() <= 0.02 * ref.abs().max()


@pytest.mark.parametrize("tokens", [5, ONEDNN_MIN_TOKENS + 32])  # fbgemm, then oneDNN where it works
def test_several_tokens_compute_exactly_on_per_token_grids(tokens):
    """Each token rounded to 256 levels between its min and max, then multiplied exactly (to float32 rounding; a
    value right at a rounding boundary may land one level over, moving its token's outputs by a step times w)."""
    module = layer()
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(3, tokens, 576, generator=g).clamp(-4, 4) + torch.linspace(-1, 1, tokens).view(1, tokens, 1)
    low, high = x.amin(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True)
    step = (high - low) / 255
    rounded = low + step * torch.round((x - low) / step)
    with torch.no_grad():
        fast, ref = module(x), reference(module, rounded)
    error, slack = (fast - ref).abs(), 1e-5 * ref.abs().max()
    assert (error <= slack).all(dim=-1).float().mean() >= 0.9  # most tokens: exactly the rounded product
    assert (error <= slack + step * module.dequantize().abs().max()).all()
    assert (fast - reference(module, x)).abs().max() > 1e-3 * ref.abs().max()  # rounding x does matter


@pytest.mark.parametrize("tokens", [1, 24, ONEDNN_MIN_TOKENS + 8])
def test_outlier_channels_are_computed_in_float32(tokens):
    module = layer(bias=False)
    x = torch.randn(1, tokens, 576)
    x[0, 0, 3] = 40.0  # one huge value: its channel leaves the int8 grid for every token
    x[0, -1, 100] = -25.0
    with torch.no_grad():
        fast, ref = module(x), reference(module, x)
    # the error of a grid that ignores channels 3 and 100: with them the grid step would be about 10x coarser
    assert ((fast - ref).abs() <= rounding_bound(module, x, exact_channels=(3, 100))).all()
    assert ((fast - ref).abs() <= 6 * typical_error(module, x, exact_channels=(3, 100))).all()


def test_other_activation_dtypes_empty_inputs_and_autograd():
    module = layer()
    with torch.no_grad():
        assert module(torch.randn(2, 0, 576)).shape == (2, 0, 192)
    x = torch.randn(1, 3, 576, dtype=torch.bfloat16)
    with torch.no_grad():
        assert module(x).dtype == torch.bfloat16
    x = torch.randn(1, 3, 576)
    with torch.no_grad():
        assert not torch.equal(module(x), reference(module, x))
    assert torch.equal(module(x), reference(module, x))  # grad mode: the exact reference path, even without grad


@pytest.mark.parametrize("tokens", [1, 4])
def test_new_codes_repack_and_drop_cached_outlier_columns(tokens):
    module = layer()
    x = torch.randn(1, tokens, 576)
    x[..., 9] = 30.0  # an outlier channel: its float32 weight column is cached
    with torch.no_grad():
        module(x)
        other = layer(seed=3)
        module.load_codes(other.codes(), other.weight_scale, other.weight_zero)
        for _ in range(2):  # the second call reuses the cached column
            assert ((module(x) - reference(module, x)).abs() <= rounding_bound(module, x, exact_channels=(9,))).all()


def test_loaded_int8_checkpoint_uses_fbgemm_and_computes_like_the_reference(tmp_path, monkeypatch):
    save_llama_with_short_groups(tmp_path / "fp")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "fp", quantization_config=AgentOSConfig(bits=8, group_size=-1, activations="int8-dynamic"))
    model.save_pretrained(tmp_path / "q")
    fast = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()
    assert {m.kernel for m in fast.modules() if isinstance(m, QuantLinear)} == {Int8DynamicKernel}
    assert fast.config.quantization_config.activations == "int8-dynamic"  # stored in config.json, reloaded
    weight_only = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "fp", quantization_config=AgentOSConfig(bits=8, group_size=-1))
    assert Int8DynamicKernel not in {m.kernel for m in weight_only.modules() if isinstance(m, QuantLinear)}
    monkeypatch.setenv("OPTIMUM_AGENTOS_KERNELS", "reference")
    slow = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()
    ids = torch.tensor([[5, 9, 17, 33, 2, 90, 64, 11, 3, 7]])
    with torch.no_grad():
        for tokens in (ids, ids[:, :1]):  # prefill (per-token grids) and one token
            a, b = fast(tokens).logits, slow(tokens).logits
            assert (a - b).abs().max() <= 0.02 * b.abs().max()


def test_fbgemm_holds_the_only_copy_of_the_codes_and_the_state_dict_is_unchanged():
    module = layer()
    plain = layer()
    prepare_kernels(plain, policy="reference")
    assert module.weight_in_kernel and module.weight.numel() == 0 and not plain.weight_in_kernel
    state, expected = module.state_dict(), plain.state_dict()
    assert list(state) == list(expected)
    for key in expected:
        assert state[key].dtype == expected[key].dtype and torch.equal(state[key], expected[key]), key
    assert torch.equal(module.codes(), plain.codes())
    prepare_kernels(module, policy="reference")  # switching back gives `weight` its codes again
    assert not module.weight_in_kernel and torch.equal(module.weight, plain.weight)


def test_load_state_dict_into_a_prepared_layer_repacks():
    module, other = layer(), layer(seed=4)
    module.load_state_dict(other.state_dict())
    assert module.weight_in_kernel and torch.equal(module.codes(), other.codes())
    x = torch.randn(1, 3, 576)
    with torch.no_grad():
        assert torch.equal(module(x), other(x))


def test_int8_checkpoint_save_reload_is_bit_exact(tmp_path, monkeypatch):
    save_llama_with_short_groups(tmp_path / "fp")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "fp", quantization_config=AgentOSConfig(bits=8, group_size=-1, activations="int8-dynamic"))
    assert all(m.weight_in_kernel for m in model.modules() if isinstance(m, QuantLinear))
    model.save_pretrained(tmp_path / "q")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    reloaded.save_pretrained(tmp_path / "q2")
    monkeypatch.setenv("OPTIMUM_AGENTOS_KERNELS", "reference")
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q")  # `weight` as read from the file
    from safetensors.torch import load_file

    first, second = load_file(tmp_path / "q" / "model.safetensors"), load_file(tmp_path / "q2" / "model.safetensors")
    expected = plain.state_dict()
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key
    for key, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, expected[key]), key


@pytest.mark.parametrize("kwargs", [dict(bits=4, group_size=128), dict(bits=8, group_size=128)])
def test_w8a8_needs_per_row_int8(kwargs):
    with pytest.raises(ValueError, match="int8-dynamic.*bits=8 and group_size=-1"):
        AgentOSConfig(activations="int8-dynamic", **kwargs)
    with pytest.raises(ValueError, match="activations='int4' is not supported"):
        AgentOSConfig(activations="int4")
