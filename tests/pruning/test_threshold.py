"""Pruning by an importance threshold (`PruningConfig(threshold=...)`) for magnitude and Wanda: exact masks against
hand-computed and independently computed references, per layer and global, the report and card, and thresholds
that remove nothing or everything (a clear error, nothing written)."""

import json

import pytest
import torch

from optimum_agentos import Pruner, PruningConfig
from optimum_agentos.pruning.masks import column_scores, threshold_mask
from tests.conftest import build_tiny


CALIBRATION = torch.randint(2, 128, (16, 32), generator=torch.Generator().manual_seed(0))
# A small layer whose masks are computed by hand below: |W| sums to 2.15 over 8 entries, mean 0.26875.
W = torch.tensor([[0.1, -0.5, 0.2, 0.0], [-0.3, 0.4, -0.05, 0.6]])


def test_threshold_masks_by_hand():
    absolute = threshold_mask(W.abs(), 0.45, "global")  # |w| < 0.45
    assert absolute.tolist() == [[True, False, True, True], [True, True, True, False]]
    relative = threshold_mask(W.abs(), 1.0, "layer")  # |w| < 1.0 x 0.26875
    assert relative.tolist() == [[True, False, True, True], [False, False, True, False]]
    # the column criterion: importance of input j = sum over outputs |W[:, j]|, optionally x RMS(x_j)
    assert torch.allclose(column_scores(W), torch.tensor([0.4, 0.9, 0.25, 0.6]))
    calibrated = column_scores(W, torch.tensor([4.0, 1.0, 0.0, 0.25]))  # RMS 2, 1, 0, 0.5
    assert torch.allclose(calibrated, torch.tensor([0.8, 0.9, 0.0, 0.3]))


def test_a_threshold_that_removes_a_whole_layer_names_the_range():
    with pytest.raises(ValueError, match=r"threshold=0.7 removes all of proj: .* absolute .* from 0 to 0.6"):
        threshold_mask(W.abs(), 0.7, "global", "proj")


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="magnitude", threshold=0.1, sparsity=0.5), "give exactly one of threshold and sparsity"),
    (dict(method="magnitude", threshold=0.1, pattern="2:4"), "exactly one of threshold and sparsity"),
    (dict(method="magnitude", threshold=0.1, layer_sparsity={"mlp": 0.3}), "exactly one"),
    (dict(method="sparsegpt", threshold=0.1), "threshold applies to methods"),
    (dict(method=None, mlp_neurons=0.2, threshold=0.1), "threshold applies to methods"),
    (dict(method="magnitude", threshold=0.0), r"threshold=0.0 must be > 0"),
    (dict(method="magnitude", threshold="0.1"), r"threshold='0.1' \(str\) must be a finite number"),
    (dict(method="magnitude", threshold=float("nan")), "must be a finite number"),
    (dict(method="wanda", calibrated=True), "calibrated=True applies to method='column_magnitude'"),
    (dict(method="column_magnitude", pattern="2:4"), "N:M pattern does not apply"),
    (dict(method="wanda", scope="global"), "scope='global'"),
])
def test_bad_threshold_config_names_the_fix(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PruningConfig(**kwargs)


def test_threshold_config_round_trips_without_a_sparsity():
    config = PruningConfig(method="wanda", threshold=0.05, scope="global")
    assert config.sparsity is None and not config.calibrated
    assert PruningConfig.from_dict(json.loads(config.to_json_string())) == config
    assert PruningConfig(method="column_magnitude").sparsity == 0.5  # no threshold: the default fraction


@pytest.mark.parametrize("scope,threshold", [("global", 0.02), ("layer", 0.8)])
def test_magnitude_threshold_masks_are_exact_and_reported(tmp_path, scope, threshold):
    model = build_tiny("llama")
    weights = {n: m.weight.detach().clone() for n, m in model.named_modules() if n.startswith("model.layers.")
               and isinstance(m, torch.nn.Linear)}
    pruner = Pruner(model)
    pruner.prune(tmp_path / "out", PruningConfig(method="magnitude", threshold=threshold, scope=scope))
    assert sorted(pruner.masks) == sorted(weights)
    zeros = total = 0
    for name, weight in weights.items():
        limit = threshold * weight.abs().mean() if scope == "layer" else threshold
        assert torch.equal(pruner.masks[name], weight.abs() < limit), name
        assert pruner.report["layers"][name]["sparsity"] == pytest.approx(float((weight.abs() < limit).float().mean()))
        zeros, total = zeros + int((weight.abs() < limit).sum()), total + weight.numel()
    assert 0 < pruner.report["sparsity"] == pytest.approx(zeros / total)
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"magnitude threshold {threshold:g}, {scope} scope" in card and "Per-layer sparsity" in card
    assert f"| sparsity of the pruned layers | {zeros / total:.4f} |" in card


def _first_q_proj_rms(model) -> torch.Tensor:
    """RMS of each input of layer 0's q_proj over the calibration tokens, with a hook on the dense model (its input
    is the normed embedding, the same whatever the pruner does to later layers)."""
    seen = []
    handle = model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        model(input_ids=CALIBRATION)
    handle.remove()
    x = torch.cat(seen).reshape(-1, seen[0].shape[-1]).double()
    return x.pow(2).mean(0).sqrt().float()


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_wanda_threshold_mask_matches_an_independent_reference(scope):
    model = build_tiny("llama")
    weight = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    scores = weight.abs() * _first_q_proj_rms(model).unsqueeze(0)  # Wanda: |W_ij| x RMS(x_j)
    threshold = 0.7 if scope == "layer" else float(scores.median())
    limit = threshold * scores.mean() if scope == "layer" else threshold
    pruner = Pruner(model)
    config = PruningConfig(method="wanda", threshold=threshold, scope=scope, target=["q_proj"])
    pruner.prune_in_place(config, CALIBRATION)
    mask = pruner.masks["model.layers.0.self_attn.q_proj"]
    differ = mask != (scores < limit)
    # float32 sums in a different order: only entries within a hair of the limit may land on the other side
    assert bool(((scores[differ] - limit).abs() <= 1e-5 * float(limit)).all()), int(differ.sum())
    assert 0.05 < mask.float().mean() < 0.95


@pytest.mark.parametrize("config,match", [
    (PruningConfig(method="magnitude", threshold=1e-9, scope="global"), r"threshold=1e-09 removes nothing from the 14"),
    (PruningConfig(method="magnitude", threshold=100.0), r"removes all of model.layers.0.self_attn.q_proj"),
    (PruningConfig(method="wanda", threshold=1e-12, scope="global"), r"removes nothing .* absolute \(scope='global'\)"),
    (PruningConfig(method="wanda", threshold=50.0), r"relative to each layer's mean \(scope='layer'\)"),
    (PruningConfig(method="column_magnitude", threshold=1e-9), r"removes no input feature of the 14 target layers"),
    (PruningConfig(method="column_magnitude", threshold=1e3, scope="global"), r"removes every input feature of"),
    (PruningConfig(method="column_magnitude", sparsity=0.001), r"sparsity=0.001 removes no input feature"),
    (PruningConfig(method="column_magnitude", sparsity=0.6, scope="global", target=["gate_proj", "o_proj"]),
     r"removes every input feature of"),
])
def test_a_threshold_that_removes_nothing_or_everything_writes_nothing(tmp_path, config, match):
    with pytest.raises(ValueError, match=match) as err:
        Pruner(build_tiny("llama")).prune(tmp_path / "out", config, CALIBRATION)
    assert "Nothing was written" in str(err.value) and not (tmp_path / "out").exists()
