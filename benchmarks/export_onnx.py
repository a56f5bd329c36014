"""ONNX export of SmolLM2-135M-Instruct (`optimum_agentos.export.onnx.write_onnx`): how close ONNX Runtime's logits
and perplexity are to ours, and its prefill / decode speed beside fp32 torch in the same process.

Rows: the fp32 model and round-to-nearest int4 (group 128) and int8 (one scale per row) models, quantized in
memory and exported; the quantized graphs run with `MatMulNBits` at accuracy_level 0 (float32 compute: the exact
export) and 4 (ONNX Runtime quantizes the activations to int8 per block: faster, not exact), the same files with
that one attribute changed. "Ours" for accuracy is the reference path (dequantize, float32 matmul); for speed the
same models with the CPU kernels they load with (`prepare_kernels`), as in benchmarks/speed.py.

    python benchmarks/export_onnx.py                  # about 10 minutes on 2 shared cores
    python benchmarks/export_onnx.py --render-only    # BENCHMARKS.md section from benchmarks/results/export_onnx.json

`onnx_runner(folder, threads)` gives the prefill and decode callables of an exported folder, for other scripts
(e.g. benchmarks/speed.py) to time ONNX Runtime the same way.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from common import load_for_render, publish, run_meta

MARK_BEGIN, MARK_END = "<!-- export-onnx:begin -->", "<!-- export-onnx:end -->"
ROWS = {"fp32": None, "int4-g128": dict(bits=4, group_size=128), "int8": dict(bits=8, group_size=-1)}
FAST_LEVEL = 4  # MatMulNBits accuracy_level with int8 activations


class OnnxRunner:
    """An exported folder in ONNX Runtime (CPU, `threads` intra-op threads): prefill logits and greedy decode with
    the graph's KV cache (`present.*` outputs fed back as `past_key_values.*`)."""

    def __init__(self, folder, threads: int, graph: str = "model.onnx"):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(Path(folder) / graph), options, providers=["CPUExecutionProvider"])
        decoder = json.loads((Path(folder) / "genai_config.json").read_text())["model"]["decoder"]
        self.empty = np.zeros([1, decoder["num_key_value_heads"], 0, decoder["head_size"]], np.float32)
        self.past_names = [i.name for i in self.session.get_inputs() if i.name.startswith("past")]
        self.outputs = [o.name for o in self.session.get_outputs()]

    def step(self, ids: np.ndarray, past: dict | None, length: int) -> tuple[np.ndarray, dict]:
        feeds = {"input_ids": ids, "attention_mask": np.ones((1, length), np.int64),
                 **(past or {name: self.empty for name in self.past_names})}
        result = dict(zip(self.outputs, self.session.run(self.outputs, feeds)))
        past = {n.replace("present", "past_key_values"): v for n, v in result.items() if n.startswith("present")}
        return result["logits"], past

    def prefill(self, ids) -> np.ndarray:
        """Logits `[1, S, vocab]` of token ids `[1, S]` from an empty cache."""
        ids = np.asarray(ids, dtype=np.int64)
        return self.step(ids, None, ids.shape[1])[0]

    def generate(self, prompt, new_tokens: int) -> list[int]:
        """Exactly `new_tokens` greedy tokens after `prompt` (`[1, P]`), batch 1."""
        ids = np.asarray(prompt, dtype=np.int64)
        logits, past = self.step(ids, None, ids.shape[1])
        tokens, length = [], ids.shape[1]
        for _ in range(new_tokens):
            token = int(logits[0, -1].argmax())
            tokens.append(token)
            length += 1
            logits, past = self.step(np.array([[token]], dtype=np.int64), past, length)
        return tokens


def onnx_runner(folder, threads: int, graph: str = "model.onnx"):
    """`(prefill(ids [1, S]) -> logits, decode(prompt [1, P], new_tokens) -> tokens)` of an exported folder."""
    runner = OnnxRunner(folder, threads, graph)
    return runner.prefill, runner.generate


def with_accuracy_level(folder: Path, level: int) -> str:
    """A second graph file next to `model.onnx` whose `MatMulNBits` nodes use `level` (same weight file)."""
    import onnx

    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    for node in model.graph.node:
        for attr in node.attribute:
            if node.op_type == "MatMulNBits" and attr.name == "accuracy_level":
                attr.i = level
    name = f"model.level{level}.onnx"
    onnx.save(model, str(folder / name))
    return name


class AsCausalLM:
    """An `OnnxRunner` seen as a causal LM by `perplexity_from_ids` (calls return `.logits`)."""

    training = False

    def __init__(self, runner: OnnxRunner):
        self.runner = runner

    def __call__(self, input_ids, **_):
        import torch

        return SimpleNamespace(logits=torch.from_numpy(self.runner.prefill(input_ids.numpy())))

    def eval(self):
        return self

    def train(self, mode: bool = True):
        return self

    def parameters(self):
        return iter(())


def relative_error(found: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(found - expected).max() / np.abs(expected).max())


def run(args) -> list[dict]:
    import torch

    from optimum_agentos import Quantizer
    from optimum_agentos.data import load_text, tokenize_text
    from optimum_agentos.evaluation.perplexity import perplexity_from_ids

    torch.set_num_threads(args.threads)
    base = Quantizer.from_pretrained("smollm2-135m")
    ids = tokenize_text(base.tokenizer, load_text("wikitext2", "test"))
    window = ids[: args.prefill_tokens].unsqueeze(0)
    ppl = lambda model: perplexity_from_ids(model, ids, 512, args.ppl_windows, show_progress=False)
    rows, torch_models, runners = [], {"torch fp32": base.model.eval()}, {}
    with tempfile.TemporaryDirectory(prefix="export-onnx-") as work:  # sessions keep their weights in memory
        for row, kwargs in ROWS.items():
            export_row(Path(work), row, kwargs, base, window, ppl, rows, torch_models, runners, args)
    speed = time_all(torch_models, runners, window, args)
    return [{**r, **speed[r["row"]]} for r in rows] + [
        {"row": name, **speed[name]} for name in torch_models]


def export_row(work: Path, row: str, kwargs, base, window, ppl, rows: list, torch_models: dict, runners: dict,
               args) -> None:
    """Quantize (unless fp32) and export one row; measure its logits error and perplexity at each accuracy level."""
    import torch

    from optimum_agentos import AgentOSConfig, Quantizer
    from optimum_agentos.export.onnx import write_onnx
    from optimum_agentos.nn.prepare import prepare_kernels

    tokenizer = base.tokenizer
    model = base.model if kwargs is None else Quantizer(copy.deepcopy(base.model)).quantize_in_place(
        AgentOSConfig(**kwargs))
    prepare_kernels(model, policy="reference")
    (work / row).mkdir()
    start = time.perf_counter()
    summary = write_onnx(model, tokenizer, work / row)
    export_s = time.perf_counter() - start
    with torch.no_grad():
        ours = model(input_ids=window).logits.numpy()
    ours_ppl = ppl(model)
    levels = [0] if kwargs is None else [0, FAST_LEVEL]
    for level in levels:
        graph = "model.onnx" if level == 0 else with_accuracy_level(work / row, level)
        runner = OnnxRunner(work / row, args.threads, graph)
        name = f"onnxruntime {row}" + (f" (accuracy_level {level})" if kwargs is not None else "")
        runners[name] = runner
        rows.append({
            "row": name, "export": row, "accuracy_level": level, "export_s": export_s,
            "size_mb": (work / row / "model.onnx.data").stat().st_size / 1e6,
            "ops": summary["ops"], "matmul_nbits": summary["matmul_nbits"],
            "logits_rel_err": relative_error(runner.prefill(window.numpy()), ours),
            "ppl": ppl(AsCausalLM(runner)), "ours_ppl": ours_ppl,
        })
        print(json.dumps(rows[-1]), flush=True)
    if kwargs is not None:
        prepare_kernels(model)  # our speed: the kernels the checkpoint loads with
        torch_models[f"torch agentos {row}"] = model


def time_all(torch_models: dict, runners: dict, window, args) -> dict:
    """Prefill (one forward of the window) and decode (`new_tokens` greedy tokens after 16) of every model,
    round-robin, `repeats` times after a warm-up; medians in tokens per second."""
    import torch

    prompt = window[:, :16]
    decode = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
    calls = {name: (functools.partial(model, window, use_cache=False),
                    functools.partial(model.generate, prompt, **decode)) for name, model in torch_models.items()}
    calls.update({name: (functools.partial(runner.prefill, window.numpy()),
                         functools.partial(runner.generate, prompt.numpy(), args.new_tokens))
                  for name, runner in runners.items()})
    times = {name: {"prefill": [], "decode": []} for name in calls}
    with torch.no_grad():
        for prefill, decode in calls.values():
            prefill(), decode()
        for _ in range(args.repeats):
            for name, (prefill, decode) in calls.items():
                for part, call in (("prefill", prefill), ("decode", decode)):
                    start = time.perf_counter()
                    call()
                    times[name][part].append(time.perf_counter() - start)
    return {name: {"prefill_tok_s": window.shape[1] / statistics.median(t["prefill"]),
                   "decode_tok_s": args.new_tokens / statistics.median(t["decode"])} for name, t in times.items()}


def write_markdown(results: list[dict], meta: dict) -> str:
    args = meta["args"]
    fp32 = next(r for r in results if r["row"] == "torch fp32")
    lines = [
        MARK_BEGIN,
        "## ONNX export: SmolLM2-135M-Instruct in ONNX Runtime",
        "",
        f"Written by `python benchmarks/export_onnx.py` on {meta['date']}, {meta['cpu_count']} CPU cores, torch and "
        f"ONNX Runtime {meta.get('onnxruntime', '')} on {args['threads']} thread(s) each (CPU execution provider). "
        "Models quantized in memory with round to nearest (int4: group 128, asymmetric; int8: one scale per row, "
        "asymmetric), exported with `write_onnx` (onnxruntime-genai's model builder, then `MatMulNBits` from our "
        "codes). accuracy_level 0: `MatMulNBits` multiplies in float32 (the exact export); 4: ONNX Runtime "
        "quantizes the activations to int8 per block (same files, one attribute changed). Logits error: the "
        f"largest difference over the first {args['prefill_tokens']}-token WikiText-2 window, divided by the "
        "largest |logit| of ours (reference path: dequantize, float32 matmul). Perplexity: WikiText-2 raw test, "
        f"first {args['ppl_windows']} windows of 512 tokens, no BOS (`ours` on the same windows). Prefill: one "
        f"forward of {args['prefill_tokens']} tokens; decode: {args['new_tokens']} greedy tokens after a 16-token "
        "prompt, batch 1, KV cache (ONNX Runtime: the graph's present/past tensors fed back in a Python loop; "
        "torch: `generate`); all models timed round-robin in one process, "
        f"{args['repeats']} repeats, medians, on a machine shared with other jobs: read the ratios to fp32 torch "
        "measured beside them, not the absolute rates. `torch agentos` rows: the same quantized models with the "
        "CPU kernels they load with. Weights: the size of `model.onnx.data`; the graph computes in float32, so "
        "the float tied embedding / head of these models is stored as 49152 x 576 float32 (113 MB) beside the "
        "`MatMulNBits` codes (with `embedding_bits=8` it becomes an int8 `MatMulNBits` head that "
        "`GatherBlockQuantized` also reads the embedding rows from; not measured here).",
        "",
        "| runtime / model | logits rel. error vs ours | ppl | ours ppl | prefill tok/s | prefill / fp32 torch | "
        "decode tok/s | decode / fp32 torch | weights (MB) | export (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        quality = (f"{r['logits_rel_err']:.1e} | {r['ppl']:.3f} | {r['ours_ppl']:.3f}" if "ppl" in r
                   else "- | - | -")
        size = f"{r['size_mb']:.1f} | {r['export_s']:.0f}" if "size_mb" in r else "- | -"
        lines.append(
            f"| {r['row']} | {quality} | {r['prefill_tok_s']:.0f} | {r['prefill_tok_s'] / fp32['prefill_tok_s']:.2f} "
            f"| {r['decode_tok_s']:.1f} | {r['decode_tok_s'] / fp32['decode_tok_s']:.2f} | {size} |")
    lines += ["", "Raw results: `benchmarks/results/export_onnx.json`.", MARK_END]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ppl-windows", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--render-only", action="store_true",
                        help="Rewrite the BENCHMARKS.md section from benchmarks/results/export_onnx.json.")
    args = parser.parse_args()
    if args.render_only:
        results, meta = load_for_render("export_onnx")
    else:
        import onnxruntime

        results = run(args)
        meta = {**run_meta(args, ["ppl_windows", "repeats", "threads", "new_tokens", "prefill_tokens"]),
                "onnxruntime": onnxruntime.__version__}
    publish("export_onnx", results, write_markdown(results, meta), MARK_BEGIN, MARK_END, meta)


if __name__ == "__main__":
    main()
