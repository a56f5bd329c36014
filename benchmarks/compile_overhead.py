"""What a compiled decode step of SmolLM2-135M-Instruct (int4 g128, int8 embeddings) pays besides its kernels, with
plain `torch.compile` and with `optimum_agentos.compile_for_generation` (with its graphs computing the fused sibling
groups in one call, and without: `groups apart`), beside llama.cpp's `Q4_1` decode.

Each row is a fresh process (plain `torch.compile` shares one code object's graphs between two models): load
the RTN checkpoint quantized on load, compile, one warm-up `generate`, then cProfile over `--profiled` generates (the
self time per decode step of dynamo's wrapper, which evaluates the guards, of inductor's size asserts, and of the
generated Python wrapper), then `--repeats` generates timed round-robin with llama.cpp (`xllamacpp`, a child process,
the shipped GGUF, same threads, `poll=0`, `ignore_eos`) and with the same `generate` forced to its length by
`min_new_tokens` instead of `eos_token_id=None` (what that costs). The rows alternate for `--rounds` rounds.

    python benchmarks/compile_overhead.py
    python benchmarks/compile_overhead.py --render-only
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import pstats
import statistics
import time

from common import add_row_runner_arguments, cpu_description, load_for_render, markers, publish, run_meta, run_rows, \
    run_worker

NAME = "compile_overhead"
ROWS = ("torch.compile", "compile_for_generation, groups apart", "compile_for_generation")


def worker(row: str, args) -> dict:
    import torch
    from runtime_rows import llamacpp_row, shipped_gguf
    from speed import generate_kwargs
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimum_agentos import AgentOSConfig, compile_for_generation
    from optimum_agentos.models import resolve_model

    torch.set_num_threads(args.threads)
    source = resolve_model("smollm2-135m")
    ids = AutoTokenizer.from_pretrained(source)(
        "The history of the city begins in the early years of the nineteenth century when settlers",
        return_tensors="pt").input_ids[:, :16]
    model = AutoModelForCausalLM.from_pretrained(
        source, quantization_config=AgentOSConfig(bits=4, group_size=128, embedding_bits=8)).eval()
    if row == "torch.compile":
        model.forward = torch.compile(model.forward, dynamic=False)
    else:
        compile_for_generation(model)
        if row.endswith("groups apart"):  # each sibling layer calls its own kernel in the graphs, as before
            for module in model.modules():
                if getattr(module, "fused", None) is not None:
                    module.fused.in_graphs = False
    kwargs = generate_kwargs("+compile", args.new_tokens)  # as speed.py's compiled rows: static KV cache
    start = time.perf_counter()
    tokens = model.generate(ids, **kwargs)
    warm_up = time.perf_counter() - start

    profile = cProfile.Profile()
    profile.enable()
    for _ in range(args.profiled):
        model.generate(ids, **kwargs)
    profile.disable()
    stats = pstats.Stats(profile).stats  # (file, line, function) -> (calls, primitive, self time, cumulative, ...)
    steps = args.profiled * args.new_tokens

    def self_ms(match) -> float:
        return sum(v[2] for k, v in stats.items() if match(k)) / steps * 1e3

    llamacpp = llamacpp_row(shipped_gguf(), args.threads, separate_process=True)
    llamacpp.decode(ids, args.new_tokens)
    forced = dict(kwargs, min_new_tokens=args.new_tokens)
    del forced["eos_token_id"]
    model.generate(ids, **forced)
    ours, theirs, masked = [], [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        new = model.generate(ids, **kwargs).shape[1] - ids.shape[1]
        ours.append((time.perf_counter() - start) / args.new_tokens * 1e3)
        assert new == args.new_tokens, new
        start = time.perf_counter()
        model.generate(ids, **forced)
        masked.append((time.perf_counter() - start) / args.new_tokens * 1e3)
        start = time.perf_counter()
        llamacpp.decode(ids, args.new_tokens)
        theirs.append((time.perf_counter() - start) / args.new_tokens * 1e3)
    return {"row": row, "cpu": cpu_description(), "warm_up_s": warm_up,
            "guards_ms": self_ms(lambda k: k[2] == "compile_wrapper" and "eval_frame" in k[0]),
            "size_asserts_ms": self_ms(lambda k: "assert_size_stride" in k[2]),
            "wrapper_ms": self_ms(lambda k: k[2] == "call" and "torchinductor" in k[0]),
            "ms_per_token": statistics.median(ours), "llamacpp_ms_per_token": statistics.median(theirs),
            "min_new_tokens_ms_per_token": statistics.median(masked), "ms_all": ours, "llamacpp_ms_all": theirs,
            "min_new_tokens_ms_all": masked,
            "tokens_sha1": hashlib.sha1(tokens.numpy().tobytes()).hexdigest()[:12]}


def write_markdown(results: list[dict], meta: dict) -> str:
    a = meta["args"]
    lines = [markers(NAME)[0], "## Compiled decode: per-step overhead, and llama.cpp beside it", "",
             (f"Written by `python benchmarks/compile_overhead.py` on {meta['date']}, {results[0]['cpu']}, "
              f"{meta['cpu_count']} CPU cores, torch on {a['threads']} thread(s). SmolLM2-135M-Instruct int4 g128 "
              f"with int8 embeddings (RTN, quantized on load), greedy `generate` of {a['new_tokens']} new tokens "
              "after a 16-token prompt with a static KV cache. Each row is a fresh process; the rows alternate for "
              f"{a['rounds']} rounds. `torch.compile`: `model.forward = torch.compile(model.forward, dynamic=False)`; "
              "`compile_for_generation`: the library's helper (no dynamo guards on the model's modules, no "
              "inductor size asserts), its graphs computing each fused q/k/v and gate/up group in one kernel call; "
              "`groups apart`: the same with each sibling layer calling its own kernel in the graphs. "
              "Per decode step, cProfile self time over "
              f"{a['profiled']} generates: `guards` is dynamo's wrapper (its guard evaluation), `size asserts` "
              "inductor's `assert_size_stride` on the graph's inputs, `wrapper` the generated Python code that "
              f"calls the kernels. Then {a['repeats']} generates timed round-robin with llama.cpp (`xllamacpp` "
              f"{meta.get('xllamacpp', '')}, the shipped `Q4_1` GGUF, same threads, `poll=0`, `ignore_eos`, served "
              "by a child process), medians; ours decode exactly that many tokens with `eos_token_id=None`, as "
              "`speed.py`; `min_new_tokens` is the same `generate` forced to its length by `min_new_tokens` instead, "
              "timed in the same rounds (its logits processor masks the EOS token over the whole vocabulary at every "
              "step). `ratio` = llama.cpp's ms per token / ours (1.0 = as fast). `tokens` hashes the "
              "generated ids (the same in every row: the helper changes no numbers)."), "",
             "| round | row | guards (ms/step) | size asserts (ms/step) | wrapper (ms/step) | ms/token | "
             "llama.cpp ms/token | ratio | ms/token with min_new_tokens | warm-up (s) | tokens |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        lines.append(f"| {r['round']} | {r['row']} | {r['guards_ms']:.2f} | {r['size_asserts_ms']:.2f} | "
                     f"{r['wrapper_ms']:.2f} | {r['ms_per_token']:.2f} | {r['llamacpp_ms_per_token']:.2f} | "
                     f"{r['llamacpp_ms_per_token'] / r['ms_per_token']:.2f} | "
                     f"{r['min_new_tokens_ms_per_token']:.2f} | {r['warm_up_s']:.0f} | "
                     f"`{r['tokens_sha1']}` |")
    lines.append("")
    for row in ROWS:
        ratios = [r["llamacpp_ms_per_token"] / r["ms_per_token"] for r in results if r["row"] == row]
        lines.append(f"- {row}: ratio to llama.cpp, median over rounds **{statistics.median(ratios):.2f}** "
                     f"({', '.join(f'{x:.2f}' for x in ratios)}).")
    lines += ["", f"Raw results: `benchmarks/results/{NAME}.json`.", markers(NAME)[1]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--profiled", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=2)
    add_row_runner_arguments(parser, NAME)
    args = parser.parse_args()
    if run_worker(args, worker):
        return
    if args.render_only:
        results, meta = load_for_render(NAME)
    else:
        passthrough = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in ("threads", "new_tokens", "profiled",
                                                                                "repeats")]
        results = []
        for round_ in range(1, args.rounds + 1):
            results += [dict(r, round=round_) for r in run_rows(__file__, list(ROWS), passthrough)]
        meta = run_meta(args, ["threads", "new_tokens", "profiled", "repeats", "rounds"])
        from importlib.metadata import version

        meta["xllamacpp"] = version("xllamacpp")
    publish(NAME, results, write_markdown(results, meta), *markers(NAME), meta)


if __name__ == "__main__":
    main()
