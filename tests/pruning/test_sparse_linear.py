import pytest
import torch

from optimum_agentos.pruning.masks import mask_from_scores
from optimum_agentos.nn.sparse_linear import (
    SparseCheckpointError, SparseLinear, bitmask_bytes, pack_bitmask, unpack_bitmask,
)
from optimum_agentos.nn import qmath as rtn


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (7, 96), (160, 96)])
def test_bitmask_round_trip(shape):
    kept = torch.rand(shape, generator=torch.Generator().manual_seed(0)) > 0.5
    packed = pack_bitmask(kept)
    assert packed.dtype == torch.uint8 and packed.numel() == bitmask_bytes(*shape)
    assert torch.equal(unpack_bitmask(packed, *shape), kept)


def _sparse_weight(out=48, inp=96, sparsity=0.5):
    w = torch.randn(out, inp, generator=torch.Generator().manual_seed(1))
    pruned = mask_from_scores(w.abs(), sparsity, per_row=False)
    return w.masked_fill(pruned, 0), pruned


def test_float_sparse_layer_rebuilds_the_weight_exactly_and_stores_about_half():
    w, pruned = _sparse_weight()
    bias = torch.randn(48)
    layer = SparseLinear.from_dense(w, ~pruned, bias)
    assert torch.equal(layer.dequantize(), w)
    x = torch.randn(5, 96)
    assert torch.allclose(layer(x), torch.nn.functional.linear(x, w, bias), atol=1e-6)
    stored = layer.weight.numel() * layer.weight.element_size() + layer.weight_mask.numel()
    assert stored <= 0.5 * w.numel() * 4 + w.numel() / 8  # half the values + one bit per weight


def test_quantized_sparse_layer_decodes_pruned_weights_to_exact_zero():
    w, pruned = _sparse_weight()
    codes, scales, zeros = rtn.quantize_rtn(w, 4, 32, False, torch.float16)
    layer = SparseLinear.from_codes(codes, scales, zeros, ~pruned, None, bits=4, group_size=32)
    dense = layer.dequantize(torch.float32)
    assert torch.equal(dense[pruned], torch.zeros(int(pruned.sum())))
    reference = rtn.dequantize_codes(codes, scales, zeros, 32, torch.float32)
    assert torch.equal(dense, reference)
    assert layer.weight.numel() == -(-int((~pruned).sum()) // 8) * 4  # only the kept codes, 4 bits each


def test_check_names_a_mask_that_disagrees_with_the_values():
    w, pruned = _sparse_weight()
    layer = SparseLinear.from_dense(w, ~pruned, None)
    layer.check("ok")
    layer.nnz += 1
    with pytest.raises(SparseCheckpointError, match="layers.0.mlp: the bitmask marks"):
        layer.check("layers.0.mlp")


def test_check_enforces_the_recorded_n_m_pattern():
    w = torch.randn(4, 8)
    n_m = mask_from_scores(w.abs(), 0.5, n_m=(2, 4))
    SparseLinear.from_dense(w.masked_fill(n_m, 0), ~n_m, None).check("x", (2, 4))
    kept = torch.zeros(4, 8, dtype=torch.bool)
    kept[:, :4] = True  # half the weights, but 4 of 4 then 0 of 4 in each row
    with pytest.raises(SparseCheckpointError, match="2:4 pattern"):
        SparseLinear.from_dense(w, kept, None).check("x", (2, 4))
