"""GGUF export: blocks hold our codes exactly, and llama.cpp (xllamacpp) and transformers' GGUF loader, in fresh
processes that never import optimum_agentos, tokenize like the Hugging Face tokenizer and compute our next-token
log-probabilities."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from optimum_agentos import AgentOSConfig
from optimum_agentos.export import Weight, export
from optimum_agentos.export import gguf_tensors as gt
from optimum_agentos.quantization.quantizer import Quantizer

from ..conftest import build_tiny, run_python
from .tiny import (
    LLAMA_CPP,
    TEXT,
    TRANSFORMERS_GGUF,
    VOCAB,
    compare_llama_cpp,
    result_of,
    tiny_checkpoint,
    tiny_tokenizer,
)

QT = gguf.GGMLQuantizationType
# llama.cpp quantizes activations to 8 bits inside its Q4/Q8 dot products: its log-probabilities differ from the
# float computation by about 1e-3 on these tiny models; transformers dequantizes the same blocks to float32.
LLAMA_CPP_ATOL, TRANSFORMERS_ATOL = 2e-2, 5e-3


def _weight(bits, sym, group_size, rows=8, cols=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    groups = -(-cols // group_size) if group_size != -1 else 1
    codes = torch.randint(0, 1 << bits, (rows, cols), generator=g).to(torch.uint8)
    scales = (torch.rand(rows, groups, generator=g) * 0.05 + 1e-3).to(torch.float16)
    zeros = (torch.full((rows, groups), 1 << (bits - 1)) if sym
             else torch.randint(0, 1 << bits, (rows, groups), generator=g)).to(torch.uint8)
    return Weight((rows, cols), codes=codes, scales=scales, zeros=zeros, bits=bits, group_size=group_size, sym=sym)


@pytest.mark.parametrize("bits, sym, group_size, qtype", [
    (4, False, 32, QT.Q4_1), (4, False, 64, QT.Q4_1), (4, True, 64, QT.Q4_0), (8, True, -1, QT.Q8_0),
    (8, True, 32, QT.Q8_0), (3, False, 32, QT.Q4_1), (3, True, 64, QT.Q4_0), (2, True, 32, QT.Q4_0),
    (2, False, -1, QT.Q4_1),
])
def test_blocks_hold_our_codes(bits, sym, group_size, qtype):
    weight = _weight(bits, sym, group_size)  # 96 columns: group 64 leaves a short last group of 32
    assert gt.exact_type(weight) == qtype
    enc = gt.encode_codes(weight, qtype)
    theirs = torch.from_numpy(gguf.quants.dequantize(enc.data, qtype).astype(np.float32))
    error = (theirs - weight.dequantize()).abs()
    if qtype == QT.Q4_1:  # m = -s z rounded to fp16: at most half an fp16 step of s z
        bound = (weight.scales.float() * weight.zeros.float()).max() * 2.0 ** -11
        assert 0 < error.max() <= bound
    else:  # symmetric codes: bit-exact
        assert error.max() == 0
    assert enc.max_abs_error == pytest.approx(float(error.max()))


def test_types_without_an_exact_block_are_named():
    assert "sym=True" in gt.exact_type(_weight(8, False, 32))
    assert "multiple of 32" in gt.exact_type(_weight(4, False, 16))
    bf16 = _weight(4, False, 32)
    bf16.scales = bf16.scales.float() * (1 + 1e-6)
    assert "scale_dtype='float16'" in gt.exact_type(bf16)


def test_permutation_only_reorders_rows():
    w = torch.arange(8 * 3).view(8, 3)
    p = gt.permute_rows(w, n_head=2)  # rows [h, 2, half] -> [h, half, 2]
    assert p[:, 0].tolist() == [0, 6, 3, 9, 12, 18, 15, 21]
    assert sorted(p.flatten().tolist()) == w.flatten().tolist()


def _sparse_int4(folder):
    from optimum_agentos import Pruner, PruningConfig

    model = build_tiny("llama", vocab_size=VOCAB)
    Pruner(model, tiny_tokenizer()).prune(folder, PruningConfig(method="magnitude", pattern="2:4"),
                                          quantization=AgentOSConfig(bits=4, group_size=32))
    return folder


def _bf16_float(folder):
    model = build_tiny("llama", vocab_size=VOCAB).to(torch.bfloat16)
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def _mistral_int4(folder):
    config = transformers.MistralConfig(vocab_size=VOCAB, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, sliding_window=None)
    torch.manual_seed(0)
    Quantizer(transformers.MistralForCausalLM(config).eval(), tiny_tokenizer()).quantize(
        folder, AgentOSConfig(bits=4, group_size=32))
    return folder


def _structured(folder):
    from optimum_agentos import Pruner, PruningConfig

    tokenizer = tiny_tokenizer()  # a third of the MLP neurons and one of the two KV head groups removed
    Pruner(build_tiny("llama", vocab_size=VOCAB), tokenizer).prune(
        folder, PruningConfig(method=None, mlp_neurons=0.3, attention_groups=1),
        calibration_dataset=tokenizer(TEXT, return_tensors="pt").input_ids[:, :48].repeat(2, 1), num_samples=2,
        seq_len=48, float_dtype="float32")
    return folder


# name -> (build the source checkpoint in a folder, GGUF types expected besides F32)
CASES = {
    "int4-asym-g32": (lambda f: tiny_checkpoint(f, config=AgentOSConfig(bits=4, group_size=32)), {"Q4_1": 14}),
    "int4-sym-g64": (lambda f: tiny_checkpoint(f, config=AgentOSConfig(bits=4, group_size=64, sym=True)),
                     {"Q4_0": 14}),
    "int8-sym-row": (lambda f: tiny_checkpoint(f, config=AgentOSConfig(bits=8, group_size=-1, sym=True)),
                     {"Q8_0": 14}),
    "int3-asym-g32": (lambda f: tiny_checkpoint(f, config=AgentOSConfig(bits=3, group_size=32)), {"Q4_1": 14}),
    "qwen2-int4-int8-embedding-tied": (
        lambda f: tiny_checkpoint(f, "qwen2", AgentOSConfig(bits=4, group_size=32, embedding_bits=8)),
        {"Q4_1": 14, "Q8_0": 1}),
    "sparse-2:4-int4": (_sparse_int4, {"Q4_1": 14}),
    "float-bf16": (_bf16_float, {"BF16": 16}),
    "mistral-int4": (_mistral_int4, {"Q4_1": 14}),
    "structured-float": (_structured, {}),
}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    built = {}
    for name, (build, _) in CASES.items():
        src = build(root / name / "src")
        built[name] = (src, root / name / "out", export(src, "gguf", root / name / "out"))
    return built


@pytest.mark.parametrize("name", CASES)
def test_exported_types(exports, name):
    _, out, summary = exports[name]
    assert {k: v for k, v in summary["tensor_types"].items() if k != "F32"} == CASES[name][1]
    # transformers 5 loads a Qwen2 tokenizer with Qwen2's own split pattern, whatever the file says
    assert summary["requantized_tensors"] == []
    assert summary["pre_tokenizer"] == ("qwen2" if "qwen2" in name else "gpt-2")
    assert (out / summary["gguf_file"]).is_file() and (out / "README.md").is_file()


def _references(exports):
    """Per case: our tokenizer's ids of TEXT, and our model's log-probabilities after two prompts (shared by all)."""
    ids, ours = {}, {}
    for name, (src, _, _) in exports.items():
        ids[name] = AutoTokenizer.from_pretrained(src)(TEXT).input_ids
    prompts = [ids["int4-asym-g32"][:12], ids["int4-asym-g32"][:40]]
    for name, (src, _, _) in exports.items():
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
        with torch.no_grad():
            ours[name] = [torch.log_softmax(model(torch.tensor([p])).logits[0, -1].float(), -1) for p in prompts]
    return ids, prompts, ours


def test_llama_cpp_tokenizes_and_predicts_like_us(exports):
    ids, prompts, ours = _references(exports)
    paths = {name: str(out / summary["gguf_file"]) for name, (_, out, summary) in exports.items()}
    got = result_of(run_python(LLAMA_CPP.format(paths=paths, text=TEXT, prompts=prompts)))
    for name, result in got.items():
        assert result["tokens"] == ids[name], name  # llama.cpp tokenizes exactly like the Hugging Face tokenizer
        assert compare_llama_cpp(result, ours[name], LLAMA_CPP_ATOL, name) >= 2, name


def test_transformers_gguf_loader_reads_the_exports(exports):
    ids, prompts, ours = _references(exports)
    files = {name: (str(out), summary["gguf_file"]) for name, (_, out, summary) in exports.items()}
    got = result_of(run_python(TRANSFORMERS_GGUF.format(files=files, text=TEXT, prompts=prompts)))
    for name, result in got.items():
        assert result["tokens"] == ids[name], name
        for theirs, mine in zip(result["logprobs"], ours[name]):
            assert (torch.tensor(theirs) - mine).abs().max() < TRANSFORMERS_ATOL, name
