"""Shared by the benchmark scripts: fresh-process rows, peak RSS, decode speed, and BENCHMARKS.md sections.

Units: memory (RSS) is in MiB (2^20 bytes: Linux reports KiB, divided by 1024); sizes on disk are in MB (10^6
bytes). Every script saves its rows to benchmarks/results/NAME.json and the run's date, core count and options to
benchmarks/results/NAME.meta.json, so `--render-only` rewrites its BENCHMARKS.md section without running again."""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


peak_rss_mb = peak_rss_mib  # old name (benchmarks/pruning.py): the value is, and always was, in MiB


def decode_tokens_per_s(model, tokenizer, new_tokens=64, repeats=3) -> float:
    """Greedy decode speed, batch 1, median of `repeats`."""
    import torch

    prompt = tokenizer("The history of the city begins", return_tensors="pt")
    speeds = []
    for _ in range(repeats):
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        speeds.append((out.shape[1] - prompt.input_ids.shape[1]) / (time.perf_counter() - start))
    return statistics.median(speeds)


def run_rows(script: str, rows: list[str], passthrough: list[str]) -> list[dict]:
    """Run each row as `script --worker ROW` in its own process, one after the other; collect their JSON."""
    results = []
    for row in rows:
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            print(f"== {row}", flush=True)
            subprocess.run([sys.executable, script, "--worker", row, "--out", out.name, *passthrough], check=True)
            results.append(json.loads(Path(out.name).read_text()))
            print(json.dumps(results[-1]), flush=True)
    return results


def save_results(name: str, results: list[dict]) -> None:
    folder = REPO / "benchmarks" / "results"
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(results, indent=2))


def update_benchmarks_md(section: str, begin: str, end: str) -> None:
    """Replace the section between the `begin`/`end` markers of BENCHMARKS.md (or append it)."""
    path = REPO / "BENCHMARKS.md"
    text = path.read_text() if path.exists() else "# Benchmarks\n\nEvery table here is written by a script in `benchmarks/`.\n"
    if begin in text:
        head, rest = text.split(begin, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    path.write_text(text)


def drop_unmarked_section(heading: str, begin: str) -> None:
    """Remove a section of BENCHMARKS.md written before its script used markers: from `heading` up to the next
    marker or `## ` heading (or the end), unless the `begin` marker is already there."""
    path = REPO / "BENCHMARKS.md"
    if not path.exists():
        return
    text = path.read_text()
    if begin in text or heading not in text:
        return
    head, rest = text.split(heading, 1)
    ends = [i for i in (rest.find("\n<!-- "), rest.find("\n## ")) if i >= 0]
    tail = rest[min(ends):] if ends else ""
    path.write_text(head.rstrip() + "\n" + (tail if tail.startswith("\n\n") else "\n" + tail.lstrip("\n")
                                            if tail else ""))


def merge_with_saved(name: str, results: list[dict]) -> list[dict]:
    """The saved rows of benchmarks/results/NAME.json with `results` replacing the rows of the same name (rows
    rerun alone, e.g. for a timing measured on an idle machine, keep the others' place and values)."""
    path = REPO / "benchmarks" / "results" / f"{name}.json"
    saved = json.loads(path.read_text()) if path.exists() else []
    fresh = {r["row"]: r for r in results}
    merged = [fresh.pop(r["row"], r) for r in saved]
    return merged + list(fresh.values())


def cpu_flags() -> str:
    """The SIMD flags of this CPU that the kernels care about (from /proc/cpuinfo)."""
    try:
        flags = next(line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags"))
    except (OSError, StopIteration):
        return "unknown"
    wanted = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "amx_bf16",
              "amx_int8", "amx_tile", "avx_vnni")
    found = [f for f in wanted if f in flags]
    return ", ".join(found) + ("" if any(f.startswith("amx") for f in found) else "; no AMX")


def cpu_description() -> str:
    """`<model name> (<flags>)`: the CPU a row was measured on, for tables whose rows come from several machines."""
    from optimum_agentos.nn.dispatch import cpu_name

    return f"{cpu_name()} ({cpu_flags()})"


def cpu_note(results: list[dict]) -> str:
    """One sentence naming the CPU of each group of rows (rows measured before CPUs were recorded say so)."""
    groups: dict[str, list[str]] = {}
    for r in results:
        groups.setdefault(r.get("cpu", "not recorded (measured before rows recorded their CPU)"), []).append(r["row"])
    if len(groups) == 1:
        return f"Every row ran on {next(iter(groups))}."
    return "Rows by CPU (times compare only within one CPU): " + "; ".join(
        f"{cpu}: {', '.join(rows)}" for cpu, rows in groups.items()) + "."


def run_meta(args, options: list[str]) -> dict:
    """What a section's text needs besides the rows: the run's date, core count and the named options."""
    return {"date": time.strftime("%Y-%m-%d"), "cpu_count": os.cpu_count(),
            "args": {name: getattr(args, name) for name in options}}


def load_for_render(name: str) -> tuple[list[dict], dict]:
    """The saved rows and run metadata of benchmarks/results/NAME(.meta).json, for `--render-only`."""
    folder = REPO / "benchmarks" / "results"
    results = json.loads((folder / f"{name}.json").read_text())
    meta_path = folder / f"{name}.meta.json"
    if not meta_path.exists():
        raise SystemExit(f"{meta_path} is missing: run the benchmark once (without --render-only) to record it.")
    return results, json.loads(meta_path.read_text())


def markers(name: str) -> tuple[str, str]:
    """The BENCHMARKS.md markers around section NAME."""
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def publish(name: str, results: list[dict], section: str, begin: str, end: str, meta: dict | None = None) -> None:
    """Raw results to benchmarks/results/NAME.json (and the run's metadata to NAME.meta.json), the markdown section
    into BENCHMARKS.md, and to stdout."""
    save_results(name, results)
    if meta is not None:
        (REPO / "benchmarks" / "results" / f"{name}.meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    update_benchmarks_md(section, begin, end)
    print(section)


def add_row_runner_arguments(parser, name: str) -> None:
    """The options every row-per-process script shares: `--render-only`, and the hidden `--worker ROW --out FILE`
    that `run_rows` passes to the child process."""
    import argparse

    parser.add_argument("--render-only", action="store_true",
                        help=f"Rewrite the BENCHMARKS.md section from benchmarks/results/{name}.json.")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)


def run_worker(args, worker) -> bool:
    """In a `--worker` child: run its row, write the row's JSON to `--out`, and say so (the caller returns)."""
    if not args.worker:
        return False
    Path(args.out).write_text(json.dumps(worker(args.worker, args)))
    return True
