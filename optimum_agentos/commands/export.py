"""`optimum-agentos export`: write a checkpoint as GGUF, ONNX or compressed-tensors (see `optimum_agentos.export`)."""

from __future__ import annotations

import argparse


def add_parser(sub):
    p = sub.add_parser("export", help="Export a checkpoint to GGUF (llama.cpp), ONNX or compressed-tensors.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="Checkpoint folder (quantized, pruned, distilled or float), alias or "
                   "Hub id.")
    p.add_argument("--format", required=True, choices=["gguf", "onnx", "compressed-tensors"], help="Target format.")
    p.add_argument("--output", required=True, help="Folder to write (replaced only if it is a previous export).")
    p.add_argument("--requantize", action="store_true", help="Re-encode layers the format cannot hold exactly (the "
                   "added error is reported) instead of stopping.")
    p.add_argument("--overwrite", action="store_true", help="Replace an existing export in --output.")
    return p


def run(args) -> dict:
    from ..export import export

    summary = export(args.model, args.format, args.output, requantize=args.requantize, overwrite=args.overwrite)
    files = summary.pop("files")
    summary["size_mb"] = round(sum(files.values()) / 1e6, 2)
    return {k: v for k, v in summary.items() if not isinstance(v, (dict, list))}
