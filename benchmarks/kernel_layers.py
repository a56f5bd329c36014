"""Per-layer CPU timing of `QuantLinear`'s kernels against fp32 `F.linear`, on SmolLM2-135M's layer shapes.

Every candidate is timed round-robin (so machine noise hits all alike) at 1, 8, 16, 32, 64 and 512 tokens; medians in
microseconds and the ratio to fp32 are printed. Random weights: the kernels' speed does not depend on the values.

    OMP_NUM_THREADS=1 python benchmarks/kernel_layers.py --threads 1
    OMP_NUM_THREADS=2 python benchmarks/kernel_layers.py --threads 2
    python benchmarks/kernel_layers.py --threads 2 --copies 40 --repeats 7   # weights out of cache, as in a model
    python benchmarks/kernel_layers.py --render-only   # BENCHMARKS.md section from benchmarks/results/kernel_layers.json

Each run saves its medians to benchmarks/results/kernel_layers.json and writes its BENCHMARKS.md section. The
library itself does not rely on these figures: it measures its own choice per machine at load (nn/dispatch.py).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from optimum_agentos import QuantLinear
from optimum_agentos.nn.dynamic_int8 import ONEDNN_MIN_TOKENS
from optimum_agentos.nn.prepare import prepare_kernels

SHAPES = {"q_proj/o_proj": (576, 576), "k_proj/v_proj": (576, 192), "gate/up_proj": (576, 1536),
          "down_proj": (1536, 576)}


def _layer(weight, bits: int, group_size: int, policy: str, activations: str | None = None) -> QuantLinear:
    module = QuantLinear.from_float(weight, None, bits, group_size, sym=False)
    prepare_kernels(module, policy=policy, activations=activations)
    return module


def candidates(in_features: int, out_features: int) -> dict:
    """name -> callable(x) for one layer shape: the measured dispatch, and each path forced at every length."""
    weight = torch.randn(out_features, in_features) * 0.05
    int8 = _layer(weight, 8, -1, "auto")
    dense = int8.dequantize()
    return {
        "fp32": lambda x: F.linear(x, dense),
        "int8 (dispatch)": int8,
        "int8pack-bf16": _layer(weight, 8, -1, "int8pack-bf16"),
        "int8 dequant-bf16": _layer(weight, 8, -1, "dequant-bf16"),
        "int8 dequant-exact": _layer(weight, 8, -1, "dequant-exact"),
        "int8 dequant-t": _layer(weight, 8, -1, "dequant-t"),
        "int4-g128 (dispatch)": _layer(weight, 4, 128, "auto"),
        "int4pack-bf16": _layer(weight, 4, 128, "int4pack-bf16"),
        "int4 dequant-bf16": _layer(weight, 4, 128, "dequant-bf16"),
        "int4 dequant-exact": _layer(weight, 4, 128, "dequant-exact"),
        "int4 dequant-t": _layer(weight, 4, 128, "dequant-t"),
        "int4-g128 reference": _layer(weight, 4, 128, "reference"),
        "w8a8 (dispatch)": _layer(weight, 8, -1, "auto", "int8-dynamic"),
    }


MARK_BEGIN, MARK_END = "<!-- kernel_layers:begin -->", "<!-- kernel_layers:end -->"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def write_markdown(results: list[dict], meta: dict) -> str:
    args = meta["args"]
    names = list(results[0]["us"])
    lines = [
        MARK_BEGIN,
        "## CPU kernels per layer: SmolLM2-135M shapes",
        "",
        f"Written by `python benchmarks/kernel_layers.py --threads {args['threads']} --copies {args['copies']} "
        f"--repeats {args['repeats']}` on {meta['date']}, {meta['cpu_count']} CPU cores ({meta['cpu']}; "
        f"{meta.get('cpu_flags', 'flags not recorded')}). Random weights; each candidate is "
        f"{args['copies']} independent layers called in turn (so the weights stream from memory, as in a model), "
        "timed round-robin with the others; median microseconds per layer call and, in brackets, fp32 time / "
        "candidate time (above 1: faster than fp32). `(dispatch)`: what `QuantLinear` runs by default (the path "
        "measured fastest for the token count at load, `optimum_agentos/nn/dispatch.py`); the other columns force "
        "one path at every length (`OPTIMUM_AGENTOS_KERNELS=<path>`): `*pack-bf16` the packed kernel, "
        "`dequant-bf16` / `dequant-exact` the weight dequantized into a reused buffer and multiplied in bf16 / "
        "float32, `dequant-t` the same in float32 from codes kept transposed (`[in, out]`); `reference`: "
        "`policy=\"reference\"`; `w8a8 (dispatch)`: "
        "`activations=\"int8-dynamic\"`, int8 x int8 with per-token activation grids (fbgemm below "
        f"{meta.get('onednn_min_tokens', ONEDNN_MIN_TOKENS)} tokens, oneDNN from there where it runs).",
        "",
        "| layer | tokens | " + " | ".join(names) + " |",
        "|---|---:|" + "---:|" * len(names),
    ]
    for r in results:
        cells = " | ".join(f"{r['us'][n]:.0f} ({r['us']['fp32'] / r['us'][n]:.2f})" for n in names)
        lines.append(f"| {r['shape']} {r['in_features']}->{r['out_features']} | {r['tokens']} | {cells} |")
    lines += ["", "Raw results: `benchmarks/results/kernel_layers.json`.", MARK_END]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--tokens", type=int, nargs="*", default=[1, 8, 16, 32, 64, 512])
    parser.add_argument("--copies", type=int, default=1,
                        help="independent layers per candidate, called in turn: 40 puts the weights out of cache, "
                             "as in a whole model")
    parser.add_argument("--render-only", action="store_true",
                        help="Rewrite the BENCHMARKS.md section from benchmarks/results/kernel_layers.json.")
    parser.add_argument("--no-publish", action="store_true", help="Print only (no results file, no BENCHMARKS.md).")
    args = parser.parse_args()
    from common import load_for_render, publish, run_meta

    if args.render_only:
        results, meta = load_for_render("kernel_layers")
        publish("kernel_layers", results, write_markdown(results, meta), MARK_BEGIN, MARK_END, meta)
        return
    results = []
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"threads={args.threads}, copies={args.copies}; median microseconds (ratio fp32 time / candidate time)")
    for shape_name, (in_features, out_features) in SHAPES.items():
        copies = [candidates(in_features, out_features) for _ in range(args.copies)]
        names = list(copies[0])
        for tokens in args.tokens:
            x = torch.randn(1, tokens, in_features)
            times = {name: [] for name in names}
            with torch.no_grad():
                for runs in copies:  # warm-up
                    for run in runs.values():
                        run(x)
                for _ in range(args.repeats if tokens < 512 else max(5, args.repeats // 3)):
                    for name in names:
                        start = time.perf_counter()
                        for runs in copies:
                            runs[name](x)
                        times[name].append((time.perf_counter() - start) / len(copies))
            medians = {name: statistics.median(t) * 1e6 for name, t in times.items()}
            cells = "  ".join(f"{name} {us:.0f} ({medians['fp32'] / us:.2f}x)" for name, us in medians.items())
            print(f"{shape_name} {in_features}->{out_features}, {tokens} tokens: {cells}", flush=True)
            results.append({"shape": shape_name, "in_features": in_features, "out_features": out_features,
                            "tokens": tokens, "us": medians})
    if not args.no_publish:
        meta = run_meta(args, ["threads", "copies", "repeats", "tokens"])
        from common import cpu_flags

        meta.update(cpu=cpu_name(), cpu_flags=cpu_flags(), onednn_min_tokens=ONEDNN_MIN_TOKENS)
        publish("kernel_layers", results, write_markdown(results, meta), MARK_BEGIN, MARK_END, meta)


if __name__ == "__main__":
    main()
