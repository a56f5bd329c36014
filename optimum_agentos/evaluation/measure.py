"""Footprint of a model: parameters, non-zero parameters, size on disk, and (in a fresh process) load time, prefill
and decode speed and peak memory.

Speed and memory are measured in a child process per checkpoint folder, so one model's allocations and warm caches
do not colour another's numbers: `python -m optimum_agentos.evaluation.measure FOLDER --auto-class ...` prints one
JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch


def count_parameters(model) -> tuple[int, int]:
    """`(parameters, non-zero parameters)` of the model as it computes: quantized and sparse layers are counted by
    their logical `[out, in]` weight, not by their packed storage."""
    from ..nn import QuantLinear, SparseLinear

    total = nonzero = 0
    seen = set()
    for module in model.modules():
        if isinstance(module, (QuantLinear, SparseLinear)):
            weight = module.dequantize()
            total += weight.numel() + (module.bias.numel() if module.bias is not None else 0)
            bias = module.bias if module.bias is not None else weight.new_zeros(0)
            nonzero += int(weight.count_nonzero()) + int(bias.count_nonzero())
            seen.update(id(p) for p in module.parameters())
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        total += param.numel()
        nonzero += int(param.count_nonzero())
    return total, nonzero


def status_mb(field: str = "VmRSS") -> float:
    """A memory field of /proc/self/status in MiB (KiB / 1024; VmRSS: resident now; VmHWM: peak resident of this process image).

    VmHWM, not `ru_maxrss`: Linux carries ru_maxrss over `exec`, so a child would report its parent's peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_here(folder: str, auto_class: str, prefill_tokens: int = 256, new_tokens: int = 32,
                 repeats: int = 3) -> dict:
    """Load `folder` with `transformers.<auto_class>` in this process and time it (what the child process runs)."""
    import transformers

    import optimum_agentos  # noqa: F401  (registers the agentos quantizer)

    before = status_mb()
    start = time.perf_counter()
    model = getattr(transformers, auto_class).from_pretrained(folder).eval()
    load_seconds = time.perf_counter() - start
    vocab = model.config.vocab_size
    ids = (torch.arange(prefill_tokens) * 7919 % (vocab - 1) + 1).unsqueeze(0)
    stats = {"load_seconds": load_seconds}
    with torch.no_grad():
        model(ids[:, :16])  # warm-up
        stats["prefill_tokens_per_s"] = prefill_tokens / _timed(lambda: model(ids, use_cache=False), repeats)
        if auto_class == "AutoModelForCausalLM":
            prompt = ids[:, :16]
            kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                          pad_token_id=model.config.eos_token_id)
            model.generate(prompt, **{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2})
            stats["decode_tokens_per_s"] = new_tokens / _timed(lambda: model.generate(prompt, **kwargs), repeats)
    stats["peak_rss_mb"] = status_mb("VmHWM")
    stats["model_rss_mb"] = status_mb() - before
    return stats


def measure_in_subprocess(folder: str | Path, auto_class: str, prefill_tokens: int = 256, new_tokens: int = 32,
                          repeats: int = 3, timeout: float = 1800) -> dict:
    """`measure_here` in a fresh Python process; raises with the child's stderr when it fails."""
    cmd = [sys.executable, "-m", "optimum_agentos.evaluation.measure", str(folder), "--auto-class", auto_class,
           "--prefill-tokens", str(prefill_tokens), "--new-tokens", str(new_tokens), "--repeats", str(repeats)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"Measuring {folder} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Load time, speed and peak memory of one checkpoint folder.")
    parser.add_argument("folder")
    parser.add_argument("--auto-class", default="AutoModelForCausalLM")
    parser.add_argument("--prefill-tokens", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    print(json.dumps(measure_here(args.folder, args.auto_class, args.prefill_tokens, args.new_tokens, args.repeats)))


if __name__ == "__main__":
    main()
