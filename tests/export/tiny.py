"""Tiny checkpoints with a real (trained, byte-level BPE) tokenizer for the export tests, and the fresh-process
runtime scripts that read the exports without importing optimum_agentos."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from optimum_agentos import AgentOSConfig
from optimum_agentos.quantization.quantizer import Quantizer

from ..conftest import build_tiny

TEXT = ("The quick brown fox jumps over the lazy dog. Compressed models run where agents live: laptops, CPUs and "
        "edge boxes. In 2024, 135 million weights fit in 98 megabytes; numbers like 3.14159 and 1,000,000 appear "
        "too. Café déjà vu!  Multiple   spaces, tabs\tand new\nlines.")
VOCAB = 320


def tiny_tokenizer(pre_tokenizer=None) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer of `VOCAB` ids trained on `TEXT` (GPT-2 style unless `pre_tokenizer` is given)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer or pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>", "<|im_start|>"], show_progress=False)
    tok.train_from_iterator([TEXT] * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|im_start|>")


def tiny_checkpoint(folder: Path, kind: str = "llama", config: AgentOSConfig | None = None, seed: int = 0,
                    **overrides) -> Path:
    """A tiny model with `tiny_tokenizer`, quantized with `config` (saved float when None) into `folder`."""
    model = build_tiny(kind, seed, vocab_size=VOCAB, **overrides)
    tokenizer = tiny_tokenizer()
    if config is None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    else:
        Quantizer(model, tokenizer).quantize(folder, config)
    return folder


# Runs in a fresh interpreter: llama.cpp (xllamacpp) loads each GGUF, tokenizes TEXT and gives the top next-token
# logprobs after each prompt (None where llama.cpp withholds them: its greedy token is part of a UTF-8 character);
# the module under test must not be imported there.
LLAMA_CPP = """
import json, sys, urllib.request
import xllamacpp as xlc
assert "optimum_agentos" not in sys.modules
results = {{}}
for name, path in {paths!r}.items():
    params = xlc.CommonParams()
    params.model.path = path
    params.n_ctx = 512
    params.cpuparams.n_threads = params.cpuparams_batch.n_threads = 1
    params.warmup = False
    server = xlc.Server(params)
    request = urllib.request.Request(server.listening_address + "/tokenize", data=json.dumps({{"content": {text!r}}})
                                     .encode(), headers={{"Content-Type": "application/json"}})
    out = results[name] = {{"tokens": json.loads(urllib.request.urlopen(request).read())["tokens"], "top": []}}
    for ids in {prompts!r}:
        result = server.handle_completions({{"prompt": ids, "max_tokens": 1, "logprobs": 10, "temperature": 0}})
        logprobs = result["choices"][0]["logprobs"]  # None when the greedy token is part of a UTF-8 character
        out["top"].append(logprobs and {{str(t["id"]): t["logprob"] for t in logprobs["content"][0]["top_logprobs"]}})
    del server
assert "optimum_agentos" not in sys.modules
print("RESULT" + json.dumps(results))
"""

# transformers' own GGUF loader, fresh interpreter: tokenizer ids of TEXT and last-position log-probabilities.
TRANSFORMERS_GGUF = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
results = {{}}
for name, (folder, file) in {files!r}.items():
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    with torch.no_grad():
        logprobs = [torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), -1).tolist()
                    for ids in {prompts!r}]
    results[name] = {{"tokens": tokenizer({text!r}).input_ids, "logprobs": logprobs}}
assert "optimum_agentos" not in sys.modules
print("RESULT" + json.dumps(results))
"""


def result_of(stdout: str) -> dict:
    return json.loads(stdout.split("RESULT", 1)[1])


def compare_llama_cpp(result: dict, ours: list, atol: float, name: str = "") -> int:
    """Check llama.cpp's top next-token log-probabilities against ours (same top-1, each within `atol`); returns
    how many prompts were compared (llama.cpp withholds some, see LLAMA_CPP)."""
    compared = 0
    for top, mine in zip(result["top"], ours):
        if top is None:
            continue
        theirs = {int(k): v for k, v in top.items()}
        assert max(theirs, key=theirs.get) == int(mine.argmax()), name
        gap = max(abs(v - float(mine[k])) for k, v in theirs.items())
        assert gap < atol, f"{name}: llama.cpp's top-10 log-probs differ from ours by up to {gap:.4f} (bound {atol})"
        compared += 1
    return compared

