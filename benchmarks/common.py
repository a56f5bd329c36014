"""Shared by the benchmark scripts: fresh-process rows, peak RSS, decode speed, and BENCHMARKS.md sections."""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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


def merge_with_saved(name: str, results: list[dict]) -> list[dict]:
    """The saved rows of benchmarks/results/NAME.json with `results` replacing the rows of the same name (rows
    rerun alone, e.g. for a timing measured on an idle machine, keep the others' place and values)."""
    path = REPO / "benchmarks" / "results" / f"{name}.json"
    saved = json.loads(path.read_text()) if path.exists() else []
    fresh = {r["row"]: r for r in results}
    merged = [fresh.pop(r["row"], r) for r in saved]
    return merged + list(fresh.values())


def publish(name: str, results: list[dict], section: str, begin: str, end: str) -> None:
    """Raw results to benchmarks/results/NAME.json, the markdown section into BENCHMARKS.md, and to stdout."""
    save_results(name, results)
    update_benchmarks_md(section, begin, end)
    print(section)
