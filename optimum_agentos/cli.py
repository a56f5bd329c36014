"""The `optimum-agentos` command line."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from .commands.arguments import _prune_parser, _quantize_parser


def _check_output(args) -> Path:
    from .formats.folder import check_save_dir

    output = Path(args.output)
    try:
        check_save_dir(output, args.overwrite)
    except FileExistsError as err:  # also UnsafeOverwriteError: the user's files are named
        raise FileExistsError(str(err).replace("overwrite=True (CLI: --overwrite)", "--overwrite")) from None
    return output


def _load(compressor_cls, model: str, **kwargs):
    """`Quantizer`/`Pruner.from_pretrained(model, **kwargs)`, a missing model named as such before transformers is
    called."""
    from .models import ModelNotFoundError, check_model_source, how_to_name_a_model

    check_model_source(model)
    try:
        return compressor_cls.from_pretrained(model, **kwargs)
    except OSError as err:  # transformers' "not a valid model identifier", a failed download, a gated repo, ...
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelNotFoundError(f"Model {model!r} could not be loaded: {reason} {how_to_name_a_model()}") from err


def quantize_config(args):
    """The `AgentOSConfig` of parsed `quantize` arguments (a bad value raises `ValueError`)."""
    from .config import AgentOSConfig

    return AgentOSConfig(
        bits=args.bits, group_size=args.group_size, sym=args.sym, method=args.method, act_order=args.act_order,
        observer=args.observer, activations=args.activations, embedding_bits=args.embedding_bits,
        smoothquant_alpha=args.smoothquant_alpha, awq=args.awq, rounding_steps=args.rounding_steps,
        damp_percent=args.damp_percent, target=args.target, ignore=args.ignore,
    )


def prune_configs(args):
    """The `PruningConfig` and the optional `AgentOSConfig` of parsed `prune` arguments."""
    from .config import AgentOSConfig
    from .pruning.config import PruningConfig

    config = PruningConfig(
        method=None if args.method == "none" else args.method, sparsity=args.sparsity, pattern=args.pattern,
        target=args.target, ignore=args.ignore, mlp_neurons=args.mlp_neurons, attention_groups=args.attention_groups,
        layers=args.layers, uniform=not args.non_uniform, threshold=args.threshold, scope=args.scope,
        allocation=args.allocation, reconstruction_steps=args.reconstruction_steps,
        reconstruction_lr=args.reconstruction_lr,
        calibrated=args.calibrated,
    )
    quantization = None
    if args.bits:
        quantization = AgentOSConfig(bits=args.bits, group_size=args.group_size, method=args.quant_method)
    return config, quantization


def check_arguments(command: str, args) -> None:
    """Validate parsed `quantize`/`prune` arguments without loading anything: the configs they imply and the
    counts; raises `ValueError` naming the bad value (recipes call it before any step runs)."""
    if command not in ("quantize", "prune", "auto"):
        return
    if command in ("quantize", "auto"):
        quantize_config(args)
        if args.max_size_mb is not None:
            from .commands.auto import parse_candidates

            parse_candidates(args.candidates)
    else:
        prune_configs(args)
    if getattr(args, "streaming", False):
        if args.eval:
            raise ValueError("--eval compares the model in memory before and after compression; with --streaming "
                             "no model is held in memory. Drop --eval and evaluate the output folder afterwards "
                             "(optimum-agentos eval).")
        if command == "auto" or getattr(args, "max_size_mb", None) is not None:
            raise ValueError("--max-size-mb (mixed precision) does not run with --streaming; drop one of them.")
    for name, least in (("num_samples", 1), ("seq_len", 1), ("batch_size", 1), ("eval_windows", 0)):
        value = getattr(args, name)
        if value < least:
            raise ValueError(f"--{name.replace('_', '-')} {value} must be at least {least}.")


def _evaluator(args, tokenizer):
    if not args.eval:
        return None
    from .evaluation import perplexity

    return lambda model: perplexity(model, tokenizer, args.eval, "test", args.seq_len, args.eval_windows,
                                    device=getattr(args, "device", None))


def _save_with_card(args, model, tokenizer, info: dict, baseline, evaluate, files: dict | None = None) -> dict:
    """Evaluate the compressed model, save it with its card atomically; returns the summary's shared rows."""
    from .formats.folder import folder_size, save_model_folder
    from .hub.card import write_card

    results = []
    if evaluate is not None:
        results.append({"task": args.eval, "metric": "perplexity", "split": "test", "baseline": baseline,
                        "compressed": evaluate(model),
                        "dataset_type": "wikitext" if args.eval == "wikitext2" else args.eval})
    info.update(
        results=results,
        command="optimum-agentos " + " ".join(shlex.quote(a) for a in getattr(args, "argv", None) or sys.argv[1:]),
        datasets=["wikitext"] if "wikitext2" in (args.calibration_dataset, args.eval) else None,
    )

    def extra(folder):
        info["sizes"]["compressed"] = folder_size(folder)
        write_card(folder, info)
        for name, text in (files or {}).items():
            Path(folder, name).write_text(text)

    save_model_folder(model, tokenizer, args.output, overwrite=args.overwrite, extra=extra)
    base_size = info["sizes"].get("baseline")
    summary = {
        "size_mb": round(info["sizes"]["compressed"] / 1e6, 1),
        "baseline_size_mb": round(base_size / 1e6, 1) if base_size else None,
    }
    for r in results:
        summary[f"{r['task']}_ppl_baseline"] = round(r["baseline"], 3)
        summary[f"{r['task']}_ppl_compressed"] = round(r["compressed"], 3)
    return summary


def run_quantize(args) -> dict:
    from .quantization.quantizer import Quantizer

    if args.max_size_mb is not None:
        from .commands.auto import run

        return run(args)
    check_arguments("quantize", args)
    output = _check_output(args)
    config = quantize_config(args)
    quantizer = _load(Quantizer, args.model, streaming=args.streaming, device=args.device)
    calibration = args.calibration_dataset if args.method != "rtn" or args.smoothquant_alpha is not None else None
    if args.streaming:
        start = time.perf_counter()
        quantizer.quantize(output, config, calibration, args.num_samples, args.seq_len, args.batch_size,
                           overwrite=args.overwrite,
                           card_extra=_card_extra(args), buffer_memory=args.buffer_memory, spill_dir=args.spill_dir)
        return {"output": str(output), "method": config.method, "bits": config.bits, "group_size": config.group_size,
                "layers": quantizer.stats["layers"], "quantize_seconds": round(time.perf_counter() - start, 1),
                "streaming": True, **_streamed_sizes(output, quantizer)}
    evaluate = _evaluator(args, quantizer.tokenizer)
    baseline = evaluate(quantizer.model) if evaluate else None
    info = {"base_model": args.model, "sizes": {"baseline": _source_size(quantizer.model)}}
    model = quantizer.quantize_in_place(config, calibration, args.num_samples, args.seq_len, args.batch_size)
    info["config"] = config.stamped().to_dict()
    summary = {
        "output": str(output), "method": config.method, "bits": config.bits, "group_size": config.group_size,
        "layers": quantizer.stats["layers"], "quantize_seconds": round(quantizer.stats["seconds"], 1),
    }
    summary.update(_save_with_card(args, model, quantizer.tokenizer, info, baseline, evaluate))
    return summary


def run_prune(args) -> dict:
    from .pruning.pruner import Pruner
    from .pruning.report import sparsity_report

    check_arguments("prune", args)
    output = _check_output(args)
    config, quantization = prune_configs(args)
    pruner = _load(Pruner, args.model, streaming=args.streaming, device=args.device)
    needs_data = config.needs_calibration or config.layers or (quantization and quantization.method == "gptq")
    calibration = args.calibration_dataset if needs_data or config.is_structured else None
    if args.streaming:
        start = time.perf_counter()
        pruner.prune(output, config, calibration, args.num_samples, args.seq_len, args.batch_size,
                     quantization=quantization,
                     float_dtype=args.float_dtype, overwrite=args.overwrite, card_extra=_card_extra(args),
                     buffer_memory=args.buffer_memory, spill_dir=args.spill_dir)
        report = pruner.report
        return {"output": str(output), "method": args.method, "pattern": args.pattern or "unstructured",
                "sparsity_measured": round(report["sparsity"], 4), "params_before": report["params_before"],
                "params_after": report["params_after"], "nonzero_params": report["nonzero_params"],
                "prune_seconds": round(time.perf_counter() - start, 1), "streaming": True,
                **_streamed_sizes(output, pruner)}
    evaluate = _evaluator(args, pruner.tokenizer)
    baseline = evaluate(pruner.model) if evaluate else None
    info = {"base_model": args.model, "sizes": {"baseline": _source_size(pruner.model)}, "pruning": config.to_dict()}
    pruner.prune_in_place(config, calibration, args.num_samples, args.seq_len, args.batch_size,
                          quantization=quantization)
    model = pruner.compress(config, args.float_dtype)
    report = sparsity_report(model, pruner.stats["params_before"], input_features=pruner.stats["input_features"])
    stored = getattr(model.config, "quantization_config", None)
    info.update(config=stored.to_dict() if stored is not None else {}, report=report)
    summary = {
        "output": str(output), "method": args.method, "pattern": args.pattern or "unstructured",
        "sparsity_measured": round(report["sparsity"], 4), "params_before": report["params_before"],
        "params_after": report["params_after"], "nonzero_params": report["nonzero_params"],
        "prune_seconds": round(pruner.stats["seconds"], 1),
    }
    if report.get("input_features"):
        summary["input_features_removed"] = round(report["input_features"]["fraction"], 4)
    files = {"agentos_sparsity.json": json.dumps(report, indent=2)}
    summary.update(_save_with_card(args, model, pruner.tokenizer, info, baseline, evaluate, files))
    return summary


def _card_extra(args) -> dict:
    """What the card of a streamed run records beside its config: the command and the calibration data."""
    return {"command": "optimum-agentos " + " ".join(shlex.quote(a) for a in getattr(args, "argv", None) or sys.argv[1:]),
            "datasets": ["wikitext"] if args.calibration_dataset == "wikitext2" else None}


def _streamed_sizes(output: Path, compressor) -> dict:
    from .formats.folder import folder_size

    source = compressor.streamed.reader
    return {"size_mb": round(folder_size(output) / 1e6, 1),
            "baseline_size_mb": round(source.nbytes(source.keys()) / 1e6, 1)}


def _source_size(model) -> int | None:
    from .formats.folder import folder_size

    path = getattr(model, "name_or_path", None)
    return folder_size(path) if path and Path(path).is_dir() else None


def print_table(summary: dict) -> None:
    width = max(len(k) for k in summary)
    print("\n" + "-" * (width + 24))
    for key, value in summary.items():
        print(f"{key:<{width}}  {value}")
    print("-" * (width + 24))


def _lazy(module: str, name: str):
    def call(*args):
        import importlib

        return getattr(importlib.import_module(module, __package__), name)(*args)

    return call


# name -> (adds the sub-parser and returns it, runs the parsed args and returns the summary)
SUBCOMMANDS = {
    "quantize": (_quantize_parser, run_quantize),
    "prune": (_prune_parser, run_prune),
    "auto": (lambda sub: _quantize_parser(sub, "auto"), run_quantize),
    "eval": (_lazy(".commands.evaluate", "add_parser"), _lazy(".commands.evaluate", "run")),
    "card": (_lazy(".commands.card", "add_parser"), _lazy(".commands.card", "run")),
    "push": (_lazy(".commands.push", "add_parser"), _lazy(".commands.push", "run")),
    "run": (_lazy(".commands.run", "add_parser"), _lazy(".commands.run", "run")),
    "export": (_lazy(".commands.export", "add_parser"), _lazy(".commands.export", "run")),
}


def add_subcommands(parser: argparse.ArgumentParser) -> None:
    """Add every sub-command to `parser` (ours, or `optimum-cli agentos`'s)."""
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add, _) in SUBCOMMANDS.items():
        add(sub)
    distill = sub.add_parser("distill", add_help=False, prefix_chars="\0",
                             help="Distill a student from a teacher (`distill --help` lists options).")
    distill.add_argument("distill_args", nargs=argparse.REMAINDER)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="optimum-agentos", description="Compress transformers models for CPUs.")
    add_subcommands(parser)
    return parser


# User mistakes, reported as one `error:` line and exit code 2: bad values named by the library (ValueError: unknown
# task, recipe typo, bad config, model not found, newer checkpoint format, missing token) and paths the user named
# that are missing, occupied or not writable. Any other exception is a bug and keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)


def run_command(args) -> int:
    """Run parsed arguments, print the summary table; returns the exit code (2 for a user mistake, 130 when
    interrupted)."""
    start = time.perf_counter()
    try:
        if args.command == "eval":  # a missing model or baseline is named before the evaluation starts
            from .models import check_model_source

            for source in (args.model, args.baseline):
                if source:
                    check_model_source(source)
        if args.command == "distill":  # TrainingArguments-based: HfArgumentParser owns its options
            from .distillation.command import run_distill

            summary = run_distill(args.distill_args)
        else:
            summary = SUBCOMMANDS[args.command][1](args)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    exit_code = int(summary.pop("exit_code", 0))
    summary.setdefault("total_seconds", round(time.perf_counter() - start, 1))
    print_table(summary)
    if args.command in ("quantize", "prune", "auto"):
        Path(args.output, "agentos_summary.json").write_text(json.dumps(summary, indent=2))
        from .formats.folder import record_written

        record_written(Path(args.output, "agentos_summary.json"))
    return exit_code


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # recorded in model cards ("how it was made")
    return run_command(args)


if __name__ == "__main__":
    sys.exit(main())
