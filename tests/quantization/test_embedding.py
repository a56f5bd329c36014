"""int8 token embeddings and output head (`embedding_bits=8`): tied storage, reload, kernel tolerance, errors."""

import json

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors import safe_open

import optimum_agentos  # noqa: F401
from optimum_agentos import AgentOSConfig, Quantizer
from optimum_agentos.formats.replace import dequantize_model
from optimum_agentos.nn.embedding import QuantEmbedding, QuantHead, quantize_rows_int8
from optimum_agentos.nn.prepare import prepare_kernels

from ..conftest import build_tiny, model_output, run_python, sample_ids

# bf16 activations and outputs of the int8 head kernel against the float32 path, relative to the logits' magnitude
TOLERANCE = 1e-2


def test_rows_are_rounded_to_within_half_a_step():
    weight = torch.randn(64, 96) * torch.logspace(-3, 1, 64)[:, None]  # rows of very different magnitudes
    codes, scale = quantize_rows_int8(weight)
    assert codes.dtype == torch.int8 and scale.shape == (64, 1) and codes.abs().max() == 127
    assert ((codes.float() * scale - weight).abs() <= scale / 2 * (1 + 1e-6)).all()


@pytest.mark.parametrize("kind, tied", [("qwen2", True), ("gpt2", True), ("llama", False)])
def test_quantize_save_and_reload_in_a_fresh_process(tmp_path, kind, tied):
    model = build_tiny(kind)
    model.save_pretrained(tmp_path / "fp")
    quantized = Quantizer.from_pretrained(str(tmp_path / "fp")).quantize_in_place(
        AgentOSConfig(bits=8, group_size=-1, embedding_bits=8))
    embedding, head = quantized.get_input_embeddings(), quantized.get_output_embeddings()
    assert isinstance(embedding, QuantEmbedding) and isinstance(head, QuantHead)
    assert (head.weight is embedding.weight and head.weight_scale is embedding.weight_scale) is tied
    ids = sample_ids()
    logits = model_output(quantized, ids)
    reference = model_output(model, ids)
    assert (logits - reference).abs().max() <= 0.05 * reference.abs().max()  # int8 everywhere, bf16 on AMX
    quantized.save_pretrained(tmp_path / "q")
    torch.save(logits, tmp_path / "logits.pt")
    config = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert config["embedding_bits"] == 8 and config["format_version"] == 3
    with safe_open(tmp_path / "q" / "model.safetensors", "pt") as f:
        names = {k for k in f.keys() if k.endswith(("weight", "weight_scale")) and f.get_tensor(k).dtype == torch.int8}
    assert len(names) == (1 if tied else 2)  # tied: one int8 matrix in the file
    run_python(f"""
        import torch, transformers, optimum_agentos
        model = transformers.AutoModelForCausalLM.from_pretrained({str(tmp_path / "q")!r})
        embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
        assert type(embedding).__name__ == "QuantEmbedding" and type(head).__name__ == "QuantHead"
        assert (head.weight is embedding.weight and head.weight_scale is embedding.weight_scale) is {tied}
        with torch.no_grad():
            logits = model(input_ids=torch.tensor({ids.tolist()})).logits
        assert torch.equal(logits, torch.load({str(tmp_path / "logits.pt")!r}, weights_only=True))
        model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False)
    """)


def test_quantize_on_load_ties_the_head_and_matches_the_quantizer(tmp_path):
    build_tiny("qwen2").save_pretrained(tmp_path / "fp")
    config = AgentOSConfig(bits=4, group_size=64, embedding_bits=8)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=config)
    quantized = Quantizer.from_pretrained(str(tmp_path / "fp")).quantize_in_place(config)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert loaded.lm_head.weight_scale is loaded.model.embed_tokens.weight_scale
    assert torch.equal(loaded.model.embed_tokens.weight, quantized.model.embed_tokens.weight)
    ids = sample_ids()
    assert torch.equal(model_output(loaded, ids), model_output(quantized, ids))
    loaded.save_pretrained(tmp_path / "q")
    without = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "fp", quantization_config=AgentOSConfig(bits=4, group_size=64))
    without.save_pretrained(tmp_path / "q-float-embeddings")
    size = lambda name: (tmp_path / name / "model.safetensors").stat().st_size  # noqa: E731
    # 128 x 96 float16 embedding (24.6 kB) -> int8 (12.3 kB) + 128 float32 scales
    assert size("q-float-embeddings") - size("q") > 11_000


def test_head_kernel_within_tolerance_reference_policy_and_autograd_exact():
    torch.manual_seed(0)
    linear = torch.nn.Linear(192, 320, bias=False)
    head = QuantHead.from_float(linear)
    x = torch.randn(1, 1, 192)
    with torch.no_grad():
        exact = F.linear(x, head.dequantize())
        assert torch.equal(head(x), exact)  # before prepare_kernels: the float path
        assert prepare_kernels(head, policy="int8rows-bf16") == {"": "int8rows-bf16"}  # forced: not timed
        fast = head(x)
        assert (fast - exact).abs().max() <= TOLERANCE * exact.abs().max() and not torch.equal(fast, exact)
        prepare_kernels(head, policy="reference")
        assert torch.equal(head(x), exact)
    prepare_kernels(head)
    x.requires_grad_(True)
    out = head(x)
    assert torch.equal(out.detach(), exact)
    out.sum().backward()
    assert x.grad is not None


def test_dequantize_model_gives_tied_float_modules_computing_the_same(tmp_path):
    build_tiny("qwen2").save_pretrained(tmp_path / "fp")
    model = Quantizer.from_pretrained(str(tmp_path / "fp")).quantize_in_place(
        AgentOSConfig(bits=8, group_size=-1, embedding_bits=8))
    prepare_kernels(model, policy="reference")
    ids = sample_ids()
    before = model_output(model, ids)
    dequantize_model(model)
    assert type(model.model.embed_tokens) is torch.nn.Embedding and type(model.lm_head) is torch.nn.Linear
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.allclose(model_output(model, ids), before, atol=1e-5)


def test_bad_embedding_settings_are_refused_early(tmp_path):
    with pytest.raises(ValueError, match="embedding_bits=4 is not supported"):
        AgentOSConfig(embedding_bits=4)
    with pytest.raises(ValueError, match="bias-free output heads only"):
        QuantHead.from_float(torch.nn.Linear(8, 16, bias=True))
    assert "embedding_bits" not in AgentOSConfig().to_dict()  # older checkpoints keep their key set
    assert AgentOSConfig().stamped().format_version == 1
