"""`compile_for_generation`: the compiled model decodes what the eager one does, and refuses what it cannot compile."""

import shutil

import pytest
import torch
import transformers

import optimum_agentos  # noqa: F401
from optimum_agentos import AgentOSConfig
from optimum_agentos.generation import compile_for_generation

from .conftest import save_llama_with_short_groups

needs_cxx = pytest.mark.skipif(shutil.which("g++") is None, reason="inductor needs a C++ compiler")


@pytest.fixture
def folders(tmp_path):
    save_llama_with_short_groups(tmp_path / "fp")
    transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "fp", quantization_config=AgentOSConfig(bits=4, group_size=128)).save_pretrained(tmp_path / "q")
    return tmp_path / "fp", tmp_path / "q"


@pytest.fixture
def int4_model(folders):
    return lambda: transformers.AutoModelForCausalLM.from_pretrained(folders[1]).eval()


def assert_close_logits(logits, want):
    # inductor fuses the float ops (norms, rotary, softmax) in another order: float32 rounding, not a different model
    assert (logits - want).abs().max() <= 1e-3 * want.abs().max()


def greedy(model, ids, **kwargs):
    out = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, **kwargs)
    return out.sequences, torch.stack(out.logits)


@needs_cxx
def test_compiled_model_decodes_the_eager_models_tokens_and_reads_weight_updates(folders, int4_model):
    torch._dynamo.reset()
    eager, compiled = int4_model(), compile_for_generation(int4_model())
    assert compiled.generation_config.cache_implementation == "static"
    # a float model of the same class generates first in this process: without module guards, only its own code
    # object keeps the quantized model from running the float model's graph
    float_eager = transformers.AutoModelForCausalLM.from_pretrained(folders[0]).eval()
    float_compiled = compile_for_generation(transformers.AutoModelForCausalLM.from_pretrained(folders[0]).eval())
    ids = torch.tensor([[5, 9, 17, 33]])
    tokens, logits = greedy(float_compiled, ids)
    want_tokens, want_logits = greedy(float_eager, ids, cache_implementation="static")
    assert torch.equal(tokens, want_tokens)
    assert_close_logits(logits, want_logits)
    try:
        for ids in (torch.tensor([[5, 9, 17, 33]]), torch.tensor([[7, 3, 90, 41, 12, 8, 60]])):  # a new prompt length
            tokens, logits = greedy(compiled, ids)
            want_tokens, want_logits = greedy(eager, ids, cache_implementation="static")
            assert torch.equal(tokens, want_tokens)
            assert_close_logits(logits, want_logits)
        # weight values are graph inputs, read at every call: an in-place update shows without recompiling
        for model in (eager, compiled):
            with torch.no_grad():
                model.model.norm.weight.mul_(-1.5)
        tokens, logits = greedy(compiled, ids)
        want_tokens, want_logits = greedy(eager, ids, cache_implementation="static")
        assert torch.equal(tokens, want_tokens)
        assert_close_logits(logits, want_logits)
    finally:
        torch._dynamo.reset()


def test_refuses_an_encoder_a_compiled_model_and_a_missing_compiler(int4_model, monkeypatch):
    encoder = transformers.BertModel(transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                                             num_attention_heads=2, intermediate_size=64))
    with pytest.raises(ValueError, match="BertModel has no `generate`"):
        compile_for_generation(encoder)
    model = int4_model()
    model.forward = torch.compile(model.forward)
    with pytest.raises(ValueError, match="already compiled"):
        compile_for_generation(model)
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    with pytest.raises(RuntimeError, match="no-such-compiler-here"):
        compile_for_generation(int4_model())
