import pytest
import torch

from optimum_agentos.nn import qmath as rtn
from optimum_agentos.quantization.gptq import gptq_quantize
from optimum_agentos.calibration.hessian import HessianAccumulator


def correlated_inputs(n=2048, dim=96, rank=16, seed=0):
    """Activations as in real layers: most energy in a few directions, plus noise."""
    g = torch.Generator().manual_seed(seed)
    low_rank = torch.randn(n, rank, generator=g) @ torch.randn(rank, dim, generator=g)
    return low_rank + 0.1 * torch.randn(n, dim, generator=g)


def output_error(w, codes, scales, zeros, group_size, x):
    deq = rtn.dequantize_codes(codes, scales, zeros, group_size)
    return ((x @ w.t() - x @ deq.t()) ** 2).mean().item()


def test_identity_hessian_reduces_to_rtn():
    w = torch.randn(16, 96, generator=torch.Generator().manual_seed(0))
    codes, scales, zeros = gptq_quantize(w, torch.eye(96), 4, 64, sym=False, damp_percent=0.0)
    ref = rtn.quantize_rtn(w, 4, 64, sym=False)
    assert torch.equal(codes, ref[0]) and torch.equal(scales, ref[1]) and torch.equal(zeros, ref[2])


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group_size", [64, -1])
def test_gptq_beats_rtn_on_layer_output(act_order, group_size):
    x = correlated_inputs()
    w = torch.randn(32, 96, generator=torch.Generator().manual_seed(2))
    acc = HessianAccumulator(96)
    for chunk in x.split(500):
        acc.add(chunk)
    codes, scales, zeros = gptq_quantize(w, acc.hessian(), 3, group_size, sym=False, act_order=act_order)
    assert codes.shape == w.shape and scales.shape[1] == rtn.num_groups(96, group_size)
    gptq_err = output_error(w, codes, scales, zeros, group_size, x)
    rtn_err = output_error(w, *rtn.quantize_rtn(w, 3, group_size, sym=False), group_size, x)
    assert gptq_err < 0.25 * rtn_err  # measured ~0.05-0.1x on this data


def test_hessian_accumulator_matches_definition():
    x = torch.randn(3, 10, 8)
    acc = HessianAccumulator(8)
    acc.add(x[:2])
    acc.add(x[2:])
    flat = x.reshape(-1, 8)
    assert torch.allclose(acc.hessian(), 2 * flat.t() @ flat / 30, atol=1e-5)


def test_dead_inputs_get_zero_weight():
    h = torch.eye(8)
    h[3, 3] = 0
    w = torch.randn(4, 8)
    codes, scales, zeros = gptq_quantize(w, h, 8, -1, sym=True)
    assert (rtn.dequantize_codes(codes, scales, zeros, -1)[:, 3] == 0).all()


def test_empty_calibration_is_an_error():
    with pytest.raises(ValueError, match="calibration"):
        HessianAccumulator(4).hessian()


@pytest.mark.parametrize("act_order", [False, True])
def test_shared_inverse_hessian_equals_one_inversion_per_layer(act_order):
    """q/k/v share one input: one `invert_hessian`, made in the accumulator's own storage, gives every layer exactly
    the codes a separate inversion of the same Hessian gives, and leaves a Hessian passed to `gptq_quantize` as
    it was."""
    from optimum_agentos.calibration.hessian import inverse_cholesky
    from optimum_agentos.quantization.gptq import invert_hessian

    x = correlated_inputs()
    x[:, 7] = 0  # a dead input
    acc = HessianAccumulator(96)
    acc.add(x)
    hessian = acc.hessian()
    before = hessian.clone()
    shared = invert_hessian(acc.take_hessian(), 0.01, act_order, inplace=True)
    assert acc.sum is None  # the accumulator gave its storage away
    for seed in range(3):
        w = torch.randn(32, 96, generator=torch.Generator().manual_seed(seed))
        alone = gptq_quantize(w, hessian, 4, 32, sym=False, act_order=act_order)
        together = gptq_quantize(w, None, 4, 32, sym=False, act_order=act_order, inverse=shared)
        assert all(torch.equal(a, b) for a, b in zip(alone, together))
        assert alone[0].dtype == torch.uint8 and bool((alone[0][:, 7] == alone[2][:, 0]).all())
    assert torch.equal(hessian, before)
    assert torch.equal(inverse_cholesky(hessian, 0.01), inverse_cholesky(hessian.clone(), 0.01, inplace=True))
    with pytest.raises(ValueError, match="act_order"):
        gptq_quantize(torch.randn(32, 96), None, 4, 32, sym=False, act_order=not act_order, inverse=shared)


def test_layers_reading_one_input_share_one_hessian():
    """q/k/v and gate/up get one accumulator each (held weakly while the block runs, so the inputs are freed as the
    block goes); o and down get their own."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from optimum_agentos.calibration.runner import collect_input_stats

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)
    model = LlamaForCausalLM(config).eval()
    block = model.model.layers[0]
    inputs = []
    handle = block.register_forward_pre_hook(lambda m, args, kwargs: inputs.append((args, kwargs)), with_kwargs=True)
    model(torch.randint(0, 64, (2, 8)))
    handle.remove()
    layers = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers.0." in n}
    stats = {n.split(".")[-1]: acc for n, acc in collect_input_stats(block, layers, inputs * 2).items()}
    assert stats["q_proj"] is stats["k_proj"] is stats["v_proj"] and stats["gate_proj"] is stats["up_proj"]
    assert len({id(a) for a in stats.values()}) == 4 and stats["q_proj"].tokens == 2 * 16
