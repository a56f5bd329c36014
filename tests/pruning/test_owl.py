"""OWL layer sparsity (`PruningConfig(allocation="owl")`): the total is kept to the weight, blocks with more
activation outliers keep more weights, the report says what each block got, the checkpoint reloads."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from optimum_agentos import Pruner, PruningConfig, SparseLinear
from optimum_agentos.pruning.masks import mask_with_count
from optimum_agentos.pruning.owl import exact_counts, owl_block_sparsity
from tests.conftest import build_tiny, model_output, sample_ids

CALIBRATION = torch.randint(2, 128, (8, 32), generator=torch.Generator().manual_seed(0))
OUTLIER_BLOCK = 3  # the last block: its outliers cannot spread into the inputs of a later one


def model_with_outliers():
    """A 4-block tiny Llama whose last block has 3% of its weights blown up 40x: many |W| x ||X|| outliers there."""
    model = build_tiny("llama", num_hidden_layers=4)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for module in model.model.layers[OUTLIER_BLOCK].modules():
            if isinstance(module, torch.nn.Linear):
                picked = torch.rand(module.weight.shape, generator=g) < 0.03
                module.weight[picked] *= 40
    return model


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_owl_keeps_the_total_exactly_and_spares_the_outlier_block(method, tmp_path):
    pruner = Pruner(model_with_outliers())
    config = PruningConfig(method=method, sparsity=0.5, allocation="owl")
    model = pruner.prune(tmp_path / "owl", config, CALIBRATION)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, SparseLinear)}
    total = sum(m.in_features * m.out_features for m in layers.values())
    zeros = sum(m.in_features * m.out_features - m.nnz for m in layers.values())
    assert zeros == round(0.5 * total)  # exactly, counting weights
    per_block = {}
    for name, m in layers.items():
        block = int(name.split(".")[2])
        z, n = per_block.get(block, (0, 0))
        per_block[block] = (z + m.in_features * m.out_features - m.nnz, n + m.in_features * m.out_features)
    sparsity = {b: z / n for b, (z, n) in per_block.items()}
    assert min(sparsity, key=sparsity.get) == OUTLIER_BLOCK
    assert sparsity[OUTLIER_BLOCK] == pytest.approx(0.5 - 0.08, abs=2e-3)  # the most outliers: target - lambda
    assert all(0.5 - 0.08 - 2e-3 <= s <= 0.5 + 0.08 + 2e-3 for s in sparsity.values())
    blocks = pruner.report["owl_blocks"]
    assert max(range(4), key=lambda b: blocks[b]["outlier_ratio"]) == OUTLIER_BLOCK
    assert [round(b["sparsity"], 3) for b in blocks] == [round(sparsity[b], 3) for b in range(4)]
    ids = sample_ids()
    assert torch.equal(model_output(AutoModelForCausalLM.from_pretrained(tmp_path / "owl"), ids),
                       model_output(model, ids))
    stored = AutoModelForCausalLM.from_pretrained(tmp_path / "owl").config.quantization_config.pruning
    assert stored["allocation"] == "owl" and stored["owl_lambda"] == 0.08


def test_owl_block_sparsity_and_exact_counts():
    s = owl_block_sparsity([0.01, 0.02, 0.03], [10, 10, 10], 0.5, 0.08)
    assert s == pytest.approx([0.58, 0.5, 0.42])
    uneven = owl_block_sparsity([0.0, 0.0, 1.0], [100, 100, 100], 0.5, 0.08)  # one outlier block: bounded by lambda
    assert min(uneven) == pytest.approx(0.42) and sum(uneven) == pytest.approx(1.5)
    counts = exact_counts({"a": 7, "b": 7, "c": 7}, {"a": 0.3, "b": 0.3, "c": 0.9}, 0.5)
    assert sum(counts.values()) == round(0.5 * 21) and counts["c"] >= 6
    mask = mask_with_count(torch.rand(5, 8, generator=torch.Generator().manual_seed(1)), 13)
    assert int(mask.sum()) == 13 and set(mask.sum(1).tolist()) == {2, 3}


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="magnitude", allocation="owl"), "allocation='owl' .* needs method='wanda' or 'sparsegpt'"),
    (dict(method="wanda", pattern="2:4", allocation="owl"), "unstructured"),
    (dict(method="wanda", allocation="owl", owl_lambda=0.6), r"owl_lambda=0.6 must be in \[0, 0.5\]"),
    (dict(method="wanda", allocation="owl", owl_threshold=0), "owl_threshold=0 must be > 0"),
    (dict(method="wanda", allocation="owls"), "allocation='owls' is not supported"),
])
def test_bad_owl_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PruningConfig(**kwargs)
