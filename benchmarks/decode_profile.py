"""Where an int4 decode step of SmolLM2-135M-Instruct spends its time: torch.profiler over greedy generation, the
operators' own CPU time grouped by what they do, and the time no operator accounts for (Python: transformers'
modules and generation loop, our layers' dispatch).

    python benchmarks/decode_profile.py --threads 2 --new-tokens 32

Also times one 576->192 int4 layer call against the bare kernel (the per-layer overhead of `QuantLinear.forward`).
"""

from __future__ import annotations

import argparse
import time
import timeit
from collections import defaultdict

from common import publish, run_meta

MARK_BEGIN, MARK_END = "<!-- decode_profile:begin -->", "<!-- decode_profile:end -->"
GROUPS = {  # operator name -> group; the rest is "other operators"
    "aten::_weight_int4pack_mm_for_cpu": "int4 kernel (layers)",
    "aten::_weight_int8pack_mm": "int8 kernel (head)",
    "aten::mm": "float matmul (fp32 head)",
    "aten::addmm": "float matmul (fp32 head)",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "attention",
    "aten::copy_": "dtype casts and copies",
    "aten::_to_copy": "dtype casts and copies",
    "aten::isin": "generation bookkeeping (stop checks, positions, masks)",
    "aten::arange": "generation bookkeeping (stop checks, positions, masks)",
    "aten::where": "generation bookkeeping (stop checks, positions, masks)",
    "aten::fill_": "generation bookkeeping (stop checks, positions, masks)",
    "aten::cat": "KV cache append",
}


def profile(args) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile as torch_profile
    from transformers import AutoModelForCausalLM

    import optimum_agentos  # noqa: F401
    from optimum_agentos import AgentOSConfig
    from optimum_agentos.models import resolve_model

    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(
        resolve_model("smollm2-135m"), quantization_config=AgentOSConfig(bits=4, group_size=128, method="rtn")).eval()
    prompt = torch.arange(100, 116).view(1, -1)
    kwargs = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
    with torch.no_grad():
        model.generate(prompt, **kwargs)
        start = time.perf_counter()
        model.generate(prompt, **kwargs)
        plain_s = time.perf_counter() - start
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            model.generate(prompt, **kwargs)
            profiled_s = time.perf_counter() - start
    groups = defaultdict(float)
    for event in prof.key_averages():
        groups[GROUPS.get(event.key, "other operators")] += event.self_cpu_time_total / 1e6
    operators_s = sum(groups.values())
    groups["no operator (Python: modules, generate loop, dispatch)"] = max(profiled_s - operators_s, 0.0)
    per_token = {k: v / args.new_tokens * 1e3 for k, v in sorted(groups.items(), key=lambda kv: -kv[1])}
    layer_us = layer_overhead()
    return {"plain_ms_per_token": plain_s / args.new_tokens * 1e3,
            "profiled_ms_per_token": profiled_s / args.new_tokens * 1e3, "ms_per_token": per_token, **layer_us}


def layer_overhead() -> dict:
    """One int4 576->192 layer call, the bare kernel, and the kernel with its input/output casts (microseconds)."""
    import torch

    from optimum_agentos import QuantLinear
    from optimum_agentos.nn.prepare import prepare_kernels

    torch.set_num_threads(1)
    layer = QuantLinear.from_float(torch.randn(192, 576) * 0.05, None, 4, 128, sym=False)
    prepare_kernels(layer, policy="int4pack-bf16")
    x = torch.randn(1, 1, 576)
    xb = x.view(1, 576).bfloat16()
    op = torch.ops.aten._weight_int4pack_mm_for_cpu

    def best(call):
        return min(timeit.repeat(call, number=1000, repeat=5)) / 1000 * 1e6

    with torch.no_grad():
        return {
            "layer_us": best(lambda: layer(x)),
            "kernel_us": best(lambda: op(xb, layer.kernel_weight, layer.kernel_group, layer.kernel_scales)),
            "kernel_with_casts_us": best(lambda: op(x.reshape(-1, 576).bfloat16(), layer.kernel_weight,
                                                    layer.kernel_group, layer.kernel_scales).float().view(1, 1, 192)),
        }


def write_markdown(result: dict, meta: dict) -> str:
    args = meta["args"]
    lines = [MARK_BEGIN, "## Where int4 decode time goes: SmolLM2-135M-Instruct", "",
             f"Written by `python benchmarks/decode_profile.py --threads {args['threads']} --new-tokens "
             f"{args['new_tokens']}` on {meta['date']}, {meta['cpu_count']} CPU cores. int4 g128 RTN, quantized on "
             "load; greedy generation after a 16-token prompt, profiled with torch.profiler (operators' own CPU time "
             f"per generated token; the profiler slows the step from {result['plain_ms_per_token']:.1f} to "
             f"{result['profiled_ms_per_token']:.1f} ms).", "", "| where | ms per token | share |", "|---|---:|---:|"]
    total = sum(result["ms_per_token"].values())
    for name, ms in result["ms_per_token"].items():
        lines.append(f"| {name} | {ms:.2f} | {ms / total:.0%} |")
    lines += ["", f"One int4 576->192 layer call (1 token, 1 thread, best of 5 x 1000): `QuantLinear` "
              f"{result['layer_us']:.1f} us, the bare kernel {result['kernel_us']:.1f} us, the kernel with the "
              f"bf16 input and float32 output casts {result['kernel_with_casts_us']:.1f} us.", MARK_END]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    result = profile(args)
    meta = run_meta(args, ["threads", "new_tokens"])
    publish("decode_profile", [result], write_markdown(result, meta), MARK_BEGIN, MARK_END, meta)


if __name__ == "__main__":
    main()
