"""The `optimum-agentos` command line."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path


def _quantize_parser(sub) -> None:
    p = sub.add_parser(
        "quantize",
        help="Quantize a model into an agentos checkpoint folder.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default="smollm2-135m", help="Local folder, Hub id or alias (smollm2-135m).")
    p.add_argument("--output", required=True, help="Checkpoint folder to write.")
    p.add_argument("--bits", type=int, default=4, choices=[2, 3, 4, 8])
    p.add_argument("--group-size", type=int, default=128, help="-1 for one group per output channel.")
    p.add_argument("--sym", action="store_true", help="Symmetric quantization.")
    p.add_argument("--method", default="gptq", choices=["rtn", "gptq"])
    p.add_argument("--act-order", action="store_true", help="GPTQ: quantize columns by decreasing Hessian diagonal.")
    p.add_argument("--damp-percent", type=float, default=0.01)
    p.add_argument("--target", nargs="*", default=None, help="Modules to quantize (names or re:regex).")
    p.add_argument("--ignore", nargs="*", default=None, help="Modules to keep in full precision.")
    p.add_argument("--calibration-dataset", default="wikitext2")
    p.add_argument("--num-samples", type=int, default=64, help="Calibration windows.")
    p.add_argument("--seq-len", type=int, default=512, help="Calibration and eval window length.")
    p.add_argument("--eval", default=None, help="Perplexity dataset to evaluate before/after (e.g. wikitext2).")
    p.add_argument("--eval-windows", type=int, default=64, help="Number of eval windows.")
    p.add_argument("--overwrite", action="store_true", help="Replace an existing output folder.")


def run_quantize(args) -> dict:

    from .checkpoint import folder_size, save_model_folder
    from .config import AgentOSConfig
    from .hub.card import write_card
    from .quantization.quantizer import Quantizer

    output = Path(args.output)
    if output.exists() and any(output.iterdir()) and not args.overwrite:
        raise SystemExit(f"error: {output} exists and is not empty; pass --overwrite to replace it.")
    config = AgentOSConfig(
        bits=args.bits, group_size=args.group_size, sym=args.sym, method=args.method, act_order=args.act_order,
        damp_percent=args.damp_percent, target=args.target, ignore=args.ignore,
    )
    quantizer = Quantizer.from_pretrained(args.model)
    base_size = _source_size(quantizer.model)
    results, evaluate = [], None
    if args.eval:
        from .evaluation import perplexity

        def evaluate(model):
            return perplexity(model, quantizer.tokenizer, args.eval, "test", args.seq_len, args.eval_windows)

        baseline = evaluate(quantizer.model)
    calibration = args.calibration_dataset if args.method == "gptq" else None
    model = quantizer.quantize_in_place(config, calibration, args.num_samples, args.seq_len)
    if args.eval:
        results.append({"task": args.eval, "metric": "perplexity", "split": "test", "baseline": baseline,
                        "compressed": evaluate(model), "dataset_type": "wikitext" if args.eval == "wikitext2" else args.eval})
    command = "optimum-agentos " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv else ""
    info = {
        "base_model": args.model, "config": config.stamped().to_dict(), "results": results, "command": command,
        "datasets": ["wikitext"] if "wikitext2" in (args.calibration_dataset, args.eval) else None,
        "sizes": {"baseline": base_size},
    }

    def extra(folder):
        info["sizes"]["compressed"] = folder_size(folder)
        write_card(folder, info)

    save_model_folder(model, quantizer.tokenizer, output, overwrite=True, extra=extra)
    summary = {
        "output": str(output), "method": config.method, "bits": config.bits, "group_size": config.group_size,
        "layers": quantizer.stats["layers"], "quantize_seconds": round(quantizer.stats["seconds"], 1),
        "size_mb": round(info["sizes"]["compressed"] / 1e6, 1),
        "baseline_size_mb": round(base_size / 1e6, 1) if base_size else None,
    }
    for r in results:
        summary[f"{r['task']}_ppl_baseline"] = round(r["baseline"], 3)
        summary[f"{r['task']}_ppl_quantized"] = round(r["compressed"], 3)
    return summary


def _source_size(model) -> int | None:
    from .checkpoint import folder_size

    path = getattr(model, "name_or_path", None)
    return folder_size(path) if path and Path(path).is_dir() else None


def print_table(summary: dict) -> None:
    width = max(len(k) for k in summary)
    print("\n" + "-" * (width + 24))
    for key, value in summary.items():
        print(f"{key:<{width}}  {value}")
    print("-" * (width + 24))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="optimum-agentos", description="Compress transformers models for CPUs.")
    sub = parser.add_subparsers(dest="command", required=True)
    _quantize_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    if args.command == "quantize":
        summary = run_quantize(args)
    summary["total_seconds"] = round(time.perf_counter() - start, 1)
    print_table(summary)
    Path(args.output, "agentos_summary.json").write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
