"""Where a decode step of SmolLM2-135M-Instruct spends its time, per row (fp32, int8, int4 g128, int4 g128 e8):
`generate` against a bare loop of forwards (the generation loop's own cost), then torch.profiler over the bare loop,
the operators' own CPU time grouped by what they do, and the time no operator accounts for (Python: transformers'
modules, our layers' dispatch).

    python benchmarks/decode_profile.py --threads 2 --new-tokens 32
    python benchmarks/decode_profile.py --rows agentos-int8 --no-publish     # a development check
    python benchmarks/decode_profile.py --name decode_profile-xeon           # another CPU's own section

Also times one 576->192 int4 layer call against the bare kernel (the per-layer overhead of `QuantLinear.forward`).
"""

from __future__ import annotations

import argparse
import statistics
import time
import timeit
from collections import defaultdict

from common import cpu_description, markers, publish, run_meta

NAME = "decode_profile"
ROWS = {  # row -> AgentOSConfig kwargs (None: the float32 model)
    "fp32": None,
    "agentos-int8": dict(bits=8, group_size=-1, method="rtn"),
    "agentos-int4-g128": dict(bits=4, group_size=128, method="rtn"),
    "agentos-int4-g128-e8": dict(bits=4, group_size=128, method="rtn", embedding_bits=8),
}
LAYER_KERNELS = "quantized layer kernels"
HEAD = "output head (49152 x 576)"
GROUPS = {  # operator name -> group; float matmuls are split by shape (the head's has 49152 outputs)
    "aten::_weight_int4pack_mm_for_cpu": LAYER_KERNELS,
    "aten::_weight_int8pack_mm": LAYER_KERNELS,
    "agentos_native::int8_rows_matmul": LAYER_KERNELS,  # with `embedding_bits=8`, the int8 head's calls too
    "agentos_native::int4_blocks_matmul": LAYER_KERNELS,
    "agentos_native::int8_rows_act_matmul": LAYER_KERNELS,  # the prompt's forward, where it measured fastest
    "agentos_native::int4_blocks_act_matmul": LAYER_KERNELS,
    "agentos_native::int4_blocks_vnni_matmul": LAYER_KERNELS,
    "agentos_native::bf16_rows_matmul": HEAD,  # a float head's bf16 copy, where it measured fastest
    "aten::mm": "float matmuls (layers)",
    "aten::addmm": "float matmuls (layers)",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "attention",
    "aten::copy_": "dtype casts and copies",
    "aten::_to_copy": "dtype casts and copies",
    "aten::cat": "KV cache append",
    "aten::index_copy_": "KV cache append",
    "aten::mul": "norms, rotary, activation (element-wise)",
    "aten::add": "norms, rotary, activation (element-wise)",
    "aten::pow": "norms, rotary, activation (element-wise)",
    "aten::mean": "norms, rotary, activation (element-wise)",
    "aten::rsqrt": "norms, rotary, activation (element-wise)",
    "aten::silu": "norms, rotary, activation (element-wise)",
    "aten::neg": "norms, rotary, activation (element-wise)",
}


def load(row: str):
    import torch
    from transformers import AutoModelForCausalLM

    import optimum_agentos  # noqa: F401
    from optimum_agentos import AgentOSConfig
    from optimum_agentos.models import resolve_model

    kwargs = ROWS[row]
    if kwargs is None:
        return AutoModelForCausalLM.from_pretrained(resolve_model("smollm2-135m"), dtype=torch.float32).eval()
    return AutoModelForCausalLM.from_pretrained(resolve_model("smollm2-135m"),
                                                quantization_config=AgentOSConfig(**kwargs)).eval()


def bare_loop(model, prompt, new_tokens: int):
    """Greedy decoding without `generate`: prefill, then one forward per token on a dynamic cache."""
    import torch
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    out = model(prompt, past_key_values=cache, use_cache=True, logits_to_keep=1)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    for _ in range(new_tokens - 1):
        out = model(token, past_key_values=out.past_key_values, use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
    return token


def _group(event) -> str:
    group = GROUPS.get(event.key, "other operators")
    if event.key in ("aten::mm", "aten::addmm", "aten::_weight_int8pack_mm") and "49152" in str(event.input_shapes):
        return HEAD
    return group


def profile_row(row: str, args) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile as torch_profile

    model = load(row)
    prompt = torch.arange(100, 116).view(1, -1)
    kwargs = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
    with torch.no_grad():
        model.generate(prompt, **kwargs)
        bare_loop(model, prompt, args.new_tokens)
        gen, bare = [], []
        for _ in range(args.repeats):  # interleaved, medians
            start = time.perf_counter()
            model.generate(prompt, **kwargs)
            gen.append(time.perf_counter() - start)
            start = time.perf_counter()
            bare_loop(model, prompt, args.new_tokens)
            bare.append(time.perf_counter() - start)
        with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            start = time.perf_counter()
            bare_loop(model, prompt, args.new_tokens)
            profiled_s = time.perf_counter() - start
    groups = defaultdict(float)
    for event in prof.key_averages(group_by_input_shape=True):
        groups[_group(event)] += event.self_cpu_time_total / 1e6
    operators_s = sum(groups.values())
    groups["no operator (Python: modules, dispatch)"] = max(profiled_s - operators_s, 0.0)
    per_token = {k: v / args.new_tokens * 1e3 for k, v in sorted(groups.items(), key=lambda kv: -kv[1])}
    return {"row": row, "generate_ms_per_token": statistics.median(gen) / args.new_tokens * 1e3,
            "bare_ms_per_token": statistics.median(bare) / args.new_tokens * 1e3,
            "profiled_ms_per_token": profiled_s / args.new_tokens * 1e3, "ms_per_token": per_token}


def layer_overhead() -> dict:
    """One int4 576->192 layer call, the bare kernel, and the kernel with its input/output casts (microseconds)."""
    import torch

    from optimum_agentos import QuantLinear
    from optimum_agentos.nn.prepare import prepare_kernels

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    layer = QuantLinear.from_float(torch.randn(192, 576) * 0.05, None, 4, 128, sym=False)
    prepare_kernels(layer, policy="int4pack-bf16")
    x = torch.randn(1, 1, 576)
    xb = x.view(1, 576).bfloat16()
    op = torch.ops.aten._weight_int4pack_mm_for_cpu

    def best(call):
        return min(timeit.repeat(call, number=1000, repeat=5)) / 1000 * 1e6

    with torch.no_grad():
        result = {
            "layer_us": best(lambda: layer(x)),
            "kernel_us": best(lambda: op(xb, layer.kernel_weight, layer.kernel_group, layer.kernel_scales)),
            "kernel_with_casts_us": best(lambda: op(x.reshape(-1, 576).bfloat16(), layer.kernel_weight,
                                                    layer.kernel_group, layer.kernel_scales).float().view(1, 1, 192)),
        }
    torch.set_num_threads(threads)
    return result


def write_markdown(results: list[dict], layer_us: dict, meta: dict) -> str:
    args, name = meta["args"], meta.get("name", NAME)
    title = "## Where decode time goes: SmolLM2-135M-Instruct" + (f", {meta['cpu']}" if name != NAME else "")
    lines = [markers(name)[0], title, "",
             f"Written by `python benchmarks/decode_profile.py --threads {args['threads']} --new-tokens "
             f"{args['new_tokens']}{f' --name {name}' if name != NAME else ''}` on {meta['date']}, "
             f"{meta.get('cpu', 'CPU not recorded')}, {meta['cpu_count']} CPU cores. RTN checkpoints quantized on "
             "load (the speed table's rows); greedy decoding after a 16-token prompt. `generate` and a bare loop of "
             "forwards on a dynamic cache (argmax per step, no logits processors or stop checks) are timed "
             f"interleaved ({args['repeats']} repeats, medians); then the bare loop is profiled with torch.profiler: "
             "the operators' own CPU time per generated token (the 16-token prompt's forward included, as in the "
             "speed table's decode), grouped, and the time no operator accounts for "
             "(Python). The profiler itself slows each step (`profiled` row).", ""]
    groups = []
    for r in results:
        groups += [g for g in r["ms_per_token"] if g not in groups]
    lines += ["| ms per token | " + " | ".join(r["row"] for r in results) + " |",
              "|---|" + "---:|" * len(results)]
    lines.append("| `generate` | " + " | ".join(f"{r['generate_ms_per_token']:.1f}" for r in results) + " |")
    lines.append("| bare forward loop | " + " | ".join(f"{r['bare_ms_per_token']:.1f}" for r in results) + " |")
    lines.append("| bare loop, profiled | " + " | ".join(f"{r['profiled_ms_per_token']:.1f}" for r in results) + " |")
    for group in groups:  # not `name`: that is the section's, used below
        lines.append(f"| - {group} | " + " | ".join(f"{r['ms_per_token'].get(group, 0.0):.2f}" for r in results)
                     + " |")
    if layer_us:
        lines += ["", f"One int4 576->192 layer call (1 token, 1 thread, best of 5 x 1000): `QuantLinear` "
                  f"{layer_us['layer_us']:.1f} us, the bare kernel {layer_us['kernel_us']:.1f} us, the kernel with "
                  f"the bf16 input and float32 output casts {layer_us['kernel_with_casts_us']:.1f} us."]
    lines += ["", f"Raw results: `benchmarks/results/{name}.json`.", markers(name)[1]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--no-publish", action="store_true", help="Print the table; write no results.")
    parser.add_argument("--name", default=NAME,
                        help="Results file and BENCHMARKS.md section (another name: another CPU's section beside "
                             "the main one).")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    results = [profile_row(row, args) for row in args.rows]
    layer_us = layer_overhead()
    meta = {**run_meta(args, ["threads", "new_tokens", "repeats"]), "cpu": cpu_description(), "name": args.name}
    if args.no_publish:
        print(write_markdown(results, layer_us, meta))
        return
    publish(args.name, results + [{"row": "layer-overhead", **layer_us}],
            write_markdown(results, layer_us, meta), *markers(args.name), meta)


if __name__ == "__main__":
    main()
