"""The `quantize`, `auto` and `prune` sub-parsers and the options they share."""

from __future__ import annotations

import argparse


def _quantize_parser(sub, name: str = "quantize") -> None:
    p = sub.add_parser(
        name,
        help="Quantize a model into an agentos checkpoint folder." if name == "quantize" else
        "Mixed precision: the per-layer bits that fit --max-size-mb with the least predicted error.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default="smollm2-135m", help="Local folder, Hub id or alias (smollm2-135m).")
    p.add_argument("--output", required=True, help="Checkpoint folder to write.")
    p.add_argument("--bits", type=int, default=4, choices=[2, 3, 4, 8])
    p.add_argument("--group-size", type=int, default=128, help="-1 for one group per output channel.")
    p.add_argument("--sym", action="store_true", help="Symmetric quantization.")
    p.add_argument("--method", default="gptq", choices=["rtn", "gptq", "awq", "autoround"],
                   help="awq: activation-aware scales + round to nearest; autoround: learned rounding, block by block.")
    p.add_argument("--awq", action="store_true", help="AWQ's scales before --method gptq or autoround.")
    p.add_argument("--rounding-steps", type=int, default=None,
                   help="--method autoround: signed-gradient steps per block (default 200).")
    p.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=True,
                   help="GPTQ: quantize columns by decreasing Hessian diagonal.")
    p.add_argument("--observer", default=None, choices=["mse", "minmax"],
                   help="Range of each group: MSE-searched or min/max (default: mse for GPTQ, minmax for RTN).")
    p.add_argument("--damp-percent", type=float, default=0.01)
    p.add_argument("--activations", default=None, choices=["int8-dynamic"],
                   help="W8A8: int8 activations quantized per token at run time (int8, --group-size -1 only).")
    p.add_argument("--embedding-bits", type=int, default=None, choices=[8],
                   help="int8 token embeddings and output head (one int8 matrix when tied); default: kept in float.")
    p.add_argument("--smoothquant-alpha", type=float, default=None,
                   help="W8A8: migrate activation outliers into the weights first (SmoothQuant) with this strength "
                        "in (0, 1), e.g. 0.5; uses --calibration-dataset, also with --method rtn.")
    p.add_argument("--target", nargs="*", default=None, help="Modules to quantize (names or re:regex).")
    p.add_argument("--ignore", nargs="*", default=None, help="Modules to keep in full precision.")
    p.add_argument("--max-size-mb", type=float, default=None, required=name == "auto",
                   help="Mixed precision: safetensors size budget in MB (10^6 bytes); --bits/--group-size are ignored.")
    p.add_argument("--candidates", nargs="*", default=None,
                   help="Mixed precision: BITS:GROUP choices per layer (default 8:-1 4:64 4:128 3:64 3:128 2:64).")
    p.add_argument("--sensitivity-samples", type=int, default=8,
                   help="Mixed precision: calibration windows on which each choice's block-output error is measured.")
    p.add_argument("--sensitivity-method", default=None, choices=["gptq", "rtn"],
                   help="Mixed precision: how each choice is quantized to measure its error (default: --method; "
                   "rtn is minutes faster).")
    _common_arguments(p)
    return p


def _common_arguments(p) -> None:
    p.add_argument("--calibration-dataset", default="wikitext2")
    p.add_argument("--num-samples", type=int, default=64, help="Calibration windows.")
    p.add_argument("--seq-len", type=int, default=512, help="Calibration and eval window length.")
    p.add_argument("--batch-size", type=int, default=4,
                   help="Calibration windows per forward pass. Learned rounding (--method autoround) trains on one "
                   "batch per step, so 1 makes each step one window (the setting of BENCHMARKS.md).")
    p.add_argument("--eval", default=None, help="Perplexity dataset to evaluate before/after (e.g. wikitext2).")
    p.add_argument("--eval-windows", type=int, default=64, help="Number of eval windows.")
    p.add_argument("--overwrite", action="store_true", help="Replace an existing output folder.")
    p.add_argument("--device", default="cpu",
                   help="Where each block is calibrated and compressed: cpu, cuda, cuda:1, or auto (an accelerator "
                   "when there is one, else the CPU).")
    p.add_argument("--streaming", action="store_true",
                   help="Read the checkpoint (safetensors) block by block and write each compressed block at once, "
                   "for models larger than memory (quantize: rtn and gptq).")
    p.add_argument("--buffer-memory", default=None,
                   help="With --streaming: the most calibration activations kept in memory (e.g. 2GB); the rest "
                   "spills to --spill-dir.")
    p.add_argument("--spill-dir", default=None,
                   help="With --streaming: where activations beyond --buffer-memory go (default: the system's "
                   "temporary folder).")


def _prune_parser(sub) -> None:
    p = sub.add_parser(
        "prune",
        help="Prune a model (optionally also quantize it) into an agentos checkpoint folder.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default="smollm2-135m", help="Local folder, Hub id or alias (smollm2-135m).")
    p.add_argument("--output", required=True, help="Checkpoint folder to write.")
    p.add_argument("--method", default="sparsegpt",
                   choices=["magnitude", "wanda", "sparsegpt", "column_magnitude", "none"],
                   help="Weight pruning inside layers ('column_magnitude': whole input features by sum |W[:, j]|); "
                        "'none' for structured removal only.")
    p.add_argument("--sparsity", type=float, default=None,
                   help="Fraction of weights (column_magnitude: input features) removed (default 0.5).")
    p.add_argument("--threshold", type=float, default=None,
                   help="Instead of --sparsity (magnitude, wanda, column_magnitude): remove what scores below it; "
                        "relative to each layer's mean score with --scope layer, absolute with --scope global.")
    p.add_argument("--scope", default="layer", choices=["layer", "global"],
                   help="Per layer, or one ranking / absolute threshold across all target layers.")
    p.add_argument("--calibrated", action="store_true",
                   help="column_magnitude: multiply each input's importance by its calibration RMS (as Wanda).")
    p.add_argument("--pattern", default=None, help="N:M semi-structured pattern, e.g. 2:4.")
    p.add_argument("--target", nargs="*", default=None, help="Modules to prune (names or re:regex).")
    p.add_argument("--ignore", nargs="*", default=None, help="Modules left dense.")
    p.add_argument("--mlp-neurons", type=float, default=0.0, help="Structured: fraction of MLP neurons removed.")
    p.add_argument("--attention-groups", type=int, default=0, help="Structured: KV head groups removed per layer.")
    p.add_argument("--layers", type=int, default=0, help="Structured: decoder layers removed.")
    p.add_argument("--non-uniform", action="store_true", help="Structured: rank neurons/heads across layers.")
    p.add_argument("--allocation", default="uniform", choices=["uniform", "owl"],
                   help="Wanda/SparseGPT: 'owl' gives blocks with more activation outliers a lower sparsity.")
    p.add_argument("--reconstruction-steps", type=int, default=0,
                   help="Wanda/SparseGPT: train each pruned block's kept weights this many steps to match the dense "
                        "block's output (masks fixed); 0 = off.")
    p.add_argument("--reconstruction-lr", type=float, default=5e-4, help="Adam learning rate of the reconstruction.")
    p.add_argument("--bits", type=int, default=None, choices=[2, 3, 4, 8], help="Also quantize to this many bits.")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--quant-method", default="gptq", choices=["rtn", "gptq"])
    p.add_argument("--float-dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                   help="dtype of the kept float weights on disk.")
    _common_arguments(p)
    return p
