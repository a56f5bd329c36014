"""W8A8 on SmolLM2-135M-Instruct: what the activation rounding costs, and what SmoothQuant and the float32 outlier
split give back. WikiText-2 perplexity (raw test, first 16 windows of 512 tokens, as in benchmarks/speed.py).

Every group of rows runs in its own fresh process:

- `plain`: the fp32 model; W8A8 RTN (`AgentOSConfig(bits=8, group_size=-1, activations="int8-dynamic")`, quantized
  in memory, CPU kernels prepared as at load); the same model with the float32 outlier split turned off
  (`dynamic_int8.OUTLIER_THRESHOLD` set to infinity, so every input channel goes through the int8 grid).
- `reference`: W8A8 RTN with `OPTIMUM_AGENTOS_KERNELS=reference` (dequantize, then `F.linear` on float
  activations: the weight rounding alone).
- `alpha-0.5`, `alpha-0.8`: the float model smoothed by `smooth_model` on the calibration windows (WikiText-2
  validation, 64 x 512, the Quantizer's default), evaluated in float, then W8A8 RTN of it, with and without the
  outlier split. These are the steps `Quantizer.quantize_in_place` runs for `smoothquant_alpha` (smooth, then RTN),
  split in two so the smoothed float model is measured too.

    python benchmarks/smoothquant.py                  # 16 minutes on 2 shared cores (2026-11-30)
    python benchmarks/smoothquant.py --render-only    # BENCHMARKS.md section from benchmarks/results/smoothquant.json
"""

from __future__ import annotations

import argparse
import os

from common import add_row_runner_arguments, load_for_render, publish, run_meta, run_rows, run_worker

MARK_BEGIN, MARK_END = "<!-- smoothquant:begin -->", "<!-- smoothquant:end -->"
GROUPS = ("plain", "reference", "alpha-0.5", "alpha-0.8")


def worker(group: str, args) -> dict:
    import torch

    if group == "reference":
        os.environ["OPTIMUM_AGENTOS_KERNELS"] = "reference"
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from optimum_agentos import AgentOSConfig
    from optimum_agentos.evaluation.tasks import evaluate_model
    from optimum_agentos.nn import dynamic_int8
    from optimum_agentos.nn.targets import resolve_targets
    from optimum_agentos.quantization.quantizer import Quantizer
    from optimum_agentos.quantization.smoothquant import smooth_model

    def ppl(model) -> float:
        (result,) = evaluate_model(model.eval(), quantizer.tokenizer, ["wikitext2"], ppl_windows=args.ppl_windows)
        return result.value

    quantizer = Quantizer.from_pretrained("smollm2-135m")
    w8a8 = AgentOSConfig(bits=8, group_size=-1, activations="int8-dynamic")
    rows = {}
    if group == "plain":
        rows["fp32"] = ppl(quantizer.model)
    if group.startswith("alpha-"):
        alpha = float(group.split("-")[1])
        names = resolve_targets(quantizer.model, w8a8.target, w8a8.ignore)
        ids = quantizer.calibration_ids("wikitext2", args.calib_windows, 512)
        smooth_model(quantizer.model, names, ids, alpha)
        rows[f"smoothed float (alpha {alpha:g})"] = ppl(quantizer.model)
    suffix = f" + SmoothQuant alpha {group.split('-')[1]}" if group.startswith("alpha-") else ""
    model = quantizer.quantize_in_place(w8a8)
    if group == "reference":
        rows["W8A8 RTN, reference path (weights rounded, activations float)"] = ppl(model)
        return {"row": group, "ppl": rows}
    rows["W8A8 RTN" + suffix] = ppl(model)
    dynamic_int8.OUTLIER_THRESHOLD = float("inf")
    rows["W8A8 RTN" + suffix + ", no outlier split"] = ppl(model)
    return {"row": group, "ppl": rows}


def write_markdown(results: list[dict], meta: dict) -> str:
    args = meta["args"]
    flat = {name: value for r in results for name, value in r["ppl"].items()}
    fp32 = flat.get("fp32")
    lines = [
        MARK_BEGIN,
        "## W8A8 and SmoothQuant: SmolLM2-135M-Instruct",
        "",
        f"Written by `python benchmarks/smoothquant.py` on {meta['date']}, {meta['cpu_count']} CPU cores, torch on "
        f"{args['threads']} thread(s). WikiText-2 raw test, first {args['ppl_windows']} windows of 512 tokens (the "
        "speed table's protocol). W8A8 = `AgentOSConfig(bits=8, group_size=-1, activations=\"int8-dynamic\")`, "
        "round to nearest, quantized in memory with the CPU kernels prepared as at load (int8 x int8, per-token "
        "activation grids; input channels above 6 in float32 unless `no outlier split`). SmoothQuant: `smooth_model` "
        f"on {args['calib_windows']} x 512 WikiText-2 validation windows, then the same RTN (what "
        "`smoothquant_alpha` runs). Each group of rows is a fresh process.",
        "",
        "| model | WikiText-2 ppl | ppl / fp32 |",
        "|---|---:|---:|",
    ]
    for name, value in flat.items():
        lines.append(f"| {name} | {value:.2f} | {value / fp32:.3f} |" if fp32 else f"| {name} | {value:.2f} | - |")
    lines += ["", "Raw results: `benchmarks/results/smoothquant.json`.", MARK_END]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--groups", nargs="*", default=list(GROUPS), choices=GROUPS)
    parser.add_argument("--ppl-windows", type=int, default=16)
    parser.add_argument("--calib-windows", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    add_row_runner_arguments(parser, "smoothquant")
    args = parser.parse_args()
    if run_worker(args, worker):
        return
    if args.render_only:
        results, meta = load_for_render("smoothquant")
    else:
        passthrough = ["--ppl-windows", str(args.ppl_windows), "--calib-windows", str(args.calib_windows),
                       "--threads", str(args.threads)]
        results = run_rows(__file__, args.groups, passthrough)
        meta = run_meta(args, ["ppl_windows", "calib_windows", "threads"])
    publish("smoothquant", results, write_markdown(results, meta), MARK_BEGIN, MARK_END, meta)


if __name__ == "__main__":
    main()
