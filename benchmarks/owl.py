"""OWL layer sparsity (Yin et al. 2024) against uniform sparsity on SmolLM2-135M-Instruct: Wanda and SparseGPT at
50%, each uniform row measured beside its OWL row in this script.

Protocol of benchmarks/pruning.py (the core issue's): WikiText-2 raw test, first 64 windows of 512 tokens, no BOS;
calibration on WikiText-2 validation, 64 windows of 512; each row in a fresh process, saved (kept values in
bfloat16), reloaded with `AutoModelForCausalLM.from_pretrained`, evaluated in float32. OWL with the paper's defaults
(M=5, lambda=0.08).

    python benchmarks/owl.py                  # 4 rows (about 20 minutes on 2 cores)
    python benchmarks/owl.py --render-only    # BENCHMARKS.md section from benchmarks/results/owl.json
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from common import (
    add_row_runner_arguments, cpu_description, cpu_note, load_for_render, merge_with_saved, peak_rss_mib, publish,
    run_meta, run_rows, run_worker,
)

MARK_BEGIN, MARK_END = "<!-- owl:begin -->", "<!-- owl:end -->"

ROWS = {
    "wanda-50-uniform": dict(method="wanda", sparsity=0.5),
    "wanda-50-owl": dict(method="wanda", sparsity=0.5, allocation="owl"),
    "sparsegpt-50-uniform": dict(method="sparsegpt", sparsity=0.5),
    "sparsegpt-50-owl": dict(method="sparsegpt", sparsity=0.5, allocation="owl"),
    # with block reconstruction (the pruning table's sparsegpt-50+rec32 is its uniform row): do the two gains add up?
    "sparsegpt-50-owl+rec32": dict(method="sparsegpt", sparsity=0.5, allocation="owl", reconstruction_steps=32,
                                   reconstruction_lr=5e-4),
}


def worker(row: str, args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from optimum_agentos import Pruner, PruningConfig
    from optimum_agentos.evaluation import perplexity
    from optimum_agentos.formats import folder_size
    from optimum_agentos.models import resolve_model

    torch.manual_seed(0)
    pruner = Pruner.from_pretrained(resolve_model("smollm2-135m"))
    tokenizer = pruner.tokenizer
    config = PruningConfig(**ROWS[row])
    result = {"row": row, "cpu": cpu_description()}
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        pruner.prune(Path(tmp) / "p", config, "wikitext2", num_samples=args.calib_windows, seq_len=512,
                     float_dtype="bfloat16")
        result.update(prune_s=time.perf_counter() - start, peak_rss_mib=peak_rss_mib(),
                      size_mb=folder_size(Path(tmp) / "p") / 1e6, sparsity=pruner.report["sparsity"])
        layers = pruner.report["layers"]
        result["zeros"] = sum(round(v["sparsity"] * v["shape"][0] * v["shape"][1]) for v in layers.values())
        result["weights"] = sum(v["shape"][0] * v["shape"][1] for v in layers.values())
        result["owl_blocks"] = pruner.report.get("owl_blocks")
        del pruner
        model = AutoModelForCausalLM.from_pretrained(Path(tmp) / "p", dtype=torch.float32).eval()
        result["ppl"] = perplexity(model, tokenizer, "wikitext2", "test", 512, args.eval_windows)
    return result


def write_markdown(results: list[dict], meta: dict) -> str:
    args = meta["args"]
    by_row = {r["row"]: r for r in results}
    lines = [
        MARK_BEGIN,
        "## OWL layer sparsity: SmolLM2-135M-Instruct",
        "",
        f"Written by `python benchmarks/owl.py` on {meta['date']}, {meta['cpu_count']} CPU cores. WikiText-2 raw test, "
        f"first {args['eval_windows']} windows of 512 tokens, no BOS; calibration on WikiText-2 validation, "
        f"{args['calib_windows']} windows of 512. Each row is a fresh process; the pruned model is saved (kept values "
        "in bfloat16), reloaded with `AutoModelForCausalLM.from_pretrained` and evaluated in float32. OWL: "
        "`PruningConfig(allocation='owl')` with the paper's M=5, lambda=0.08; prune time includes OWL's extra "
        "calibration pass. `zeros / weights` counts the removed weights of the pruned layers (exactly half). "
        + cpu_note(results),
        "",
        "| row | WikiText-2 ppl | vs uniform | prune time (s) | peak RSS (MiB) | size (MB) | zeros / weights | "
        "block sparsity (min-max) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        base = by_row.get(r["row"].replace("-owl", "-uniform"))
        rel = f"{r['ppl'] / base['ppl']:.3f}" if base and base is not r else "-"
        blocks = r.get("owl_blocks")
        spread = (f"{min(b['sparsity'] for b in blocks):.3f}-{max(b['sparsity'] for b in blocks):.3f}" if blocks
                  else "0.500")
        lines.append(f"| {r['row']} | {r['ppl']:.2f} | {rel} | {r['prune_s']:.0f} | {r['peak_rss_mib']:.0f} | "
                     f"{r['size_mb']:.1f} | {r['zeros']:,} / {r['weights']:,} | {spread} |")
    owl = next((r for r in results if r.get("owl_blocks")), None)
    if owl:
        ratios = ", ".join(f"{b['outlier_ratio'] * 100:.2f}" for b in owl["owl_blocks"])
        sparsities = ", ".join(f"{b['sparsity']:.3f}" for b in owl["owl_blocks"])
        lines += ["", f"Outlier ratio per decoder block, % (`{owl['row']}`): {ratios}.",
                  "", f"Sparsity given to each block: {sparsities}."]
    if any("+rec" in r["row"] for r in results):
        lines += ["", "`+rec32`: `reconstruction_steps=32, reconstruction_lr=5e-4` after OWL's SparseGPT; its uniform "
                  "counterpart is the pruning table's `sparsegpt-50+rec32` (same protocol)."]
    missing = [row for row in ROWS if row not in by_row]
    if missing:
        lines += ["", f"Not run yet: {', '.join(missing)} (`python benchmarks/owl.py --rows {' '.join(missing)}`)."]
    lines += ["", "Raw results: `benchmarks/results/owl.json`.", MARK_END]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--eval-windows", type=int, default=64)
    parser.add_argument("--calib-windows", type=int, default=64)
    add_row_runner_arguments(parser, "owl")
    args = parser.parse_args()
    if run_worker(args, worker):
        return
    if args.render_only:
        results, meta = load_for_render("owl")
    else:
        passthrough = ["--eval-windows", str(args.eval_windows), "--calib-windows", str(args.calib_windows)]
        results = merge_with_saved("owl", run_rows(__file__, args.rows, passthrough))  # rows not run are kept
        meta = run_meta(args, ["eval_windows", "calib_windows"])
    publish("owl", results, write_markdown(results, meta), MARK_BEGIN, MARK_END, meta)


if __name__ == "__main__":
    main()
