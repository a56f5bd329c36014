import pytest
import torch

from optimum_agentos.pruning import (
    global_magnitude_masks, magnitude_scores, mask_from_scores, parse_pattern, sparsegpt_prune, wanda_scores,
)
from optimum_agentos.calibration.hessian import HessianAccumulator


def gen(seed):
    return torch.Generator().manual_seed(seed)


def test_per_row_and_whole_matrix_sparsity_are_exact():
    scores = torch.rand(8, 96, generator=gen(0))
    per_row = mask_from_scores(scores, 0.5)
    assert (per_row.sum(dim=1) == 48).all()
    whole = mask_from_scores(scores, 0.25, per_row=False)
    assert whole.sum() == 8 * 96 // 4
    assert scores[whole].max() <= scores[~whole].min()


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4"])
def test_n_m_masks_keep_n_of_every_m(pattern):
    n, m = parse_pattern(pattern)
    mask = mask_from_scores(torch.rand(6, 64, generator=gen(1)), 0.0, n_m=(n, m))
    assert ((~mask).reshape(6, -1, m).sum(dim=-1) == n).all()


@pytest.mark.parametrize("bad,match", [(1.0, "must be in \\[0, 1\\)"), (-0.1, "must be in")])
def test_bad_sparsity(bad, match):
    with pytest.raises(ValueError, match=match):
        mask_from_scores(torch.rand(2, 8), bad)


def test_bad_patterns():
    with pytest.raises(ValueError, match="not a multiple of M=4"):
        mask_from_scores(torch.rand(2, 10), 0.0, n_m=(2, 4))
    with pytest.raises(ValueError, match="'N:M'"):
        parse_pattern("2-4")
    with pytest.raises(ValueError, match="0 < N < M"):
        parse_pattern("4:2")


def test_wanda_protects_weights_on_loud_inputs():
    weight = torch.ones(4, 8)
    norms = torch.tensor([100.0, 1, 1, 1, 1, 1, 1, 100.0])
    mask = mask_from_scores(wanda_scores(weight * torch.linspace(1, 0.5, 8), norms), 0.5)
    assert not mask[:, 0].any() and not mask[:, 7].any()
    assert mask_from_scores(magnitude_scores(weight * torch.linspace(1, 0.5, 8)), 0.5)[:, 7].all()


def test_global_magnitude_prunes_small_layers_more():
    masks = global_magnitude_masks({"big": torch.randn(16, 16) * 10, "small": torch.randn(16, 16) * 0.1}, 0.5)
    assert masks["small"].float().mean() > 0.9 and masks["big"].float().mean() < 0.1


def low_rank_inputs(n=2048, dim=96, rank=16, seed=0):
    g = gen(seed)
    return torch.randn(n, rank, generator=g) @ torch.randn(rank, dim, generator=g) + 0.1 * torch.randn(n, dim, generator=g)


@pytest.mark.parametrize("n_m", [None, (2, 4)])
def test_sparsegpt_beats_magnitude_and_wanda_on_layer_output(n_m):
    x = low_rank_inputs()
    w = torch.randn(32, 96, generator=gen(2))
    acc = HessianAccumulator(96)
    acc.add(x)
    h = acc.hessian()
    pruned, mask = sparsegpt_prune(w, h, 0.5, n_m=n_m)
    assert (pruned[mask] == 0).all()
    assert abs(mask.float().mean().item() - 0.5) < 0.01
    if n_m:
        assert ((~mask).reshape(32, -1, 4).sum(dim=-1) == 2).all()

    def err(wp):
        return ((x @ w.t() - x @ wp.t()) ** 2).mean().item()

    mag = w * ~mask_from_scores(magnitude_scores(w), 0.5, n_m=n_m)
    wanda = w * ~mask_from_scores(wanda_scores(w, torch.diag(h)), 0.5, n_m=n_m)
    assert err(pruned) < 0.5 * err(wanda) < 0.5 * err(mag)
