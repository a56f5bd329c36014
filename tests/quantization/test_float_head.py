"""The float32 output head of a compressed model (nn/float_head.py): same parameters and checkpoint, the bf16 copy
within its bound, exact with autograd or the reference policy, the copy following the weight, a fresh-process reload."""

import json

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors import safe_open

import optimum_agentos  # noqa: F401
from optimum_agentos import AgentOSConfig, Quantizer
from optimum_agentos.formats.replace import dequantize_model
from optimum_agentos.nn import dispatch, native
from optimum_agentos.nn.float_head import FloatHead
from optimum_agentos.nn.prepare import prepare_kernels

from ..conftest import build_tiny, model_output, run_python, sample_ids

TOLERANCE = 1e-2  # bf16 activations and weights, of the logits' magnitude


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(dispatch.CACHE_ENV, str(tmp_path / "kernels"))
    monkeypatch.delenv("OPTIMUM_AGENTOS_KERNELS", raising=False)


def quantized(tmp_path, kind="qwen2"):
    build_tiny(kind).save_pretrained(tmp_path / "fp")
    return Quantizer.from_pretrained(str(tmp_path / "fp")).quantize_in_place(AgentOSConfig(bits=4, group_size=64))


@pytest.mark.parametrize("kind, tied", [("qwen2", True), ("llama", False)])
def test_the_head_keeps_its_parameters_and_the_copy_stays_within_its_bound(tmp_path, kind, tied):
    model = quantized(tmp_path, kind)
    head = model.get_output_embeddings()
    assert type(head) is FloatHead and (head.weight is model.get_input_embeddings().weight) is tied
    assert set(head.state_dict()) == {"weight"}  # the copy is not saved
    ids = sample_ids()
    prepare_kernels(model, policy="reference")  # every layer and the head exact
    assert head.routes is None and head.kernel_bf16_weight is None
    exact = model_output(model, ids)
    prepare_kernels(model, policy="bf16-copy")  # the head's copy at every length; the layers exact
    assert head.route_names == ((None, "bf16-copy"),) and head.kernel_bf16_weight.dtype == torch.bfloat16
    fast = model_output(model, ids)
    assert (fast - exact).abs().max() <= TOLERANCE * exact.abs().max() and not torch.equal(fast, exact)
    x = torch.randn(2, 3, head.in_features, requires_grad=True)
    out = head(x)  # autograd on: the float matmul, exactly
    assert torch.equal(out, torch.nn.functional.linear(x, head.weight))
    out.sum().backward()
    assert x.grad is not None


@pytest.mark.skipif(native.unavailable() is not None, reason=f"{native.unavailable()}")
def test_the_native_copy_path_is_the_bf16_copy_times_float32_inputs(tmp_path):
    model = quantized(tmp_path, "llama")
    prepare_kernels(model, policy="native-bf16-copy")
    head = model.get_output_embeddings()
    assert head.route_names == ((None, "native-bf16-copy"),) and head.kernel_bf16_weight.dtype == torch.bfloat16
    for tokens in (1, 2, 3, 9):  # the row-at-a-time loop (up to 2 tokens per pass) and passes of 4
        x = torch.randn(2, tokens, head.in_features)
        with torch.no_grad():
            out, out16 = head(x), head(x.bfloat16())
        copy = F.linear(x, head.kernel_bf16_weight.float())  # float32 inputs: only the order of the sums differs
        assert out.dtype == torch.float32 and (out - copy).abs().max() <= 1e-5 * copy.abs().max()
        exact = F.linear(x, head.weight)
        assert (out - exact).abs().max() <= TOLERANCE * exact.abs().max()
        assert out16.dtype == torch.bfloat16 and (out16.float() - exact).abs().max() <= TOLERANCE * exact.abs().max()


@pytest.mark.skipif(native.unavailable() is not None, reason=f"{native.unavailable()}")
def test_a_cached_native_head_choice_falls_back_without_the_library(tmp_path, monkeypatch):
    model = quantized(tmp_path, "llama")
    prepare_kernels(model)
    (path,) = (tmp_path / "kernels").glob("choices-*.json")
    data = json.loads(path.read_text())
    (key,) = [k for k in data["choices"] if k.startswith("FloatHead")]
    entry = data["choices"][key]
    entry["routes"] = [[None, "native-bf16-copy"]]  # as if measured fastest at every length
    entry["us"] = {tokens: {**row, "native-bf16-copy": 0.1} for tokens, row in entry["us"].items()}
    path.write_text(json.dumps(data))
    monkeypatch.setattr(native, "unavailable", lambda: "turned off for this test")
    prepare_kernels(model)
    head = model.get_output_embeddings()
    expected = dispatch.routes_without(entry, {"native-bf16-copy"})
    assert [list(r) for r in head.route_names] == expected
    x = torch.randn(1, 1, head.in_features)
    with torch.no_grad():
        exact = F.linear(x, head.weight)
        assert (head(x) - exact).abs().max() <= TOLERANCE * exact.abs().max()


def test_the_copy_follows_a_changed_weight(tmp_path):
    model = quantized(tmp_path)
    prepare_kernels(model, policy="bf16-copy")
    head = model.get_output_embeddings()
    x = torch.randn(1, 1, head.in_features)
    with torch.no_grad():
        head.weight.mul_(-2)  # in place (a fine-tune step)
        exact = torch.nn.functional.linear(x, head.weight)
        assert (head(x) - exact).abs().max() <= TOLERANCE * exact.abs().max()
        head.weight = torch.nn.Parameter(torch.randn_like(head.weight))  # replaced (a re-tie)
        exact = torch.nn.functional.linear(x, head.weight)
        assert (head(x) - exact).abs().max() <= TOLERANCE * exact.abs().max()


def test_a_forced_float_path_drops_the_copy_and_the_checkpoint_is_unchanged(tmp_path):
    model = quantized(tmp_path)
    prepare_kernels(model, policy="float")
    assert model.lm_head.route_names == ((None, "float"),) and model.lm_head.kernel_bf16_weight is None
    model.save_pretrained(tmp_path / "q")
    plain = build_tiny("qwen2")
    plain.save_pretrained(tmp_path / "plain")
    with safe_open(tmp_path / "q" / "model.safetensors", "pt") as f, \
            safe_open(tmp_path / "plain" / "model.safetensors", "pt") as g:
        assert not any(k.startswith("lm_head") for k in f.keys()) and not any(k.startswith("lm_head") for k in g.keys())
        saved, original = f.get_tensor("model.embed_tokens.weight"), g.get_tensor("model.embed_tokens.weight")
        assert torch.equal(saved, original.to(saved.dtype))  # the checkpoint's float dtype


def test_reload_in_a_fresh_process_takes_the_same_paths(tmp_path):
    model = quantized(tmp_path)
    model.save_pretrained(tmp_path / "q")
    ids = sample_ids()
    torch.save(model_output(model, ids), tmp_path / "logits.pt")
    run_python(f"""
        import torch, transformers, optimum_agentos
        model = transformers.AutoModelForCausalLM.from_pretrained({str(tmp_path / "q")!r})
        head = model.get_output_embeddings()
        assert type(head).__name__ == "FloatHead" and head.weight is model.get_input_embeddings().weight
        assert head.route_names == {model.lm_head.route_names!r}
        with torch.no_grad():
            logits = model(input_ids=torch.tensor({ids.tolist()})).logits
        assert torch.equal(logits, torch.load({str(tmp_path / "logits.pt")!r}, weights_only=True))
    """, env={dispatch.CACHE_ENV: str(tmp_path / "kernels")})


def test_float_models_and_bf16_heads_are_left_alone(tmp_path):
    model = build_tiny("qwen2")
    assert prepare_kernels(model) == {} and type(model.lm_head) is torch.nn.Linear
    from optimum_agentos.pruning import Pruner, PruningConfig

    Pruner(build_tiny("qwen2")).prune(tmp_path / "sparse", PruningConfig(method="magnitude"), float_dtype=None)
    sparse = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "sparse")  # float layers: exact head too
    assert type(sparse.lm_head) is torch.nn.Linear
    build_tiny("qwen2").to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "bf16", quantization_config=AgentOSConfig(bits=4, group_size=64))
    assert type(loaded.lm_head) is torch.nn.Linear


def test_dequantize_model_puts_a_plain_head_back(tmp_path):
    model = quantized(tmp_path)
    weight = model.lm_head.weight
    dequantize_model(model)
    assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight is weight
