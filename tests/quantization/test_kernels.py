"""Packed CPU kernels of QuantLinear against the dequantize reference, their dispatch, and loading with them."""

import pytest
import torch
import torch.nn.functional as F
import transformers

import optimum_agentos  # noqa: F401
from optimum_agentos import AgentOSConfig, QuantLinear
from optimum_agentos.nn.kernels import (
    Int4PackKernel,
    Int8DynamicKernel,
    Int8PackKernel,
    choose_kernel,
    int4_kernel_group,
)
from optimum_agentos.nn import dispatch
from optimum_agentos.nn.prepare import prepare_kernels

from ..conftest import needs_fbgemm, save_llama_with_short_groups

# bf16 activations (and int4 scales) against the fp32 reference: relative to the output's magnitude
TOLERANCE = 1e-2


def layer(bits, group_size, in_features=256, out_features=192, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=g) * 0.05
    b = torch.randn(out_features, generator=g) if bias else None
    return QuantLinear.from_float(weight, b, bits, group_size, sym=False)


def reference(module, x):
    return F.linear(x, module.dequantize(x.dtype), module.bias)


@pytest.mark.parametrize("bits, group_size, in_features, kernel", [
    (4, 128, 256, Int4PackKernel), (4, 32, 256, Int4PackKernel), (4, -1, 256, Int4PackKernel),
    (8, -1, 256, Int8PackKernel),
    # group size not dividing in_features (SmolLM2's 576 = 4 x 128 + 64): the short last group is served too
    (4, 128, 576, Int4PackKernel), (4, 256, 576, Int4PackKernel), (4, -1, 576, Int4PackKernel),
    (4, 128, 160, Int4PackKernel),
])
@pytest.mark.parametrize("tokens", [1, 5])
def test_kernel_matches_the_reference_within_tolerance(bits, group_size, in_features, kernel, tokens):
    module = layer(bits, group_size, in_features=in_features)
    assert kernel.unsupported(module) is None
    kernel.prepare(module)  # int8 layers prefer fbgemm (test_dynamic_int8.py); the bf16 kernel is its fallback
    module.kernel, module.routes = kernel, ((float("inf"), kernel.run),)  # the kernel for every call
    x = torch.randn(1, tokens, in_features)
    with torch.no_grad():
        fast, ref = module(x), reference(module, x)
    assert fast.shape == ref.shape == (1, tokens, 192)
    assert (fast - ref).abs().max() <= TOLERANCE * ref.abs().max()
    assert not torch.equal(fast, ref)  # it really took the packed path


def test_int4_kernel_group_covers_the_short_last_group():
    assert int4_kernel_group(576, 128) == 64 and int4_kernel_group(576, 256) == 64 and int4_kernel_group(576, -1) == 64
    assert int4_kernel_group(512, 128) == 128 and int4_kernel_group(160, 128) == 32
    assert int4_kernel_group(100, 128) is None and int4_kernel_group(256, 48) is None


@needs_fbgemm
def test_dispatch_int8_weight_only_by_default_w8a8_when_asked_and_the_int4_kernel_for_int4():
    kernel, _ = choose_kernel(layer(8, -1))
    assert kernel is Int8PackKernel  # weight-only checkpoints keep float activations
    assert choose_kernel(layer(8, -1), activations="int8-dynamic")[0] is Int8DynamicKernel
    assert choose_kernel(layer(4, 128, in_features=576))[0] is Int4PackKernel


def test_long_inputs_take_a_measured_path_within_tolerance_and_autograd_mode_the_exact_reference_path():
    module = layer(4, 128)
    prepare_kernels(module)
    assert {name for _, name in module.route_names} <= {"int4pack-bf16", *(p.name for p in dispatch.OTHER_PATHS)}
    assert module.route_names[-1][0] is None  # every token count has a path
    x = torch.randn(2, 64, 256)
    with torch.no_grad():
        fast, ref = module(x), reference(module, x)
    assert (fast - ref).abs().max() <= TOLERANCE * ref.abs().max()
    assert torch.equal(module(x), ref)  # autograd on, even for an input without grad: the exact reference
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


@pytest.mark.parametrize("bits, group_size, out_features, kernel, only_copy", [
    (4, 128, 192, Int4PackKernel, True), (8, -1, 192, Int8PackKernel, True),
    (4, 128, 208, Int4PackKernel, False),  # 16 | 208 but not 64: a layout we do not unpack, so both copies stay
])
def test_kernel_holds_the_only_copy_of_the_codes_when_it_can_give_them_back(bits, group_size, out_features, kernel,
                                                                             only_copy):
    module = layer(bits, group_size, out_features=out_features)
    codes, packed = module.codes(), module.weight.detach().clone()
    kernel.prepare(module)
    module.kernel = kernel
    assert module.weight_in_kernel is only_copy and (module.weight.numel() == 0) is only_copy
    assert torch.equal(module.codes(), codes)
    assert torch.equal(module.state_dict()["weight"], packed)  # saving writes the same bytes
    x = torch.randn(3, 300, 256)
    with torch.no_grad():  # the long-input path dequantizes from the kernel's copy
        assert torch.allclose(F.linear(x, module.dequantize(), module.bias), reference(module, x))
    module.restore_weight()
    assert torch.equal(module.weight, packed) and not module.weight_in_kernel


def test_layers_reading_one_input_share_its_bf16_copy_until_it_changes():
    first, second = layer(4, 128), layer(8, -1, seed=3)
    prepare_kernels(first), prepare_kernels(second)
    def close_to_reference(module, x):
        ref = reference(module, x)
        return (module(x) - ref).abs().max() <= TOLERANCE * ref.abs().max()

    x = torch.randn(1, 1, 256)
    with torch.no_grad():
        first(x)
        assert torch.equal(second(x), second(x.clone()))  # the cached conversion equals a fresh one
        x.mul_(2)  # in place: a new version, converted again
        assert close_to_reference(first, x) and close_to_reference(second, x)
    with torch.inference_mode():  # inference tensors have no version counter: converted on every call
        x = torch.randn(1, 1, 256)
        first(x)
        x.mul_(2)
        assert close_to_reference(first, x) and close_to_reference(second, x)


def test_symmetric_int8_skips_the_zero_point_share_and_stays_within_tolerance():
    g = torch.Generator().manual_seed(0)
    module = QuantLinear.from_float(torch.randn(192, 256, generator=g) * 0.05, None, 8, -1, sym=True)
    Int8PackKernel.prepare(module)
    module.kernel, module.routes = Int8PackKernel, ((float("inf"), Int8PackKernel.run),)
    assert module.kernel_zero_term is None
    x = torch.randn(1, 2, 256)
    with torch.no_grad():
        fast, ref = module(x), reference(module, x)
    assert (fast - ref).abs().max() <= TOLERANCE * ref.abs().max() and not torch.equal(fast, ref)


@pytest.mark.parametrize("settings", [dict(bits=4, group_size=128), dict(bits=8, group_size=-1),
                                      dict(bits=8, group_size=-1, sym=True, embedding_bits=8)])
def test_fast_paths_compile_without_graph_breaks(tmp_path, settings):
    save_llama_with_short_groups(tmp_path / "fp")
    transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "fp", quantization_config=AgentOSConfig(**settings)).save_pretrained(tmp_path / "q")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()
    ids = torch.tensor([[5, 9, 17, 33]])
    with torch.no_grad():
        for tokens in (1, 4):  # decode (packed kernels) and a longer call (dequantize + F.linear)
            torch._dynamo.reset()
            explained = torch._dynamo.explain(lambda i: model(i, use_cache=False).logits)(ids[:, :tokens])
            assert explained.graph_break_count == 0, explained.break_reasons
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        assert torch.allclose(compiled(ids[:, :1], use_cache=False).logits, model(ids[:, :1], use_cache=False).logits,
                              atol=1e-5)
    torch._dynamo.reset()


def test_loaded_checkpoint_keeps_no_view_of_its_file(tmp_path):
    from optimum_agentos.nn.memory import _safetensors_mappings

    save_llama_with_short_groups(tmp_path / "fp")
    for bits, group_size in ((4, 128), (8, -1)):
        folder = tmp_path / f"q{bits}"
        transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path / "fp", quantization_config=AgentOSConfig(bits=bits, group_size=group_size)).save_pretrained(folder)
        model = transformers.AutoModelForCausalLM.from_pretrained(folder)
        mapped = _safetensors_mappings()
        tensors = list(model.parameters()) + list(model.buffers())
        assert not any(start <= t.data_ptr() < end for t in tensors for start, end in mapped)
        layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
        if bits == 8:
            assert all(m.weight_in_kernel for m in layers)
        else:  # the int4 layout is unpacked for 64 | out_features (k/v_proj have 96 rows)
            assert all(m.weight_in_kernel == (m.out_features % 64 == 0) for m in layers)
            assert any(m.out_features % 64 for m in layers) and any(m.weight_in_kernel for m in layers)


@pytest.mark.parametrize("bits, group_size, in_features, out_features, reason", [
    (3, 128, 256, 192, "3-bit"), (4, 128, 100, 192, "32/64/128/256 dividing both"),
    (4, 48, 96, 192, "32/64/128/256 dividing both"), (4, 128, 256, 100, "multiple of 16"),
    (8, 128, 256, 192, "one scale per output row"), (2, -1, 256, 192, "2-bit"),
])
def test_layers_without_a_kernel_say_why_and_stay_correct(bits, group_size, in_features, out_features, reason):
    module = layer(bits, group_size, in_features=in_features, out_features=out_features)
    kernel, why = choose_kernel(module)
    assert kernel is None and reason in why
    assert prepare_kernels(module) == {"": "reference"}
    x = torch.randn(1, 1, in_features)
    with torch.no_grad():
        fast, ref = module(x), reference(module, x)
    assert (fast - ref).abs().max() <= TOLERANCE * ref.abs().max()  # a dequant path (bf16 or exact)
    assert torch.equal(module(x), ref)  # autograd on: the exact reference


def test_reference_policy_and_unknown_policy():
    module = layer(4, 128)
    assert prepare_kernels(module, policy="reference") == {"": "reference"} and module.kernel is None
    x = torch.randn(2, 64, 256)
    with torch.no_grad():
        assert torch.equal(module(x), reference(module, x))
    with pytest.raises(ValueError, match="Unknown kernel policy"):
        prepare_kernels(module, policy="fast")


def test_loaded_checkpoint_uses_the_kernels_and_generates_like_the_reference(tmp_path, monkeypatch):
    save_llama_with_short_groups(tmp_path / "fp")  # every layer has a short last group, like SmolLM2's 576
    model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "fp", quantization_config=AgentOSConfig(bits=4, group_size=128))
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
