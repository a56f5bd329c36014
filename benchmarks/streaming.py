"""Streamed versus in-memory compression: peak resident memory and time per block, against model size.

Rows (each a fresh process, one after the other, so a row's peak RSS is its own):
- `smollm2-gptq-memory` / `smollm2-gptq-streamed`: GPTQ int4 g128 of SmolLM2-135M-Instruct (the library's cached
  float32 conversion, the folder `Quantizer.from_pretrained("smollm2-135m")` loads), calibration on WikiText-2
  validation; the two output folders are compared tensor by tensor (bit-identical or the script fails).
- `smollm2-sparsegpt-memory` / `smollm2-sparsegpt-streamed`: SparseGPT 50% unstructured, the same way.
- `synth-gptq-streamed`: GPTQ int4 g128 of a synthetic Llama (random initialisation, saved once as bf16 shards
  into benchmarks/work/, git-ignored), calibration on WikiText-2 validation windows tokenized by SmolLM2's
  tokenizer (ids taken modulo the vocabulary; quality does not matter here, memory and time do).
  `--synth-blocks N` stops after N blocks (an estimate of the full run from the first blocks).

    python benchmarks/streaming.py                       # SmolLM2 rows + the synthetic model
    python benchmarks/streaming.py --rows smollm2-gptq-streamed --calib-windows 8
    python benchmarks/streaming.py --render-only
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import REPO, load_for_render, merge_with_saved, peak_rss_mib, publish, run_meta, run_rows

MARK_BEGIN, MARK_END = "<!-- streaming:begin -->", "<!-- streaming:end -->"
WORK = REPO / "benchmarks" / "work" / "streaming"
ROWS = ["smollm2-gptq-memory", "smollm2-gptq-streamed", "smollm2-sparsegpt-memory", "smollm2-sparsegpt-streamed",
        "synth-gptq-streamed"]
# A Llama of 2.07B parameters: 24 blocks of 2560 wide, MLP 6912, untied 32000-token embeddings and head.
SYNTH = dict(vocab_size=32000, hidden_size=2560, intermediate_size=6912, num_hidden_layers=24, num_attention_heads=20,
             num_key_value_heads=20, tie_word_embeddings=False, max_position_embeddings=2048)


def synthetic_checkpoint() -> Path:
    """The synthetic Llama as bf16 safetensors shards (made once, block by block on the meta device, never whole)."""
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = WORK / "synth-llama-bf16"
    if (folder / "done").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(**SYNTH, dtype="bfloat16")
    with init_empty_weights():
        model = LlamaForCausalLM(config)
    generator = torch.Generator().manual_seed(0)
    weight_map, shard = {}, 0
    groups = [[n for n in model.state_dict() if not n.startswith("model.layers.")]]
    groups += [[n for n in model.state_dict() if n.startswith(f"model.layers.{i}.")] for i in range(config.num_hidden_layers)]
    for names in groups:
        shard += 1
        tensors = {}
        for name in names:
            shape = model.get_parameter(name).shape
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
            else:
                tensors[name] = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
        file = f"model-{shard:05d}-of-{len(groups):05d}.safetensors"
        save_file(tensors, folder / file, metadata={"format": "pt"})
        weight_map.update({n: file for n in names})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(folder)
    (folder / "done").write_text("")
    return folder


def worker(row: str, args) -> dict:
    import torch

    from optimum_agentos import AgentOSConfig, PruningConfig
    from optimum_agentos.models import resolve_model
    from optimum_agentos.pruning import Pruner
    from optimum_agentos.quantization.quantizer import Quantizer

    torch.manual_seed(0)
    result = {"row": row, "rss_start_mib": peak_rss_mib()}
    streamed = row.endswith("streamed")
    out = WORK / row
    gptq = AgentOSConfig(bits=4, group_size=128, method="gptq")
    if row.startswith("synth"):
        source = synthetic_checkpoint()
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))
        from optimum_agentos.data import calibration_windows

        ids = calibration_windows(tokenizer, "wikitext2", "validation", args.synth_windows, 512) % SYNTH["vocab_size"]
        result["rss_start_mib"] = peak_rss_mib()
        quantizer = Quantizer.from_pretrained(str(source), streaming=True)
        if args.synth_blocks:
            quantizer.model.model.layers = quantizer.model.model.layers[: args.synth_blocks]
        start = time.perf_counter()
        quantizer.quantize(out, gptq, ids, batch_size=args.batch_size, buffer_memory=args.buffer_memory)
        result["blocks_done"] = len(quantizer.model.model.layers)
    else:
        source = resolve_model("smollm2-135m")
        compressor_cls = Quantizer if "gptq" in row else Pruner
        compressor = compressor_cls.from_pretrained(source, streaming=streamed)
        start = time.perf_counter()
        kwargs = dict(num_samples=args.calib_windows, seq_len=512, batch_size=args.batch_size)
        if streamed:
            kwargs["buffer_memory"] = args.buffer_memory
        if compressor_cls is Quantizer:
            compressor.quantize(out, gptq, "wikitext2", **kwargs)
        else:
            compressor.prune(out, PruningConfig(method="sparsegpt", sparsity=0.5), "wikitext2", **kwargs)
        quantizer = compressor
    result["seconds"] = time.perf_counter() - start
    result["peak_rss_mib"] = peak_rss_mib()
    blocks = quantizer.stats.get("blocks") or []
    result["blocks"] = [{"seconds": b["seconds"], "rss_mib": b["rss_bytes"] / 2**20} for b in blocks]
    result["source"] = str(source)
    return result


def identical(a: Path, b: Path) -> bool:
    """The same tensor names, dtypes and values in two checkpoint folders (shards may differ)."""
    import torch
    from safetensors import safe_open

    def names(folder):
        out = {}
        for file in folder.glob("*.safetensors"):
            with safe_open(file, framework="pt") as f:
                out.update({k: file for k in f.keys()})
        return out

    na, nb = names(a), names(b)
    if set(na) != set(nb):
        return False
    for key, file in na.items():
        with safe_open(file, framework="pt") as fa, safe_open(nb[key], framework="pt") as fb:
            ta, tb = fa.get_tensor(key), fb.get_tensor(key)
            if ta.dtype != tb.dtype or not torch.equal(ta, tb):
                return False
    return True


def write_markdown(results: list[dict], meta: dict) -> str:
    lines = [MARK_BEGIN, "## Streamed compression: memory and time per block", "",
             f"Written by `python benchmarks/streaming.py` on {meta['date']}, {meta['cpu_count']} CPU cores shared "
             "with other jobs (times are indicative). Each row is a fresh process; peak RSS (MiB = 2^20 bytes) is the "
             "whole process up to the end of compression, `start` the RSS after imports and calibration data.", "",
             "| row | blocks | time (s) | s / block (median) | peak RSS (MiB) | start RSS (MiB) | bit-identical |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in results:
        secs = sorted(b["seconds"] for b in r.get("blocks", []))
        median = f"{secs[len(secs) // 2]:.1f}" if secs else "-"
        lines.append(f"| {r['row']} | {len(r.get('blocks', [])) or '-'} | {r['seconds']:.0f} | {median} | "
                     f"{r['peak_rss_mib']:.0f} | {r['rss_start_mib']:.0f} | {r.get('identical', '-')} |")
    lines += ["", "Raw results: `benchmarks/results/streaming.json`.", MARK_END]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", nargs="*", default=ROWS)
    parser.add_argument("--calib-windows", type=int, default=64)
    parser.add_argument("--synth-windows", type=int, default=16)
    parser.add_argument("--synth-blocks", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--buffer-memory", default="64MB")
    parser.add_argument("--worker")
    parser.add_argument("--out")
    parser.add_argument("--render-only", action="store_true")
    args = parser.parse_args()
    if args.worker:
        Path(args.out).write_text(json.dumps(worker(args.worker, args)))
        return
    if args.render_only:
        results, meta = load_for_render("streaming")
    else:
        passthrough = ["--calib-windows", str(args.calib_windows), "--synth-windows", str(args.synth_windows),
                       "--synth-blocks", str(args.synth_blocks), "--batch-size", str(args.batch_size),
                       "--buffer-memory", args.buffer_memory]
        results = run_rows(__file__, args.rows, passthrough)
        by_row = {r["row"]: r for r in results}
        for r in results:
            twin = by_row.get(r["row"].replace("-streamed", "-memory"))
            if r["row"].endswith("streamed") and twin is not None:
                r["identical"] = twin["identical"] = identical(WORK / r["row"], WORK / twin["row"])
        results = merge_with_saved("streaming", results)
        meta = run_meta(args, ["calib_windows", "synth_windows", "synth_blocks", "batch_size", "buffer_memory"])
    publish("streaming", results, write_markdown(results, meta), MARK_BEGIN, MARK_END, meta)


if __name__ == "__main__":
    main()
