"""The distillation losses alone, against direct formulas."""

import math

import pytest
import torch
import torch.nn.functional as F

from optimum_agentos.distillation import (
    attention_loss, distillation_loss, hidden_state_loss, topk_distillation_loss,
)


def logits(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 3


def reference_forward_kl(s, t, temperature):
    p = F.softmax(t / temperature, -1)
    return (p * (F.log_softmax(t / temperature, -1) - F.log_softmax(s / temperature, -1))).sum(-1).mean() * temperature**2


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_forward_kl_matches_the_formula(temperature):
    s, t = logits(6, 11, seed=1), logits(6, 11, seed=2)
    got = distillation_loss(s, t, temperature=temperature)
    torch.testing.assert_close(got, reference_forward_kl(s, t, temperature), rtol=1e-5, atol=1e-6)


def test_reverse_kl_is_forward_kl_with_roles_swapped():
    s, t = logits(5, 9, seed=3), logits(5, 9, seed=4)
    torch.testing.assert_close(
        distillation_loss(s, t, kind="reverse_kl", temperature=2.0), reference_forward_kl(t, s, 2.0), rtol=1e-5, atol=1e-6
    )


def test_jsd_is_symmetric_at_half_bounded_by_log2_and_zero_on_equal_inputs():
    s, t = logits(7, 13, seed=5), logits(7, 13, seed=6) * 10
    a = distillation_loss(s, t, kind="jsd", beta=0.5)
    b = distillation_loss(t, s, kind="jsd", beta=0.5)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert 0 < a < math.log(2)
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        assert distillation_loss(s, s.clone(), kind=kind).abs() < 1e-6


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_chunked_equals_unchunked_in_value_and_gradient(kind):
    t = logits(2, 9, 50, seed=7)
    grads, values = [], []
    for chunk in (None, 4):
        s = logits(2, 9, 50, seed=8).requires_grad_(True)
        value = distillation_loss(s, t, temperature=2.0, kind=kind, chunk_size=chunk)
        value.backward()
        values.append(value.detach())
        grads.append(s.grad)
    torch.testing.assert_close(values[0], values[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_mask_drops_positions_entirely():
    s, t = logits(2, 6, 20, seed=9), logits(2, 6, 20, seed=10)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    full = distillation_loss(s, t, mask)
    selected = distillation_loss(s[mask], t[mask])
    torch.testing.assert_close(full, selected)
    s2 = s.clone()
    s2[~mask] = 1000.0  # padding garbage must not matter
    torch.testing.assert_close(distillation_loss(s2, t, mask), full)
    assert distillation_loss(s, t, torch.zeros_like(mask)) == 0


def test_size_mismatch_and_unknown_kind_are_rejected():
    with pytest.raises(ValueError, match="same vocabulary"):
        distillation_loss(logits(2, 10), logits(2, 12))
    with pytest.raises(ValueError, match="Unknown KD loss"):
        distillation_loss(logits(2, 10), logits(2, 10), kind="mse")


def test_topk_with_the_whole_vocabulary_equals_full_forward_kl_and_topk_is_close():
    s, t = logits(2, 5, 30, seed=11), logits(2, 5, 30, seed=12)
    full = distillation_loss(s, t, temperature=2.0)
    top = t.topk(30, -1)
    torch.testing.assert_close(topk_distillation_loss(s, top.values, top.indices, temperature=2.0), full,
                               rtol=1e-5, atol=1e-6)
    # a peaked teacher: its top 8 hold nearly all the mass, so the truncated loss stays close
    peaked = t * 4
    top8 = peaked.topk(8, -1)
    assert abs(topk_distillation_loss(s, top8.values, top8.indices) - distillation_loss(s, peaked)) < 0.1 * distillation_loss(s, peaked)
    with pytest.raises(ValueError, match="another vocabulary"):
        topk_distillation_loss(logits(2, 10), top.values[..., :3], top.indices[..., :3])


def test_hidden_state_loss_values_and_width_check():
    a = [torch.zeros(2, 3, 4), torch.ones(2, 3, 4)]
    b = [torch.zeros(2, 3, 4), torch.full((2, 3, 4), 3.0)]
    assert hidden_state_loss(a, b, {1: 1}) == 4.0  # (1 - 3)^2
    assert hidden_state_loss(a, b, {0: 0, 1: 1}) == 2.0
    assert hidden_state_loss(b, b, {1: 1}, kind="cosine").abs() < 1e-6
    mask = torch.tensor([[1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    c = [torch.ones(2, 3, 4)]
    d = [torch.ones(2, 3, 4)]
    d[0][0, 1:] = 100.0  # only masked-out positions differ
    assert hidden_state_loss(c, d, {0: 0}, mask) == 0
    with pytest.raises(ValueError, match="same width"):
        hidden_state_loss([torch.zeros(1, 2, 4)], [torch.zeros(1, 2, 8)], {0: 0})


def test_attention_loss_zero_on_equal_maps_positive_otherwise_and_head_check():
    a = F.softmax(logits(2, 4, 5, 5, seed=13), -1)
    b = F.softmax(logits(2, 4, 5, 5, seed=14), -1)
    assert attention_loss([a], [a.clone()], {0: 0}).abs() < 1e-6
    assert attention_loss([a], [b], {0: 0}) > 0.1
    with pytest.raises(ValueError, match="number of heads"):
        attention_loss([a], [a[:, :2]], {0: 0})
