"""Per-layer CPU timing of `QuantLinear`'s kernels against fp32 `F.linear`, on SmolLM2-135M's layer shapes.

Every candidate is timed round-robin (so machine noise hits all alike) at 1, 8, 64 and 512 tokens; medians in
microseconds and the ratio to fp32 are printed. Random weights: the kernels' speed does not depend on the values.

    OMP_NUM_THREADS=1 python benchmarks/kernel_layers.py --threads 1
    OMP_NUM_THREADS=2 python benchmarks/kernel_layers.py --threads 2
    python benchmarks/kernel_layers.py --threads 2 --copies 40 --repeats 7   # weights out of cache, as in a model
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from optimum_agentos import QuantLinear
from optimum_agentos.nn.kernels import Int8PackKernel
from optimum_agentos.nn.prepare import prepare_kernels

SHAPES = {"q_proj/o_proj": (576, 576), "k_proj/v_proj": (576, 192), "gate/up_proj": (576, 1536),
          "down_proj": (1536, 576)}


def candidates(in_features: int, out_features: int) -> dict:
    """name -> callable(x) for one layer shape."""
    weight = torch.randn(out_features, in_features) * 0.05
    int8 = QuantLinear.from_float(weight, None, 8, -1, sym=False)
    prepare_kernels(int8)
    int8_bf16 = QuantLinear.from_float(weight, None, 8, -1, sym=False)
    Int8PackKernel.prepare(int8_bf16)
    int8_bf16.kernel = any_tokens(Int8PackKernel)
    int8_dequant = QuantLinear.from_float(weight, None, 8, -1, sym=False)
    prepare_kernels(int8_dequant)
    int8_dequant.restore_weight()
    int8_dequant.kernel = None  # every call dequantizes (bf16 on AMX CPUs)
    int4 = QuantLinear.from_float(weight, None, 4, 128, sym=False)
    prepare_kernels(int4)
    int4_pack = QuantLinear.from_float(weight, None, 4, 128, sym=False)
    prepare_kernels(int4_pack)
    int4_pack.kernel = any_tokens(int4_pack.kernel)
    int4_dequant = QuantLinear.from_float(weight, None, 4, 128, sym=False)
    prepare_kernels(int4_dequant)
    int4_dequant.restore_weight()
    int4_dequant.kernel = None
    int4_reference = QuantLinear.from_float(weight, None, 4, 128, sym=False)
    prepare_kernels(int4_reference, policy="reference")
    dense = int8.dequantize()
    return {
        "fp32": lambda x: F.linear(x, dense),
        "int8 (dispatch)": int8,
        "int8pack-bf16": int8_bf16,
        "int8 dequantize": int8_dequant,
        "int4-g128 (dispatch)": int4,
        "int4pack-bf16": int4_pack,
        "int4 dequantize": int4_dequant,
        "int4-g128 reference": int4_reference,
    }


def any_tokens(kernel):
    """The kernel serving calls of any length (the dispatch stops at `DECODE_MAX_TOKENS`)."""
    return type(f"{kernel.__name__}AnyTokens", (kernel,), {"max_tokens": 1 << 30})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--tokens", type=int, nargs="*", default=[1, 8, 16, 32, 64, 512])
    parser.add_argument("--copies", type=int, default=1,
                        help="independent layers per candidate, called in turn: 40 puts the weights out of cache, "
                             "as in a whole model")
    args = parser.parse_args()
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


if __name__ == "__main__":
    main()
