"""Pruning the real SmolLM2-135M-Instruct through the CLI (short calibration and eval, bounds from measured values)."""

import json
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

from optimum_agentos import Pruner, PruningConfig
from optimum_agentos.evaluation import perplexity
from optimum_agentos.models import resolve_model

from ..conftest import REPO, run_python

pytestmark = pytest.mark.slow

EVAL = dict(dataset="wikitext2", split="test", seq_len=256, num_windows=4)


def test_cli_sparsegpt_is_far_better_than_magnitude_smaller_on_disk_and_reloads(tmp_path):
    source = resolve_model("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(source)
    magnitude = Pruner.from_pretrained(source).prune_in_place(PruningConfig(method="magnitude"))
    magnitude_ppl = perplexity(magnitude, tokenizer, **EVAL)
    del magnitude

    out = tmp_path / "sparse50"
    proc = subprocess.run(
        [sys.executable, "-m", "optimum_agentos.cli", "prune", "--model", "smollm2-135m", "--method", "sparsegpt",
         "--sparsity", "0.5", "--num-samples", "8", "--seq-len", "256", "--eval", "wikitext2", "--eval-windows", "4",
         "--float-dtype", "bfloat16", "--output", str(out)],
        capture_output=True, text=True, cwd=REPO, timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "agentos_summary.json").read_text())
    # 30 blocks x 7 layers, each within one element per 128-column block of 50%
    report = json.loads((out / "agentos_sparsity.json").read_text())
    assert len(report["layers"]) == 210 and abs(summary["sparsity_measured"] - 0.5) < 1e-3
    # The dense bf16 checkpoint is half the fp32 one; the embeddings (21% of the weights) stay dense.
    assert summary["size_mb"] < 0.34 * summary["baseline_size_mb"]
    sparse_ppl = summary["wikitext2_ppl_compressed"]
    assert sparse_ppl < 0.25 * magnitude_ppl and sparse_ppl < 2.5 * summary["wikitext2_ppl_baseline"], (
        summary, magnitude_ppl)
    card = (out / "README.md").read_text()
    assert "## Pruning" in card and "optimum-agentos prune --model smollm2-135m" in card and "pruned" in card

    printed = run_python(f"""
        import torch, optimum_agentos
        from transformers import AutoModelForCausalLM
        from optimum_agentos import SparseLinear
        model = AutoModelForCausalLM.from_pretrained({str(out)!r})
        layers = [m for m in model.modules() if isinstance(m, SparseLinear)]
        zeros = sum(m.in_features * m.out_features - m.nnz for m in layers)
        total = sum(m.in_features * m.out_features for m in layers)
        print(len(layers), round(zeros / total, 4))
    """)
    assert printed.split() == ["210", "0.5"]
