"""Streamed GPTQ on an accelerator: seconds and memory per block at the block shapes of Llama-2-7B and Llama-2-70B.

Each row is a synthetic Llama with that model's widths but only `--blocks` decoder blocks (random initialisation,
saved as bf16 shards by `streaming.synthetic_checkpoint`; quality does not matter here, time and memory do),
quantized streamed with GPTQ int4 group 128 on `--device` (blocks move to the accelerator for their calibration and
Hessian math, and back), calibrated on `--windows` windows of 512 random token ids. The whole model's time is the
measured median seconds per block times its block count plus the measured rest of the run (embeddings, head,
writing), so every hour in the table traces to a measured figure.

    python benchmarks/streaming_accelerator.py --device cuda     # on a machine with a CUDA GPU
    python benchmarks/streaming_accelerator.py --render-only     # the section from the saved results
"""

from __future__ import annotations

import argparse
import statistics
import time

from common import (
    add_row_runner_arguments,
    load_for_render,
    merge_with_saved,
    peak_rss_mib,
    publish,
    run_meta,
    run_rows,
    run_worker,
)
from streaming import WORK, synthetic_checkpoint

MARK_BEGIN, MARK_END = "<!-- streaming_accelerator:begin -->", "<!-- streaming_accelerator:end -->"
# row -> (LlamaConfig fields of the real model, its real block count)
SHAPES = {
    "llama-2-7b-shape": (dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                              num_key_value_heads=32), 32),
    "llama-2-70b-shape": (dict(vocab_size=32000, hidden_size=8192, intermediate_size=28672, num_attention_heads=64,
                               num_key_value_heads=8), 80),
    # a dry run of the script itself, on any machine (not in the default rows)
    "tiny-shape": (dict(vocab_size=1000, hidden_size=256, intermediate_size=704, num_attention_heads=4,
                        num_key_value_heads=4), 4),
}


def worker(row: str, args) -> dict:
    import torch

    from optimum_agentos import AgentOSConfig
    from optimum_agentos.quantization.quantizer import Quantizer

    fields, real_blocks = SHAPES[row]
    shape = dict(fields, num_hidden_layers=args.blocks, tie_word_embeddings=False, max_position_embeddings=4096)
    source = synthetic_checkpoint(shape, WORK / f"synth-{row}-{args.blocks}")
    ids = torch.randint(0, fields["vocab_size"], (args.windows, 512), generator=torch.Generator().manual_seed(0))
    quantizer = Quantizer.from_pretrained(str(source), streaming=True, device=args.device)
    block_params = sum(p.numel() for p in quantizer.model.model.layers[0].parameters())  # before packing
    start = time.perf_counter()
    quantizer.quantize(WORK / f"out-{row}", AgentOSConfig(bits=4, group_size=128, method="gptq"), ids,
                       batch_size=args.batch_size, buffer_memory=args.buffer_memory)
    seconds = time.perf_counter() - start
    blocks = [b["seconds"] for b in quantizer.stats["blocks"]]
    result = {
        "row": row, "blocks": len(blocks), "real_blocks": real_blocks, "seconds": seconds, "block_seconds": blocks,
        "block_median_s": statistics.median(blocks), "rest_s": seconds - sum(blocks),
        "block_params": block_params,
        "peak_rss_mib": peak_rss_mib(), "device": args.device, "torch": torch.__version__,
        "tokens": args.windows * 512,
    }
    if args.device.startswith("cuda"):
        result["device_name"] = torch.cuda.get_device_name()
        result["peak_device_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def write_markdown(results: list[dict], meta: dict) -> str:
    first = results[0]
    lines = [
        MARK_BEGIN, "## Streamed GPTQ on an accelerator: Llama-2-7B and -70B block shapes", "",
        f"Written by `python benchmarks/streaming_accelerator.py --device {first['device']}` on {meta['date']}, on "
        f"{first.get('device_name', first['device'])} (torch {first['torch']}), the device machine lent to this "
        "project for a few minutes (its CPU side is not this repository's 2-core machine). Each row is a synthetic "
        f"Llama with the named model's widths but {first['blocks']} decoder blocks, random bf16 weights, quantized "
        f"streamed (GPTQ int4 group 128, blocks on the accelerator for calibration and the Hessian math) on "
        f"{first['tokens']} calibration tokens (random ids, {first['tokens'] // 512} windows of 512). `full model` "
        "is the measured median seconds per block times the real model's block count plus the measured rest "
        "(embeddings, head, writing the output). Peak RSS is the host process; peak device memory is "
        "`torch.cuda.max_memory_allocated`.",
        "",
        "| row | params / block | blocks run | s / block (median) | rest (s) | full model: blocks | full model (hours) "
        "| peak RSS (MiB) | peak device memory (MiB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        hours = (r["block_median_s"] * r["real_blocks"] + r["rest_s"]) / 3600
        lines.append(f"| {r['row']} | {r['block_params'] / 1e6:.0f}M | {r['blocks']} | {r['block_median_s']:.1f} | "
                     f"{r['rest_s']:.1f} | {r['real_blocks']} | {hours:.2f} | {r['peak_rss_mib']:.0f} | "
                     + (f"{r['peak_device_mib']:.0f} |" if "peak_device_mib" in r else "- |"))
    lines += ["", "Raw results: `benchmarks/results/streaming_accelerator.json`.", MARK_END]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="*", default=[r for r in SHAPES if r != "tiny-shape"], choices=list(SHAPES))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--buffer-memory", default="16GB")
    add_row_runner_arguments(parser, "streaming_accelerator")
    args = parser.parse_args()
    if run_worker(args, worker):
        return
    if args.render_only:
        results, meta = load_for_render("streaming_accelerator")
    else:
        passthrough = ["--device", args.device, "--blocks", str(args.blocks), "--windows", str(args.windows),
                       "--batch-size", str(args.batch_size), "--buffer-memory", args.buffer_memory]
        results = merge_with_saved("streaming_accelerator", run_rows(__file__, args.rows, passthrough))
        meta = run_meta(args, ["device", "blocks", "windows"])
    publish("streaming_accelerator", results, write_markdown(results, meta), MARK_BEGIN, MARK_END, meta)


if __name__ == "__main__":
    main()
