"""Packed CPU kernels of QuantLinear against the dequantize reference, their dispatch, and loading with them."""

import pytest
import torch
import torch.nn.functional as F
import transformers

import optimum_agentos  # noqa: F401
from optimum_agentos import AgentOSConfig, QuantLinear
from optimum_agentos.quantization.kernels import Int4PackKernel, Int8PackKernel, choose_kernel, prepare_kernels

# bf16 activations (and int4 scales) against the fp32 reference: relative to the output's magnitude
TOLERANCE = 1e-2


def layer(bits, group_size, in_features=256, out_features=192, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=g) * 0.05
    b = torch.randn(out_features, generator=g) if bias else None
    return QuantLinear.from_float(weight, b, bits, group_size, sym=False)


def reference(module, x):
    return F.linear(x, module.dequantize(x.dtype), module.bias)


@pytest.mark.parametrize("bits, group_size, kernel", [(4, 128, Int4PackKernel), (4, 32, Int4PackKernel),
                                                     (4, -1, Int4PackKernel), (8, -1, Int8PackKernel)])
@pytest.mark.parametrize("tokens", [1, 5])
def test_kernel_matches_the_reference_within_tolerance(bits, group_size, kernel, tokens):
    module = layer(bits, group_size)
    prepare_kernels(module)
    assert module.kernel is kernel
    x = torch.randn(1, tokens, 256)
    with torch.no_grad():
        fast, ref = module(x), reference(module, x)
    assert fast.shape == ref.shape == (1, tokens, 192)
    assert (fast - ref).abs().max() <= TOLERANCE * ref.abs().max()
    assert not torch.equal(fast, ref)  # it really took the packed path


def test_long_inputs_and_autograd_take_the_exact_reference_path():
    module = layer(4, 128)
    prepare_kernels(module)
    x = torch.randn(2, 64, 256)
    with torch.no_grad():
        assert torch.equal(module(x), reference(module, x))
    x = torch.randn(1, 1, 256, requires_grad=True)
    out = module(x)
    assert torch.equal(out, reference(module, x))
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_kernel_buffers_stay_out_of_the_state_dict_and_follow_new_codes():
    module = layer(4, 128)
    keys = set(module.state_dict())
    prepare_kernels(module)
    assert set(module.state_dict()) == keys
    other = layer(4, 128, seed=5)
    module.load_codes(other.codes(), other.weight_scale, other.weight_zero)
    x = torch.randn(1, 1, 256)
    with torch.no_grad():
        ref = reference(module, x)
        assert (module(x) - ref).abs().max() <= TOLERANCE * ref.abs().max()


@pytest.mark.parametrize("bits, group_size, in_features, reason", [
    (3, 128, 256, "3-bit"), (4, 64, 96, "needs 32/64/128/256 dividing it"), (8, 128, 256, "one scale per output row"),
    (2, -1, 256, "2-bit"),
])
def test_layers_without_a_kernel_say_why_and_stay_correct(bits, group_size, in_features, reason):
    module = layer(bits, group_size, in_features=in_features)
    kernel, why = choose_kernel(module)
    assert kernel is None and reason in why
    assert prepare_kernels(module) == {"": "reference"}
    x = torch.randn(1, 1, in_features)
    with torch.no_grad():
        assert torch.equal(module(x), reference(module, x))


def test_reference_policy_and_unknown_policy():
    module = layer(4, 128)
    assert prepare_kernels(module, policy="reference") == {"": "reference"} and module.kernel is None
    with pytest.raises(ValueError, match="Unknown kernel policy"):
        prepare_kernels(module, policy="fast")


def test_loaded_checkpoint_uses_the_kernels_and_generates_like_the_reference(tmp_path, monkeypatch):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "fp")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "fp", quantization_config=AgentOSConfig(bits=4, group_size=64))
    model.save_pretrained(tmp_path / "q")
    fast = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()
    kernels = {m.kernel for m in fast.modules() if isinstance(m, QuantLinear)}
    assert kernels == {Int4PackKernel}
    monkeypatch.setenv("OPTIMUM_AGENTOS_KERNELS", "reference")
    slow = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()
    assert {m.kernel for m in slow.modules() if isinstance(m, QuantLinear)} == {None}
    ids = torch.tensor([[5, 9, 17, 33]])
    with torch.no_grad():
        a = fast(ids[:, :1]).logits  # one token: the packed path
        b = slow(ids[:, :1]).logits
    assert (a - b).abs().max() <= 2 * TOLERANCE * b.abs().max()
