import pytest
import torch

from optimum_agentos.nn import qmath as rtn


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("in_features,group_size", [(576, 128), (96, 64), (100, -1), (64, 64)])
def test_rtn_error_bounded_by_half_step(bits, sym, in_features, group_size):
    w = torch.randn(12, in_features, generator=torch.Generator().manual_seed(0))
    codes, scales, zeros = rtn.quantize_rtn(w, bits, group_size, sym)
    assert scales.shape == zeros.shape == (12, rtn.num_groups(in_features, group_size))
    assert int(codes.max()) < (1 << bits)
    deq = rtn.dequantize_codes(codes, scales, zeros, group_size)
    step = rtn.expand_groups(scales.float(), in_features, group_size)
    err = (deq - w).abs()
    # Inside the grid rounding costs at most half a step; at the clipped edges (the zero point is rounded to an
    # integer, and the symmetric grid has one code less on the positive side) at most one step.
    assert (err <= step + 1e-6).all()
    assert (err / step).mean() < 0.3


def test_short_last_group_has_its_own_parameters():
    # 576 columns in groups of 128: four full groups and one of 64, whose scale depends only on its own columns.
    w = torch.randn(3, 576, generator=torch.Generator().manual_seed(1))
    w[:, 512:] *= 100
    _, scales, _ = rtn.quantize_rtn(w, 4, 128, sym=False)
    assert scales.shape == (3, 5)
    assert (scales[:, 4].float() > 20 * scales[:, :4].float().max()).all()
    alone = rtn.group_qparams(w[:, 512:], 4, 128, sym=False)[0]
    assert torch.equal(alone[:, 0], scales[:, 4])


def test_symmetric_zero_is_midpoint_and_zero_weight_is_exact():
    w = torch.randn(4, 64)
    w[:, 3] = 0
    codes, scales, zeros = rtn.quantize_rtn(w, 4, 32, sym=True)
    assert (zeros == 8).all()
    assert (rtn.dequantize_codes(codes, scales, zeros, 32)[:, 3] == 0).all()


def test_constant_rows_do_not_divide_by_zero():
    codes, scales, zeros = rtn.quantize_rtn(torch.zeros(2, 16), 4, 8, sym=False)
    assert torch.isfinite(scales.float()).all() and (rtn.dequantize_codes(codes, scales, zeros, 8) == 0).all()


@pytest.mark.parametrize("sym", [False, True])
def test_mse_observer_never_rounds_worse_than_minmax(sym):
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(3))
    w[:, 0] *= 3  # a heavier column: clipping it can buy a finer grid for the rest
    errors = {}
    for grid in (0, 20):
        codes, scales, zeros = rtn.quantize_rtn(w, 4, 64, sym, torch.float32, mse_grid=grid)
        errors[grid] = (rtn.dequantize_codes(codes, scales, zeros, 64) - w).pow(2).sum(dim=1)
    assert (errors[20] <= errors[0] + 1e-5).all()
    assert errors[20].sum() < 0.97 * errors[0].sum()  # measured 0.95 here
