"""Load time of agentos checkpoints with and without the kernel-choice cache (`optimum_agentos/nn/dispatch.py`).

At the first load on a machine, each distinct layer shape times its candidate kernel paths and the fastest is
cached under the Hugging Face cache directory; later loads read the choice. This script measures both against
the float32 load: every load is a fresh process (imports excluded, `from_pretrained` timed), `cold` with an empty
cache folder, `warm` with the folder the cold load filled; medians of `--repeats`.

    python benchmarks/load_time.py
    python benchmarks/load_time.py --render-only
    python benchmarks/load_time.py --name load_time-epyc         # another CPU's own section
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import cpu_description, load_for_render, markers, publish, run_meta

NAME = "load_time"
CHECKPOINTS = ("agentos-int8", "agentos-int4-g128", "agentos-int4-g128-e8")  # built as speed.py builds them
# `forced`: the load with no choice to make (`OPTIMUM_AGENTOS_KERNELS=<path>`: no timing, no cache), as loads were
# before the measured dispatch; the repacking into the kernel's layout is the same
FORCED = {"agentos-int8": "int8rows-bf16", "agentos-int4-g128": "int4pack-bf16", "agentos-int4-g128-e8": "int4pack-bf16"}


def child(row: str, work: Path) -> float:
    """In a fresh process: seconds for speed.py's `load` of `row` (imports done before the clock starts)."""
    import torch
    from speed import load

    import optimum_agentos  # noqa: F401

    torch.set_num_threads(2)
    start = time.perf_counter()
    load(row, work, threads=2)
    return time.perf_counter() - start


def timed_load(row: str, work: Path, cache: Path, kernels: str = "auto") -> float:
    env = dict(os.environ, OPTIMUM_AGENTOS_KERNEL_CACHE=str(cache), OPTIMUM_AGENTOS_KERNELS=kernels)
    out = subprocess.run([sys.executable, __file__, "--child", row, "--work", str(work)], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["seconds"]


def measure(work: Path, repeats: int) -> list[dict]:
    from tqdm.auto import tqdm

    with tempfile.TemporaryDirectory() as cache:  # fp32 has no quantized layers: the cache is never read
        results = [{"row": "fp32", "seconds": statistics.median(
            timed_load("fp32", work, Path(cache)) for _ in range(repeats))}]
    for row in tqdm(CHECKPOINTS, desc="checkpoints"):
        cold, warm, forced = [], [], []
        for _ in range(repeats):
            with tempfile.TemporaryDirectory() as cache:
                cold.append(timed_load(row, work, Path(cache)))  # empty cache: measures and writes the choices
                files = sorted(p.name for p in Path(cache).iterdir())
                warm.append(timed_load(row, work, Path(cache)))  # the same folder: reads them
                forced.append(timed_load(row, work, Path(cache), FORCED[row]))  # reads nothing, measures nothing
        results.append({"row": row, "cold_s": statistics.median(cold), "warm_s": statistics.median(warm),
                        "forced_s": statistics.median(forced), "forced_path": FORCED[row], "cold_all": cold,
                        "warm_all": warm, "forced_all": forced, "cache_files": files})
    return results


def write_markdown(results: list[dict], meta: dict) -> str:
    fp32 = next(r["seconds"] for r in results if r["row"] == "fp32")
    name = meta.get("name", NAME)
    command = "python benchmarks/load_time.py" + (f" --name {name}" if name != NAME else "")
    lines = [markers(name)[0], "## Load time and the kernel-choice cache: SmolLM2-135M-Instruct"
             + (f", {meta['cpu'].split(' (')[0]}" if name != NAME else ""), "",
             (f"Written by `{command}` on {meta['date']}, {meta['cpu_count']} CPU cores "
              f"({meta.get('cpu', 'CPU model not recorded')}). Each "
              "load is a fresh process timing `AutoModelForCausalLM.from_pretrained` (imports excluded), median of "
              f"{meta['args']['repeats']}. Checkpoints: the speed table's round-to-nearest folders. `cold`: an empty "
              "kernel cache (`OPTIMUM_AGENTOS_KERNEL_CACHE`), so each layer shape times its kernel paths; `warm`: "
              "the cache that cold load wrote. `forced`: `OPTIMUM_AGENTOS_KERNELS=<path>` (the path named), which "
              "times nothing and reads no cache: the load as it was before the measured dispatch, repacking "
              "included, so `warm - forced` is what the measured choice costs a load once cached. One path is "
              "forced for the whole model, so in `-e8` the int8 output head, which that path does not serve, stays "
              "on the reference path and skips its repacking: that row's difference is an upper bound. "
              "`fp32`: the float checkpoint, for scale."), "",
             "| row | cold load (s) | warm load (s) | forced load (s) | warm - forced (s) | warm - fp32 (s) | "
             "cold - warm (s) |",
             "|---|---:|---:|---:|---:|---:|---:|", f"| fp32 | - | {fp32:.2f} | - | - | - | - |"]
    for r in results:
        if r["row"] != "fp32":
            forced = (f"{r['forced_s']:.2f} (`{r['forced_path']}`) | {r['warm_s'] - r['forced_s']:+.2f}"
                      if "forced_s" in r else "- | -")
            lines.append(f"| {r['row']} | {r['cold_s']:.2f} | {r['warm_s']:.2f} | {forced} | "
                         f"{r['warm_s'] - fp32:+.2f} | {r['cold_s'] - r['warm_s']:.2f} |")
    lines += ["", f"Raw results: `benchmarks/results/{name}.json`.", markers(name)[1]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--name", default=NAME,
                        help="Results file and BENCHMARKS.md section (another name: another CPU's section beside "
                             "this one).")
    parser.add_argument("--render-only", action="store_true",
                        help="Rewrite the BENCHMARKS.md section from benchmarks/results/NAME.json.")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps({"seconds": child(args.child, Path(args.work))}))
        return
    if args.render_only:
        results, meta = load_for_render(args.name)
    else:
        from speed import build_checkpoints

        work = Path(args.work or Path(__file__).parent / "work" / "load_time")
        work.mkdir(parents=True, exist_ok=True)
        build_checkpoints(work, list(CHECKPOINTS))
        results = measure(work, args.repeats)
        meta = {**run_meta(args, ["repeats"]), "cpu": cpu_description(), "name": args.name}
    publish(args.name, results, write_markdown(results, meta), *markers(args.name), meta)


if __name__ == "__main__":
    main()
