"""Mixed precision under a size budget on SmolLM2-135M-Instruct: size against WikiText-2 perplexity for uniform GPTQ
(int4 g128, int3 g128) and automatic plans (`Quantizer.quantize_to_budget`) at 112.6 MB (uniform int4 g128's size)
and 90 MB, all measured in this script.

Protocol of benchmarks/quantization.py (the core issue's): WikiText-2 raw test, first 64 windows of 512 tokens, no
BOS; GPTQ calibration on WikiText-2 validation, 64 windows of 512. Each row is a fresh process: quantize, save,
reload with `AutoModelForCausalLM.from_pretrained`, evaluate. The automatic rows measure each layer's sensitivity
(block-output error of each candidate, GPTQ, on the first `--error-samples` calibration windows) once; the second
budget reuses that measurement (`plan_mixed_precision(sensitivity=...)`), so its compress time excludes it.

    python benchmarks/mixed_precision.py                 # 4 rows (about 40 minutes on 2 cores)
    python benchmarks/mixed_precision.py --render-only   # BENCHMARKS.md section from benchmarks/results/
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from common import (
    REPO,
    add_row_runner_arguments,
    load_for_render,
    peak_rss_mib,
    publish,
    run_meta,
    run_rows,
    run_worker,
)

MARK_BEGIN, MARK_END = "<!-- mixed-precision:begin -->", "<!-- mixed-precision:end -->"
ROWS = {
    "uniform-int4-g128-gptq": dict(bits=4, group_size=128),
    "uniform-int3-g128-gptq": dict(bits=3, group_size=128),
    "auto-112.6MB": 112.6,
    "auto-90MB": 90.0,
}
CACHE = REPO / "benchmarks" / "work" / "mixed_precision_sensitivity.json"


def worker(row: str, args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from optimum_agentos import AgentOSConfig
    from optimum_agentos.evaluation import perplexity
    from optimum_agentos.formats import folder_size
    from optimum_agentos.models import resolve_model
    from optimum_agentos.quantization.quantizer import Quantizer

    torch.manual_seed(0)
    quantizer = Quantizer.from_pretrained(resolve_model("smollm2-135m"))
    tokenizer = quantizer.tokenizer
    candidates = [tuple(int(p) for p in c.split(":")) for c in args.candidates]
    result = {"row": row}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "q"
        start = time.perf_counter()
        if isinstance(ROWS[row], dict):
            quantizer.quantize(folder, AgentOSConfig(method="gptq", **ROWS[row]), "wikitext2",
                               num_samples=args.calib_windows, seq_len=512)
        else:
            cached = json.loads(CACHE.read_text()) if CACHE.exists() else None
            usable = cached if cached and cached["candidates"] == args.candidates and \
                cached["error_samples"] == args.error_samples and cached.get("method") == args.sensitivity_method \
                else None
            quantizer.quantize_to_budget(
                folder, ROWS[row], "wikitext2", num_samples=args.calib_windows, seq_len=512, candidates=candidates,
                error_samples=args.error_samples, sensitivity=usable["sensitivity"] if usable else None,
                sensitivity_method=args.sensitivity_method,
            )
            report = quantizer.mixed_report
            if usable is None:
                CACHE.parent.mkdir(parents=True, exist_ok=True)
                CACHE.write_text(json.dumps({"candidates": args.candidates, "error_samples": args.error_samples,
                                             "method": args.sensitivity_method,
                                             "sensitivity": report["sensitivity"], "seconds": report["seconds"]}))
            result.update(
                budget_mb=ROWS[row], formats=report["formats"], embedding_bits=report["embedding"]["embedding_bits"],
                predicted_error=report["predicted_error"], measured_error=report["measured_error"],
                sensitivity_s=report["seconds"] if usable is None else usable["seconds"],
                sensitivity_reused=usable is not None,
                layer_bits={n: [d["bits"], d["group_size"]] for n, d in report["layers"].items()},
            )
        result.update(compress_s=time.perf_counter() - start, peak_rss_mib=peak_rss_mib(),
                      size_mb=folder_size(folder) / 1e6)
        del quantizer
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        result["ppl"] = perplexity(model, tokenizer, "wikitext2", "test", 512, args.eval_windows)
    return result


def _plan_text(r: dict) -> str:
    formats = ", ".join(f"{k} x{v}" for k, v in r["formats"].items())
    return f"{formats}; embeddings {'int8' if r['embedding_bits'] else 'float16'}"


def _bits_by_block(r: dict) -> str:
    """Mean bits of each decoder block's layers, in order: where the plan spent its bytes."""
    blocks: dict[int, list[int]] = {}
    for name, (bits, _) in r["layer_bits"].items():
        blocks.setdefault(int(name.split(".")[2]), []).append(bits)
    return " ".join(f"{sum(b) / len(b):.1f}" for _, b in sorted(blocks.items()))


def plot(results: list[dict]) -> str:
    """Size against perplexity, uniform and automatic rows (PNG next to the raw results); returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    for auto, marker, label in ((False, "o", "uniform GPTQ"), (True, "s", "automatic plan")):
        rows = [r for r in results if ("formats" in r) == auto]
        ax.scatter([r["size_mb"] for r in rows], [r["ppl"] for r in rows], marker=marker, label=label)
        for r in rows:
            ax.annotate(r["row"], (r["size_mb"], r["ppl"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("size on disk (MB)")
    ax.set_ylabel("WikiText-2 perplexity")
    ax.set_title("SmolLM2-135M-Instruct: size vs perplexity")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = REPO / "benchmarks" / "results" / "mixed_precision.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path.relative_to(REPO))


def write_markdown(results: list[dict], meta: dict) -> str:
    args = meta["args"]
    rows = {r["row"]: r for r in results}
    int4 = rows.get("uniform-int4-g128-gptq")
    lines = [
        MARK_BEGIN,
        "## Mixed precision under a size budget: SmolLM2-135M-Instruct",
        "",
        f"Written by `python benchmarks/mixed_precision.py` on {meta['date']}, {meta['cpu_count']} CPU cores. "
        f"WikiText-2 raw test, first {args['eval_windows']} windows of 512 tokens, no BOS; GPTQ calibration on "
        f"WikiText-2 validation, {args['calib_windows']} windows of 512. Each row is a fresh process; the checkpoint "
        "is saved, reloaded with `AutoModelForCausalLM.from_pretrained` and evaluated. Size = the safetensors files "
        "(MB = 10^6 bytes). Automatic rows: `Quantizer.quantize_to_budget(max_size_mb=...)` with candidates "
        f"{', '.join(args['candidates'])} (bits:group) per layer and int8 or float16 embeddings; sensitivity = "
        f"block-output error of each candidate ({args.get('sensitivity_method', 'gptq').upper()}), measured on "
        f"{args['error_samples']} calibration windows; plans quantized with GPTQ; the "
        "predicted error is the plan's sum of those, the measured one the same quantity on the saved model "
        "(each block fed the float model's inputs).",
        "",
        "| row | budget (MB) | size (MB) | WikiText-2 ppl | vs uniform int4 g128 | compress time (s) | peak RSS (MiB) | "
        "predicted / measured error | plan |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        rel = f"{r['ppl'] / int4['ppl']:.3f}" if int4 else "-"
        auto = "formats" in r
        errors = f"{r['predicted_error']:.3f} / {r['measured_error']:.3f}" if auto else "-"
        time_s = f"{r['compress_s']:.0f}" + (" (sensitivity reused)" if r.get("sensitivity_reused") else "")
        lines.append(f"| {r['row']} | {r.get('budget_mb', '-')} | {r['size_mb']:.2f} | {r['ppl']:.2f} | {rel} | "
                     f"{time_s} | {r['peak_rss_mib']:.0f} | {errors} | {_plan_text(r) if auto else '-'} |")
    autos = [r for r in results if "formats" in r]
    if autos:
        lines += ["", f"Sensitivity pass: {autos[0]['sensitivity_s']:.0f} s (included in the first automatic row's "
                  "compress time). Mean bits per decoder block (blocks 0 to 29):", ""]
        lines += [f"- {r['row']}: {_bits_by_block(r)}" for r in autos]
    lines += ["", f"![size vs perplexity]({plot(results)})",
              "", "Raw results (with every layer's bits): `benchmarks/results/mixed_precision.json`.", MARK_END]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--eval-windows", type=int, default=64)
    parser.add_argument("--calib-windows", type=int, default=64)
    parser.add_argument("--error-samples", type=int, default=4)
    parser.add_argument("--candidates", nargs="*", default=["8:-1", "4:64", "4:128", "3:128"])
    parser.add_argument("--sensitivity-method", default="gptq", choices=["gptq", "rtn"],
                        help="how each candidate is quantized to measure its error (the plans are quantized with GPTQ)")
    add_row_runner_arguments(parser, "mixed_precision")
    args = parser.parse_args()
    if run_worker(args, worker):
        return
    if args.render_only:
        results, meta = load_for_render("mixed_precision")
    else:
        if CACHE.exists():
            CACHE.unlink()  # a fresh run measures the sensitivity again
        passthrough = ["--eval-windows", str(args.eval_windows), "--calib-windows", str(args.calib_windows),
                       "--error-samples", str(args.error_samples), "--sensitivity-method", args.sensitivity_method,
                       "--candidates", *args.candidates]
        results = run_rows(__file__, args.rows, passthrough)
        meta = run_meta(args, ["eval_windows", "calib_windows", "error_samples", "candidates", "sensitivity_method"])
    publish("mixed_precision", results, write_markdown(results, meta), MARK_BEGIN, MARK_END, meta)


if __name__ == "__main__":
    main()
