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
ROWS = ["smollm2-gptq-memory", "smollm2-gptq-streamed", "smollm2-gptq-streamed-lowmem", "smollm2-sparsegpt-memory",
        "smollm2-sparsegpt-streamed", "synth-gptq-streamed"]
# `-lowmem`: the settings that trade time for the lowest peak: one window per batch, a smaller activation buffer, and
# glibc told to give every allocation of 1 MiB or more its own mapping (returned to the system when freed, instead
# of pooled in the heap where freed activations fragment it); the same as MALLOC_MMAP_THRESHOLD_=1048576
LOWMEM = dict(batch_size=1, buffer_memory="48MB", mmap_threshold=2**20)
# A Llama of 2.07B parameters: 24 blocks of 2560 wide, MLP 6912, untied 32000-token embeddings and head.
SYNTH = dict(vocab_size=32000, hidden_size=2560, intermediate_size=6912, num_hidden_layers=24, num_attention_heads=20,
             num_key_value_heads=20, tie_word_embeddings=False, max_position_embeddings=2048)


def synthetic_checkpoint(shape: dict = SYNTH, folder: Path = WORK / "synth-llama-bf16") -> Path:
    """A synthetic Llama of `shape` (LlamaConfig fields) as bf16 safetensors shards, made once into `folder`, block
    by block on the meta device, never whole."""
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    if (folder / "done").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(**shape, dtype="bfloat16")
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
    from optimum_agentos.streaming.pipeline import current_rss_bytes

    torch.manual_seed(0)
    result = {"row": row, "rss_start_mib": peak_rss_mib()}
    if row.endswith("-lowmem"):
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, LOWMEM["mmap_threshold"])  # M_MMAP_THRESHOLD
        args.batch_size, args.buffer_memory = LOWMEM["batch_size"], LOWMEM["buffer_memory"]
        result.update(LOWMEM)
        row = row[: -len("-lowmem")]
    streamed = row.endswith("streamed")
    out = WORK / result["row"]  # the full row name: a -lowmem row and its default twin keep separate outputs
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
        result["base_rss_mib"] = current_rss_bytes() / 2**20
        start = time.perf_counter()
        quantizer.quantize(out, gptq, ids, batch_size=args.batch_size, buffer_memory=args.buffer_memory)
        result["blocks_done"] = len(quantizer.model.model.layers)
    else:
        source = resolve_model("smollm2-135m")
        compressor_cls = Quantizer if "gptq" in row else Pruner
        compressor = compressor_cls.from_pretrained(source, streaming=streamed)
        result["base_rss_mib"] = current_rss_bytes() / 2**20
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
    if streamed and "gptq" in row:  # after the peak is read: the formula's capture term needs the distinct tokens
        if not row.startswith("synth"):
            ids = quantizer.calibration_ids("wikitext2", args.calib_windows, 512)
        result["distinct_tokens"] = int(ids.unique().numel())
    blocks = quantizer.stats.get("blocks") or []
    result["blocks"] = [{"seconds": b["seconds"], "rss_mib": b["rss_bytes"] / 2**20} for b in blocks]
    result["spilled_mib"] = quantizer.stats.get("spilled_bytes", 0) / 2**20
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


# Llama shapes for the worked table: hidden, intermediate, vocabulary, blocks, key/value width, tied embeddings,
# attention heads.
SCALE_MODELS = {
    "SmolLM2-135M (measured)": (576, 1536, 49152, 30, 192, True, 9),
    "synthetic 2.07B (measured)": (2560, 6912, 32000, 24, 2560, False, 20),
    "Llama-2-7B": (4096, 11008, 32000, 32, 4096, False, 32),
    "Llama-2-70B": (8192, 28672, 32000, 80, 1024, False, 64),
}
MB = 2**20


def block_params(h, i, v, blocks, kv, tied, heads=None) -> int:
    return 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h


def total_params(h, i, v, blocks, kv, tied, heads=None) -> int:
    return blocks * block_params(h, i, v, blocks, kv, tied) + v * h * (1 if tied else 2) + h


def block_output_bytes(shape) -> float:
    """One block's int4 output (half a byte per weight, a float16 scale and a zero per 128): what is held before
    the block's part file is written."""
    return block_params(*shape) * (0.5 + 3 / 128)


def peak_formula(shape, base: float, tokens: int, buffer_cap: float | None, distinct: int | None = None,
                 batch: int = 4, seq_len: int = 512) -> dict:
    """Predicted peak RSS (bytes) of streamed GPTQ: the base (interpreter, libraries, tokenizer, skeleton) plus the
    largest of three phases, float32 compute:
    capture = the embedding rows of the `distinct` calibration tokens + buffer;
    block = the block's float weights + its Hessians (one per distinct input: 3 H² + I², all alive at the end of
    the statistics pass) + buffer + the larger of one batch's activations through the block (4 bytes x b·T·(4·I +
    8·H), the MLP's four intermediate-wide tensors and eight hidden-wide ones, + b·heads·T² attention scores) and
    the widest layer's solve extras (its weight copy and codes, 5·H·I; its Hessian is inverted in place) + the
    block's int4 output before its part file is written;
    rest = one kept matrix at a time: its float16 copy + a 16 MiB chunk read and cast."""
    h, i, v, blocks, kv, tied, heads = shape
    buffer = 4 * tokens * h if buffer_cap is None else min(4 * tokens * h, buffer_cap)
    distinct = v if distinct is None else distinct
    capture = 4 * h * distinct + buffer
    hessians = 4 * (3 * h * h + i * i)
    activations = 4 * batch * seq_len * (4 * i + 8 * h) + 4 * batch * heads * seq_len**2
    block = 4 * block_params(*shape) + hessians + buffer + max(5 * h * i, activations) + block_output_bytes(shape)
    rest = 2 * v * h + 2 * 16 * MB
    return {"capture": capture, "block": block, "rest": rest, "peak": base + max(capture, block, rest)}


def write_markdown(results: list[dict], meta: dict) -> str:
    args = meta["args"]
    lines = [MARK_BEGIN, "## Streamed compression: memory and time per block", "",
             f"Written by `python benchmarks/streaming.py` on {meta['date']}, {meta['cpu_count']} CPU cores; rows run "
             "one at a time, at most beside low-priority (`nice 19`) unit tests, which can lengthen the times but "
             "not the memory. Each row is a fresh process; peak RSS "
             "(MiB = 2^20 bytes) is the whole process up to the end of compression (imports, tokenizer, calibration "
             "data, model load for the in-memory rows); `base` is the RSS just before compressing starts. SmolLM2 is "
             "the library's cached float32 conversion (the folder `from_pretrained('smollm2-135m')` loads, one "
             f"float32 file of 538 MB), calibrated on {args['calib_windows']} WikiText-2 validation windows of 512 "
             f"tokens; the synthetic model on {args['synth_windows']} windows. GPTQ int4 group 128, SparseGPT 50% "
             f"unstructured; streamed rows keep at most `--buffer-memory {args['buffer_memory']}` of activations "
             "in memory (the rest spills to disk) and write each block to disk as soon as it is quantized (joined "
             "into 200 MB shards at the end). `-lowmem` rows trade time for memory: batches of one window, "
             f"`--buffer-memory {LOWMEM['buffer_memory']}`, and glibc's `M_MMAP_THRESHOLD` set to 1 MiB (the same as "
             "`MALLOC_MMAP_THRESHOLD_=1048576` in the environment), so freed activations go back to the system instead "
             "of fragmenting the heap.", "",
             "Peak memory of streamed GPTQ (float32 compute; H hidden, I intermediate, V vocabulary, P parameters "
             "per block, T calibration tokens, U distinct calibration tokens, B = min(4·T·H, buffer budget), b = 4 "
             "windows of t = 512 tokens per batch, a attention heads): base + max(capture, block, rest) with capture "
             "= 4·U·H + B (only the calibration tokens' embedding rows are read), block = 4·P (the block's float "
             "weights) + 4·(3·H² + I²) (its Hessians, one per distinct input, all alive at the end of the statistics "
             "pass; each is then inverted in its own storage and freed with its last layer, each float weight as soon "
             "as its layer is quantized) + B + max(4·b·t·(4·I + 8·H) + 4·b·a·t², 5·H·I) (one batch's activations "
             "through the block, or the widest layer's weight copy and codes) + P·(0.5 + 3/128) (the block's int4 "
             "output before it is written), rest = 2·V·H + 32 MiB (one embedding or head matrix at a time, cast to "
             "float16 in 16 MiB chunks). `predicted peak` is that formula with the row's measured base; the peak RSS "
             "also covers what happens before compression starts (tokenizing the calibration text).", "",
             "| row | blocks | time (s) | s / block (median) | base RSS (MiB) | peak RSS (MiB) | predicted peak (MiB) "
             "| bit-identical to in-memory |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    from optimum_agentos.streaming.writer import parse_size

    cap = parse_size(args["buffer_memory"])
    for r in results:
        secs = sorted(b["seconds"] for b in r.get("blocks", []))
        median = f"{secs[len(secs) // 2]:.1f}" if secs else "-"
        predicted = "-"
        if "gptq-streamed" in r["row"]:
            shape = SCALE_MODELS["synthetic 2.07B (measured)" if r["row"].startswith("synth") else
                                 "SmolLM2-135M (measured)"]
            windows = args["synth_windows"] if r["row"].startswith("synth") else args["calib_windows"]
            f = peak_formula(shape, r["base_rss_mib"] * MB, windows * 512, parse_size(r.get("buffer_memory", cap)),
                             r.get("distinct_tokens"), batch=r.get("batch_size", args["batch_size"]))
            predicted = f"{f['peak'] / MB:.0f}"
        lines.append(f"| {r['row']} | {r.get('blocks_done', len(r.get('blocks', []))) or '-'} | {r['seconds']:.0f} | "
                     f"{median} | {r['base_rss_mib']:.0f} | {r['peak_rss_mib']:.0f} | {predicted} | "
                     f"{r.get('identical', '-')} |")
    identity = REPO / "benchmarks" / "results" / "streaming_identity.json"
    if identity.exists():
        check = json.loads(identity.read_text())
        lines += ["", f"`python benchmarks/streaming_identity.py {check['blocks']} {check['windows']}` (SmolLM2 GPTQ "
                  f"in memory and streamed, both cut to the first {check['blocks']} blocks, {check['windows']} "
                  f"calibration windows): tensors identical: {check['identical']}."]
    synth = next((r for r in results if r["row"] == "synth-gptq-streamed" and r.get("blocks")), None)
    if synth is not None:
        lines += _worked_table(synth, args, cap)
    lines += ["", "Raw results: `benchmarks/results/streaming.json`.", MARK_END]
    return "\n".join(lines)


def _worked_table(synth: dict, args: dict, cap: int) -> list[str]:
    secs = sorted(b["seconds"] for b in synth["blocks"])
    per_block = secs[len(secs) // 2]
    measured_shape = SCALE_MODELS["synthetic 2.07B (measured)"]
    measured_tokens = args["synth_windows"] * 512
    tokens = 64 * 512
    lines = ["", f"Worked table, streamed GPTQ int4 with 64 calibration windows of 512 tokens, from the synthetic "
             f"model's measured median {per_block:.1f} s per block ({block_params(*measured_shape) / 1e6:.1f}M "
             f"parameters per block, {measured_tokens} tokens) and its measured base RSS "
             f"({synth['base_rss_mib']:.0f} MiB). Time scales with parameters per block x calibration tokens (the "
             "forward passes and Hessians; the GPTQ solve grows faster, with the cube of the input width). "
             "Memory is the formula above with the activation buffer capped at "
             f"{cap / MB:.0f} MiB (spilled beyond) and every vocabulary row counted in the capture (U = V). The in-memory path needs the float32 model, 4 bytes per "
             "parameter, before anything else. The accelerator column is measured: `benchmarks/streaming_accelerator.py` "
             "ran the same streamed GPTQ on blocks of the real 7B and 70B widths on one NVIDIA H200 (see its section); "
             "its hours are that run's median seconds per block x the real block count + the measured rest.", "",
             "| model | parameters | in-memory float32 (GB) | streamed peak (GB) | CPU hours (this machine) | "
             "H200 hours (measured) |", "|---|---:|---:|---:|---:|---:|"]
    accelerator = {}
    measured = REPO / "benchmarks" / "results" / "streaming_accelerator.json"
    if measured.exists():
        for r in json.loads(measured.read_text()):
            accelerator[{"llama-2-7b-shape": "Llama-2-7B", "llama-2-70b-shape": "Llama-2-70B"}.get(r["row"])] = (
                r["block_median_s"] * r["real_blocks"] + r["rest_s"]) / 3600
    for name, shape in SCALE_MODELS.items():
        params = total_params(*shape)
        f = peak_formula(shape, synth["base_rss_mib"] * MB, tokens, cap)
        hours = (per_block * shape[3] * block_params(*shape) / block_params(*measured_shape)
                 * tokens / measured_tokens / 3600)
        gpu = f"{accelerator[name]:.2f}" if name in accelerator else "-"
        lines.append(f"| {name} | {params / 1e9:.2f}B | {4 * params / 1e9:.1f} | {f['peak'] / 1e9:.2f} | "
                     f"{hours:.1f} | {gpu} |")
    return lines


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
            if "-streamed" in r["row"] and twin is not None:
                r["identical"] = twin["identical"] = identical(WORK / r["row"], WORK / twin["row"])
        results = merge_with_saved("streaming", results)
        meta = run_meta(args, ["calib_windows", "synth_windows", "synth_blocks", "batch_size", "buffer_memory"])
    publish("streaming", results, write_markdown(results, meta), MARK_BEGIN, MARK_END, meta)


if __name__ == "__main__":
    main()
