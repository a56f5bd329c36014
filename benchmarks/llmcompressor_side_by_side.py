"""llm-compressor's SparseGPT / Wanda on the same model, data and eval, for the side-by-side rows of
`benchmarks/pruning.py`. Runs in llm-compressor's own venv (it pins its own transformers), so it imports nothing from
optimum_agentos: the calibration and eval token ids come in a safetensors file written by `pruning.py`, which also
creates that venv (`python benchmarks/pruning.py --llmcompressor`, see `ensure_llmcompressor_venv` there).

The peer runs the way its own examples and recipes do (`examples/quantization_2of4_sparse_w4a16/2of4_w4a16_recipe.yaml`
of llm-compressor: `targets: ["Linear"]`, `ignore: ["re:.*lm_head"]`; the modifiers' own defaults otherwise; `oneshot`
with its default pipeline, which infers the sequential pipeline over the decoder layers for these modifiers). The
model is then saved with its `save_pretrained`, reloaded with `AutoModelForCausalLM.from_pretrained` and evaluated,
as our rows are.

    python llmcompressor_side_by_side.py --model DIR --ids ids.safetensors --method sparsegpt --pattern 0:0 --out r.json
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

# Their recipes' form: every Linear except the output head. A bare "lm_head" matches nothing in llm-compressor 0.14
# (it names the head "lm_head." when the targets are Linear modules), so the head, tied to the input embedding in
# SmolLM2, got pruned too: the cause of the earlier, worse rows.
TARGETS = ["Linear"]
IGNORE = ["re:.*lm_head"]


def folder_size(path) -> int:
    return sum(p.stat().st_size for p in Path(path).glob("*.safetensors"))


def zero_fraction(modules) -> float:
    zeros = sum(int((m.weight == 0).sum()) for m in modules)
    return zeros / sum(m.weight.numel() for m in modules)


def perplexity(model, windows) -> float:
    """GPTQ protocol, as `optimum_agentos.evaluation.perplexity_from_ids`: no BOS, tokens 2..512 of each window."""
    import torch

    nll, tokens = 0.0, 0
    with torch.inference_mode():
        for window in windows:
            logits = model(input_ids=window.unsqueeze(0), use_cache=False).logits[0, :-1].float()
            nll += torch.nn.functional.cross_entropy(logits, window[1:], reduction="sum").item()
            tokens += window.numel() - 1
    return float(torch.exp(torch.tensor(nll / tokens)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--ids", required=True)
    parser.add_argument("--method", choices=["sparsegpt", "wanda"], default="sparsegpt")
    parser.add_argument("--pattern", default="0:0", help="llm-compressor mask_structure: 0:0 unstructured, 2:4 ...")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.pipelines.registry import CalibrationPipeline
    from llmcompressor.utils.pytorch.module import infer_sequential_targets
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)  # oneshot shuffles the calibration samples (order only: all 64 are used)
    ids = load_file(args.ids)
    calibration, evaluation = ids["calibration"], ids["eval"]
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype="auto")  # the folder is float32
    if args.method == "sparsegpt":
        from llmcompressor.modifiers.pruning import SparseGPTModifier as Modifier
    else:
        from llmcompressor.modifiers.pruning import WandaPruningModifier as Modifier
    modifier = Modifier(sparsity=0.5, mask_structure=args.pattern, targets=TARGETS, ignore=IGNORE)
    pipeline = type(CalibrationPipeline.from_modifiers([modifier])).__name__
    sequential_targets = infer_sequential_targets(model)  # the decoder layer class (a set in transformers 5)
    sequential_targets = [sequential_targets] if isinstance(sequential_targets, str) else sorted(sequential_targets)
    embedding = model.get_input_embeddings().weight.detach().clone()
    data = Dataset.from_dict({"input_ids": calibration.tolist(), "attention_mask": torch.ones_like(calibration).tolist()})
    oneshot_kwargs = {"num_calibration_samples": calibration.shape[0], "max_seq_length": calibration.shape[1]}
    start = time.perf_counter()
    oneshot(model=model, dataset=data, recipe=modifier, **oneshot_kwargs)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if not torch.equal(model.get_input_embeddings().weight, embedding):
        raise RuntimeError("llm-compressor changed the input embedding (tied lm_head pruned): check IGNORE")
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        size = folder_size(tmp)
        del model
        model = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    linears = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    result = {
        "prune_s": seconds, "peak_rss_mb": peak, "size_mb": size / 1e6,
        "sparsity": zero_fraction(linears), "lm_head_sparsity": zero_fraction([model.get_output_embeddings()]),
        "ppl": perplexity(model, evaluation),
        "params_after": model.num_parameters(), "measured_on": time.strftime("%Y-%m-%d"),
        "llmcompressor": {
            "versions": {p: version(p) for p in ("llmcompressor", "compressed-tensors", "transformers", "torch")},
            "modifier": type(modifier).__name__,
            "modifier_args": modifier.model_dump(include={"sparsity", "mask_structure", "targets", "ignore",
                                                           "block_size", "dampening_frac"}),
            "pipeline": pipeline, "sequential_targets": sequential_targets,
            "oneshot": {**oneshot_kwargs, "pipeline": "independent (default)", "batch_size": 1,
                        "shuffle_calibration_samples": True, "model_dtype": "float32"},
        },
    }
    Path(args.out).write_text(json.dumps(result))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
