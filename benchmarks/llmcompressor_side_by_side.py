"""llm-compressor's SparseGPT / Wanda on the same model, data and eval, for the side-by-side rows of
`benchmarks/pruning.py`. Runs in llm-compressor's own venv (it pins its own transformers), so it imports nothing from
optimum_agentos: the calibration and eval token ids come in a safetensors file written by `pruning.py`.

    python llmcompressor_side_by_side.py --model DIR --ids ids.safetensors --method sparsegpt --pattern 0:0 --out r.json
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path


def folder_size(path) -> int:
    return sum(p.stat().st_size for p in Path(path).glob("*.safetensors"))


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
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    ids = load_file(args.ids)
    calibration, evaluation = ids["calibration"], ids["eval"]
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    if args.method == "sparsegpt":
        from llmcompressor.modifiers.pruning import SparseGPTModifier as Modifier
    else:
        from llmcompressor.modifiers.pruning import WandaPruningModifier as Modifier
    recipe = Modifier(sparsity=0.5, mask_structure=args.pattern, targets=["Linear"], ignore=["lm_head"])
    data = Dataset.from_dict({"input_ids": calibration.tolist(), "attention_mask": torch.ones_like(calibration).tolist()})
    start = time.perf_counter()
    oneshot(model=model, dataset=data, recipe=recipe, num_calibration_samples=calibration.shape[0],
            max_seq_length=calibration.shape[1])
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        size = folder_size(tmp)
    model.eval()
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for window in evaluation:
            logits = model(window.unsqueeze(0), use_cache=False).logits[0, :-1].float()
            nll += torch.nn.functional.cross_entropy(logits, window[1:], reduction="sum").item()
            tokens += window.numel() - 1
    result = {"prune_s": seconds, "peak_rss_mb": peak, "size_mb": size / 1e6, "ppl": float(torch.exp(torch.tensor(nll / tokens)))}
    Path(args.out).write_text(json.dumps(result))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
