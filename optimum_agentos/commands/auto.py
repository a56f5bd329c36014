"""`optimum-agentos auto` (and `quantize --max-size-mb`): the mixed-precision plan that fits a size budget, its
quantization, an optional before/after evaluation and the checkpoint with its plan (`mixed_precision.json`)."""

from __future__ import annotations

import json


def parse_candidates(values: list[str] | None):
    """`["8:-1", "4:128"]` -> `[(8, -1), (4, 128)]` (None: the library's default set), each pair validated."""
    from ..config import AgentOSConfig
    from ..quantization.budget import DEFAULT_CANDIDATES

    if not values:
        return list(DEFAULT_CANDIDATES)
    pairs = []
    for value in values:
        try:
            bits, group_size = (int(p) for p in value.split(":"))
        except ValueError:
            raise ValueError(f"--candidates {value!r} must look like BITS:GROUP_SIZE, e.g. 4:128 or 8:-1.") from None
        AgentOSConfig(bits=bits, group_size=group_size)
        pairs.append((bits, group_size))
    return pairs


def run(args) -> dict:
    from ..formats.folder import folder_size
    from ..cli import _check_output, _evaluator, _load, _save_with_card, _source_size, check_arguments, quantize_config
    from ..quantization.quantizer import Quantizer

    check_arguments("auto", args)
    if args.sensitivity_samples < 1:
        raise ValueError(f"--sensitivity-samples {args.sensitivity_samples} must be at least 1.")
    output = _check_output(args)
    base = quantize_config(args)
    candidates = parse_candidates(args.candidates)
    quantizer = _load(Quantizer, args.model)
    evaluate = _evaluator(args, quantizer.tokenizer)
    baseline = evaluate(quantizer.model) if evaluate else None
    info = {"base_model": args.model, "sizes": {"baseline": _source_size(quantizer.model)}}
    model = quantizer.quantize_in_place_to_budget(
        args.max_size_mb, args.calibration_dataset, args.num_samples, args.seq_len, candidates, base,
        args.sensitivity_samples, batch_size=args.batch_size, sensitivity_method=args.sensitivity_method,
    )
    plan, report = quantizer.plan, quantizer.mixed_report
    info["config"] = plan.config.stamped().to_dict()
    info["mixed_precision"] = {k: report[k] for k in ("max_size_mb", "formats", "predicted_error", "measured_error")}
    summary = {
        "output": str(output), "method": base.method, "max_size_mb": args.max_size_mb,
        "plan": ", ".join(f"{k} x{v}" for k, v in plan.formats().items()),
        "embeddings": "int8" if plan.config.embedding_bits else plan.config.float_dtype,
        "predicted_error": round(report["predicted_error"], 5), "measured_error": round(report["measured_error"], 5),
        "quantize_seconds": round(quantizer.stats["seconds"] + plan.seconds, 1),
    }
    summary.update(_save_with_card(args, model, quantizer.tokenizer, info, baseline, evaluate,
                                   {"mixed_precision.json": json.dumps(report, indent=2)}))
    size = folder_size(output)
    if size > args.max_size_mb * 1e6:  # the plan bounds the files from above: a failure here is a bug
        raise RuntimeError(f"{output} takes {size} bytes, over --max-size-mb {args.max_size_mb}; please report.")
    summary["size_bytes"] = size
    return summary
