"""What GPTQ's `act_order` and the range `observer` do on SmolLM2-135M-Instruct int4 (group 128): WikiText-2
perplexity (raw test, first 8 windows of 512 tokens, no BOS), the figures behind the `act_order` and `observer`
docs of `AgentOSConfig` (optimum_agentos/config.py).

Rows (each a fresh process, quantized in memory): fp32; RTN with the `minmax` observer (RTN's default) and with
`mse`; GPTQ (calibration on WikiText-2 validation, `--calib-windows` windows of 512, default 64) without
`act_order` (`minmax`), with `act_order` (`minmax`), and with `act_order` and `mse` (GPTQ's defaults).

    python benchmarks/gptq_ablation.py
    python benchmarks/gptq_ablation.py --calib-windows 16   # the run in BENCHMARKS.md (shorter calibration)
    python benchmarks/gptq_ablation.py --render-only   # BENCHMARKS.md section from benchmarks/results/gptq_ablation.json
"""

from __future__ import annotations

import argparse
import os
import time

from common import add_row_runner_arguments, load_for_render, publish, run_meta, run_rows, run_worker

MARK_BEGIN, MARK_END = "<!-- gptq_ablation:begin -->", "<!-- gptq_ablation:end -->"
ROWS = {
    "fp32": None,
    "rtn minmax": dict(method="rtn", observer="minmax"),
    "rtn mse": dict(method="rtn", observer="mse"),
    "gptq minmax, no act_order": dict(method="gptq", observer="minmax", act_order=False),
    "gptq minmax, act_order": dict(method="gptq", observer="minmax", act_order=True),
    "gptq mse, act_order (default)": dict(method="gptq", observer="mse", act_order=True),
}


def worker(row: str, args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from optimum_agentos import AgentOSConfig
    from optimum_agentos.evaluation.tasks import evaluate_model
    from optimum_agentos.quantization.quantizer import Quantizer

    quantizer = Quantizer.from_pretrained("smollm2-135m")
    model, seconds = quantizer.model, 0.0
    if ROWS[row] is not None:
        config = AgentOSConfig(bits=4, group_size=128, **ROWS[row])
        start = time.perf_counter()
        calibration = "wikitext2" if config.method == "gptq" else None
        model = quantizer.quantize_in_place(config, calibration, num_samples=args.calib_windows, seq_len=512)
        seconds = time.perf_counter() - start
    (ppl,) = evaluate_model(model.eval(), quantizer.tokenizer, ["wikitext2"], ppl_windows=args.ppl_windows)
    return {"row": row, "config": ROWS[row], "ppl": ppl.value, "quantize_s": seconds}


def write_markdown(results: list[dict], meta: dict) -> str:
    args = meta["args"]
    fp32 = next((r["ppl"] for r in results if r["row"] == "fp32"), None)
    lines = [
        MARK_BEGIN,
        "## GPTQ act_order and range observer: SmolLM2-135M-Instruct int4, group 128",
        "",
        f"Written by `python benchmarks/gptq_ablation.py` on {meta['date']}, {meta['cpu_count']} CPU cores, torch on "
        f"{args['threads']} thread(s). WikiText-2 raw test, first {args['ppl_windows']} windows of 512 tokens, no "
        f"BOS; GPTQ calibration on WikiText-2 validation, {args['calib_windows']} windows of 512. Each row is a fresh "
        "process, quantized in memory. `minmax`: a group's range is its min and max; `mse`: shrunk by up to 20% where "
        "that lowers the group's squared rounding error.",
        "",
        "| row | WikiText-2 ppl | ppl / fp32 | quantize time (s) |",
        "|---|---:|---:|---:|",
    ]
    for r in results:
        rel = f"{r['ppl'] / fp32:.3f}" if fp32 else "-"
        lines.append(f"| {r['row']} | {r['ppl']:.2f} | {rel} | {r['quantize_s']:.0f} |")
    lines += ["", "Raw results: `benchmarks/results/gptq_ablation.json`.", MARK_END]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--ppl-windows", type=int, default=8)
    parser.add_argument("--calib-windows", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    add_row_runner_arguments(parser, "gptq_ablation")
    args = parser.parse_args()
    if run_worker(args, worker):
        return
    if args.render_only:
        results, meta = load_for_render("gptq_ablation")
    else:
        passthrough = ["--ppl-windows", str(args.ppl_windows), "--calib-windows", str(args.calib_windows),
                       "--threads", str(args.threads)]
        results = run_rows(__file__, args.rows, passthrough)
        meta = run_meta(args, ["ppl_windows", "calib_windows", "threads"])
    publish("gptq_ablation", results, write_markdown(results, meta), MARK_BEGIN, MARK_END, meta)


if __name__ == "__main__":
    main()
