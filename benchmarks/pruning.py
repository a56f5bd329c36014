"""Pruning benchmark on SmolLM2-135M-Instruct: perplexity, pruning time, peak RSS, size on disk, exact sparsity,
and for structured pruning parameters, forward latency and a short recovery fine-tune.

Every row runs in its own fresh process, one after the other; the table goes to BENCHMARKS.md. Protocol (the core
issue's): WikiText-2 raw test, first 64 windows of 512 tokens, no BOS; calibration on WikiText-2 validation,
64 windows of 512. Sparse rows store their kept values in bfloat16 and are compared with the dense model saved in
bfloat16; every pruned row is saved, reloaded with `AutoModelForCausalLM.from_pretrained`, then evaluated.

    python benchmarks/pruning.py                       # all rows (about 40 minutes on 2 cores)
    python benchmarks/pruning.py --llmcompressor       # and llm-compressor's rows (its venv is made when missing)
    python benchmarks/pruning.py --rows dense sparsegpt-50 --eval-windows 8
    python benchmarks/pruning.py --rows --llmcompressor --merge   # only llm-compressor's rows, into the saved table
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, cpu_description, cpu_note, merge_with_saved, peak_rss_mb, publish, run_rows, run_worker

MARK_BEGIN, MARK_END = "<!-- pruning:begin -->", "<!-- pruning:end -->"

REC_STEPS, REC_LR = 32, 5e-4  # block reconstruction: steps (batches of 4 windows) per block, Adam's learning rate
# row -> (PruningConfig kwargs, AgentOSConfig kwargs for quantizing in the same pass)
ROWS = {
    "dense": None,
    "magnitude-50": (dict(method="magnitude"), None),
    "wanda-50": (dict(method="wanda"), None),
    "sparsegpt-50": (dict(method="sparsegpt"), None),
    "wanda-2:4": (dict(method="wanda", pattern="2:4"), None),
    "sparsegpt-2:4": (dict(method="sparsegpt", pattern="2:4"), None),
    "sparsegpt-50+int4-g128": (dict(method="sparsegpt"), dict(bits=4, group_size=128, method="gptq")),
    # SparseGPT, then each block's kept weights trained against the dense block's output (masks fixed)
    f"sparsegpt-50+rec{REC_STEPS}": (dict(method="sparsegpt", reconstruction_steps=REC_STEPS,
                                          reconstruction_lr=REC_LR), None),
    f"sparsegpt-2:4+rec{REC_STEPS}": (dict(method="sparsegpt", pattern="2:4", reconstruction_steps=REC_STEPS,
                                           reconstruction_lr=REC_LR), None),
    "mlp-neurons-25": (dict(method=None, mlp_neurons=0.25), None),
    # The original design's criterion, `|W|.sum(dim=0) < threshold` on down_proj inputs (= MLP neurons), one absolute
    # threshold for all layers, no calibration; thresholds are the 10/25/50% quantiles of SmolLM2-135M's down_proj
    # column sums (float32), rounded to 0.1.
    **{f"columns-{pct}": (dict(method="column_magnitude", threshold=threshold, scope="global", target=["down_proj"]), None)
       for pct, threshold in ((10, 75.7), (25, 81.8), (50, 86.2))},
    # The same criterion with Wanda's calibration (importance times the input's RMS over the calibration tokens), by
    # fraction per layer, like `mlp-neurons-25`.
    **{f"columns-calibrated-{pct}": (dict(method="column_magnitude", sparsity=pct / 100, calibrated=True,
                                          target=["down_proj"]), None) for pct in (10, 25, 50)},
}


# llm-compressor side by side: row -> (modifier, mask_structure); run only with --llmcompressor(-python)
LLMC_ROWS = {
    "llm-compressor-sparsegpt-50": ("sparsegpt", "0:0"),
    "llm-compressor-wanda-50": ("wanda", "0:0"),
    "llm-compressor-sparsegpt-2:4": ("sparsegpt", "2:4"),
}
# Its own venv (it pins its own transformers); torch pinned to the local CPU wheel so pip pulls no CUDA build.
LLMC_VERSION = "0.14.0.1"
LLMC_REQUIREMENTS = ["torch==2.13.0", f"llmcompressor=={LLMC_VERSION}"]
LLMC_VENV = REPO / "benchmarks" / "work" / f"llmcompressor-{LLMC_VERSION}"
LLMC_EARLIER = (
    "Rows published before 2026-11-30 (SparseGPT 68.07, Wanda 85.31, SparseGPT 2:4 129.24) passed `ignore=['lm_head']`, "
    "which matches nothing in llm-compressor 0.14 (with `targets=['Linear']` it names the head `lm_head.`), so the "
    "output head, tied to the input embedding in SmolLM2, was pruned to 50% as well."
)


def ensure_llmcompressor_venv(venv: Path = LLMC_VENV) -> str:
    """The python of a venv holding `LLMC_REQUIREMENTS`, created (or remade, if a stamp says otherwise) when missing."""
    python, stamp = venv / "bin" / "python", venv / ".benchmark-requirements"
    wanted = "\n".join(LLMC_REQUIREMENTS)
    if python.exists() and stamp.exists() and stamp.read_text() == wanted:
        return str(python)
    print(f"== creating {venv} with {' '.join(LLMC_REQUIREMENTS)}", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, LLMC_REQUIREMENTS[0]], check=True)  # torch first: the CPU wheel, not a CUDA build
    subprocess.run([*pip, *LLMC_REQUIREMENTS], check=True)
    stamp.write_text(wanted)
    return str(python)


def run_llmcompressor(python: str, rows: list[str], args) -> list[dict]:
    """The same calibration and eval token ids, written once, then each llm-compressor row in its own venv."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from optimum_agentos.data import calibration_windows, load_text, tokenize_text, windows_from_ids
    from optimum_agentos.models import resolve_model

    source = resolve_model("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(source)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        ids = {
            "calibration": calibration_windows(tokenizer, "wikitext2", "validation", args.calib_windows, 512),
            "eval": windows_from_ids(tokenize_text(tokenizer, load_text("wikitext2", "test")), args.eval_windows, 512),
        }
        save_file({k: v.contiguous() for k, v in ids.items()}, f"{tmp}/ids.safetensors")
        for row in rows:
            method, pattern = LLMC_ROWS[row]
            print(f"== {row}", flush=True)
            subprocess.run([python, str(Path(__file__).with_name("llmcompressor_side_by_side.py")), "--model",
                            str(source), "--ids", f"{tmp}/ids.safetensors", "--method", method, "--pattern", pattern,
                            "--out", f"{tmp}/{method}.json"], check=True)
            result = {"row": row, **json.loads(Path(f"{tmp}/{method}.json").read_text())}
            results.append(result)
            print(json.dumps(result), flush=True)
    del torch
    return results


def forward_latency_ratio(model, reference, ids, repeats: int = 7) -> float:
    """Median forward time of `model` over `reference`, the two timed alternately on the same input."""
    import torch

    times = {"model": [], "reference": []}
    with torch.inference_mode():
        for _ in range(repeats):
            for key, m in (("model", model), ("reference", reference)):
                start = time.perf_counter()
                m(input_ids=ids)
                times[key].append(time.perf_counter() - start)
    return statistics.median(times["model"]) / statistics.median(times["reference"])


def worst_sparsity_error(model, config) -> float:
    """Largest |zeros - target| over the stored sparse layers, in elements per selection group."""
    import math

    from optimum_agentos import SparseLinear

    worst = 0.0
    for module in model.modules():
        if isinstance(module, SparseLinear):
            total = module.in_features * module.out_features
            groups = {"magnitude": 1, "wanda": module.out_features,
                      "sparsegpt": math.ceil(module.in_features / config.block_size)}[config.method]
            if config.n_m:
                groups = total // config.n_m[1]
            worst = max(worst, abs(total - module.nnz - config.sparsity * total) / groups)
    return worst


def recover(model, tokenizer, steps: int, seq_len: int = 512, batch: int = 2, lr: float = 5e-5):
    """A short full fine-tune on WikiText-2 *validation* windows (the test split stays unseen)."""
    import torch
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    from optimum_agentos.data import calibration_windows

    ids = calibration_windows(tokenizer, "wikitext2", "validation", steps * batch, seq_len)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, max_steps=steps, per_device_train_batch_size=batch, learning_rate=lr, warmup_steps=2,
            lr_scheduler_type="linear", weight_decay=0.0, logging_steps=max(steps // 4, 1), save_strategy="no",
            report_to=[], use_cpu=True, seed=0,
        )
        model.train()
        Trainer(model=model, args=args, train_dataset=data).train()
    model.eval()
    torch.manual_seed(0)
    return model


def worker(row: str, args) -> dict:
    """One row in this process: prune (or not), save, reload from disk, evaluate."""
    import torch
    from transformers import AutoModelForCausalLM

    import optimum_agentos  # noqa: F401
    from optimum_agentos import AgentOSConfig, Pruner, PruningConfig
    from optimum_agentos.formats import folder_size
    from optimum_agentos.evaluation import perplexity
    from optimum_agentos.models import resolve_model

    torch.manual_seed(0)
    source = resolve_model("smollm2-135m")
    result = {"row": row, "cpu": cpu_description()}
    pruner = Pruner.from_pretrained(source)
    tokenizer = pruner.tokenizer
    result["params_before"] = pruner.model.num_parameters()

    def ppl(model):
        return perplexity(model, tokenizer, "wikitext2", "test", 512, args.eval_windows)

    with tempfile.TemporaryDirectory() as tmp:
        if ROWS[row] is None:
            pruner.model.to(torch.bfloat16).save_pretrained(Path(tmp) / "bf16")
            result.update(prune_s=0.0, peak_rss_mb=peak_rss_mb(), size_mb=folder_size(Path(tmp) / "bf16") / 1e6,
                          fp32_size_mb=folder_size(source) / 1e6, params_after=result["params_before"])
            model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
            result["ppl"] = ppl(model)
            return result
        prune_kwargs, quant_kwargs = ROWS[row]
        config = PruningConfig(**prune_kwargs)
        quantization = AgentOSConfig(**quant_kwargs) if quant_kwargs else None
        start = time.perf_counter()
        pruner.prune(Path(tmp) / "p", config, "wikitext2", num_samples=args.calib_windows, seq_len=512,
                     quantization=quantization, float_dtype="bfloat16")
        result["prune_s"] = time.perf_counter() - start
        result["peak_rss_mb"] = peak_rss_mb()
        result["size_mb"] = folder_size(Path(tmp) / "p") / 1e6
        result["sparsity"] = pruner.report["sparsity"]
        result["params_after"] = pruner.report["params_after"]
        report = pruner.report
        del pruner
        model = AutoModelForCausalLM.from_pretrained(Path(tmp) / "p", dtype=torch.float32).eval()
        if config.method in ("magnitude", "wanda", "sparsegpt") and config.threshold is None:
            result["worst_sparsity_error_per_group"] = worst_sparsity_error(model, config)
        if "input_features" in report:
            result["input_features_removed"] = report["input_features"]["fraction"]
            result["threshold"] = config.threshold
        result["ppl"] = ppl(model)
        if config.is_structured or config.method == "column_magnitude":
            dense = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
            ids = torch.randint(100, 10000, (1, 512), generator=torch.Generator().manual_seed(0))
            result["forward_latency_ratio"] = forward_latency_ratio(model, dense, ids)
            del dense
            if args.recovery_steps:  # 0: the row without its recovery fine-tune (a quick first pass)
                start = time.perf_counter()
                recover(model, tokenizer, args.recovery_steps)
                result["recovery_s"] = time.perf_counter() - start
                result["recovery_steps"] = args.recovery_steps
                result["ppl_after_recovery"] = ppl(model)
    return result


def write_markdown(results: list[dict], args) -> str:
    order = [*ROWS, *LLMC_ROWS]
    results = sorted(results, key=lambda r: order.index(r["row"]) if r["row"] in order else len(order))
    dense = next((r for r in results if r["row"] == "dense"), None)
    lines = [
        MARK_BEGIN,
        "## Pruning: SmolLM2-135M-Instruct",
        "",
        f"Written by `python benchmarks/pruning.py` on {time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPU cores. "
        f"WikiText-2 raw test, first {args.eval_windows} windows of 512 tokens, no BOS; calibration on WikiText-2 "
        f"validation, {args.calib_windows} windows of 512. Each row is a fresh process; pruned rows are saved "
        "(kept values and embeddings in bfloat16, `sparse+int4` in int4 codes), reloaded with "
        "`AutoModelForCausalLM.from_pretrained` and evaluated in float32. Size ratios are against the dense model "
        "saved in bfloat16 (the `dense` row's size) and, for the int4 row, the fp32 checkpoint. Peak RSS is the "
        "whole process up to the end of pruning (model load included). `sparsity error` is the largest deviation "
        "from the requested sparsity over all stored layers, in elements per selection group (magnitude: the "
        "layer; Wanda: a row; SparseGPT: a 128-column block; N:M: a group of M). `+recN` rows: "
        f"`reconstruction_steps=N, reconstruction_lr={REC_LR:g}`, each block's kept weights trained N steps (Adam, "
        "one calibration batch of 4 windows per step) to reproduce the dense block's output, masks fixed; the "
        "prune time includes it. " + cpu_note(results),
        "",
        "| row | WikiText-2 ppl | ppl / dense | prune time (s) | peak RSS (MiB) | size (MB) | size / dense bf16 | "
        "size / fp32 | measured sparsity | sparsity error | params |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        rel_ppl = f"{r['ppl'] / dense['ppl']:.3f}" if dense else "-"
        rel_size = f"{r['size_mb'] / dense['size_mb']:.3f}" if dense else "-"
        fp32 = f"{r['size_mb'] / dense['fp32_size_mb']:.3f}" if dense else "-"
        sparsity = f"{r['sparsity']:.4f}" if "sparsity" in r else "-"
        error = f"{r['worst_sparsity_error_per_group']:.2f}" if "worst_sparsity_error_per_group" in r else "-"
        params = f"{r['params_after'] / 1e6:.1f}M" if r.get("params_after") else "-"
        lines.append(
            f"| {r['row']} | {r['ppl']:.2f} | {rel_ppl} | {r['prune_s']:.0f} | {r['peak_rss_mb']:.0f} | "
            f"{r['size_mb']:.1f} | {rel_size} | {fp32} | {sparsity} | {error} | {params} |"
        )
    peer = [r for r in results if "llmcompressor" in r]
    if peer:
        lines += ["", llmcompressor_note(peer)]
    structured = [r for r in results if "forward_latency_ratio" in r]
    if structured:
        lines += [
            "",
            "Structured rows: parameters and forward latency (one 512-token window, median of 7, timed alternately "
            "with the dense model in the same process), then a short recovery fine-tune (AdamW, lr 5e-5, batch "
            "2 x 512 on WikiText-2 validation windows; the test split stays unseen). `columns-N` rows: "
            "`PruningConfig(method='column_magnitude', threshold=T, scope='global', target=['down_proj'])`, the "
            "original design's criterion (importance of input j = sum over outputs of |W[:, j]|, no calibration) "
            "with one absolute threshold T for all layers, chosen as the N% quantile of the model's down_proj column "
            "sums; the inputs below it are removed with their gate/up rows, so layers end up with different widths "
            "(`module_shapes`). `columns-calibrated-N` rows: the same importance times each input's RMS over the "
            "calibration tokens (`calibrated=True`, as Wanda scores weights), N% of each layer's inputs removed "
            "(`sparsity=N/100`). `MLP inputs removed` is the measured fraction.",
            "",
            "| row | threshold | MLP inputs removed | params / dense | forward latency / dense | ppl | recovery steps | "
            "recovery time (s) | ppl after recovery |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in structured:
            removed = f"{r['input_features_removed']:.4f}" if "input_features_removed" in r else "-"
            lines.append(
                f"| {r['row']} | {r.get('threshold') or '-'} | {removed} | {r['params_after'] / r['params_before']:.3f} | "
                f"{r['forward_latency_ratio']:.3f} | {r['ppl']:.2f} | {r.get('recovery_steps', 0)} | "
                + (f"{r['recovery_s']:.0f} | {r['ppl_after_recovery']:.2f} |" if "recovery_s" in r else "- | not run |")
            )
    lines += ["", "Raw results: `benchmarks/results/pruning.json`.", MARK_END]
    return "\n".join(lines)


def llmcompressor_note(rows: list[dict]) -> str:
    """The paragraph under the table: how llm-compressor's rows were run (from their recorded configuration)."""
    runs = {r["llmcompressor"]["modifier"]: r["llmcompressor"] for r in rows}
    cfg = next(iter(runs.values()))
    versions = ", ".join(f"{p} {v}" for p, v in cfg["versions"].items())
    args = {k: v for k, v in cfg["modifier_args"].items() if k not in ("mask_structure", "block_size", "dampening_frac")}
    sgpt = runs.get("SparseGPTModifier", {}).get("modifier_args", {})
    extra = (f"; SparseGPT with its defaults block_size={sgpt['block_size']}, dampening_frac={sgpt['dampening_frac']}"
             if sgpt else "")
    once = cfg["oneshot"]
    dates = sorted({r["measured_on"] for r in rows if "measured_on" in r})
    return (
        f"llm-compressor rows{' (measured ' + ', '.join(dates) + ')' if dates else ''}: {versions}, in its own venv "
        f"(`{LLMC_VENV.relative_to(REPO)}`, made by `--llmcompressor`), on the same calibration and eval token ids as "
        f"our rows. {' / '.join(f'`{m}`' for m in runs)} with "
        + ", ".join(f"{k}={v!r}" for k, v in args.items())
        + f", mask_structure `0:0` (unstructured) or `2:4`{extra}; as in llm-compressor's own recipes. `oneshot` with "
        f"its default pipeline (`{once['pipeline'].split()[0]}`, which runs these modifiers in the "
        f"`{cfg['pipeline']}` over `{', '.join(cfg['sequential_targets'])}`), {once['num_calibration_samples']} "
        f"calibration samples of {once['max_seq_length']} tokens, batch {once['batch_size']}, model in "
        f"{once['model_dtype']}. The result is saved with its `save_pretrained` (dense {once['model_dtype']}: this "
        "version writes no sparse format), reloaded with `from_pretrained` and evaluated like our rows. "
        f"{LLMC_EARLIER}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--eval-windows", type=int, default=64)
    parser.add_argument("--calib-windows", type=int, default=64)
    parser.add_argument("--recovery-steps", type=int, default=40)
    parser.add_argument("--llmcompressor", action="store_true",
                        help=f"adds llm-compressor's rows side by side, in its own venv ({LLMC_VENV.relative_to(REPO)}, "
                        "created when missing)")
    parser.add_argument("--llmcompressor-python", default=None,
                        help="python of an existing venv with llmcompressor (and torch==2.13.0), instead of ours")
    parser.add_argument("--llmcompressor-rows", nargs="*", default=list(LLMC_ROWS), choices=list(LLMC_ROWS))
    parser.add_argument("--merge", action="store_true",
                        help="keep the other rows of benchmarks/results/pruning.json, replacing only the rows run now")
    parser.add_argument("--render-only", action="store_true",
                        help="Rewrite the BENCHMARKS.md section from benchmarks/results/pruning.json (with the "
                        "window counts given here).")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if run_worker(args, worker):
        return
    if args.render_only:
        results = json.loads((REPO / "benchmarks" / "results" / "pruning.json").read_text())
        publish("pruning", results, write_markdown(results, args), MARK_BEGIN, MARK_END)
        return
    passthrough = ["--eval-windows", str(args.eval_windows), "--calib-windows", str(args.calib_windows),
                   "--recovery-steps", str(args.recovery_steps)]
    results = run_rows(__file__, args.rows, passthrough)
    if args.llmcompressor or args.llmcompressor_python:
        python = args.llmcompressor_python or ensure_llmcompressor_venv()
        results += run_llmcompressor(python, args.llmcompressor_rows, args)
    if args.merge:
        results = merge_with_saved("pruning", results)
    publish("pruning", results, write_markdown(results, args), MARK_BEGIN, MARK_END)


if __name__ == "__main__":
    main()
