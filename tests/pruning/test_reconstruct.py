"""Block reconstruction after Wanda/SparseGPT (`PruningConfig(reconstruction_steps=...)`): the sparsity pattern is
kept exactly, every block's output moves closer to the dense block's, the whole model on held-out text is closer
to the dense model than without reconstruction, and the checkpoint reloads tensor for tensor."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from optimum_agentos import AgentOSConfig, Pruner, PruningConfig, SparseLinear
from optimum_agentos.cli import build_parser, prune_configs
from tests.conftest import build_tiny, model_output

CALIBRATION = torch.randint(2, 128, (32, 32), generator=torch.Generator().manual_seed(0))
HELD_OUT = torch.randint(2, 128, (8, 32), generator=torch.Generator().manual_seed(7))


def tiny(kind: str):
    return build_tiny(kind, **({"n_layer": 3} if kind == "gpt2" else {"num_hidden_layers": 3}))


def logit_error(model, dense) -> float:
    return torch.nn.functional.mse_loss(model_output(model, HELD_OUT), model_output(dense, HELD_OUT)).item()


@pytest.mark.parametrize("kind,method,pattern", [
    ("llama", "sparsegpt", None),
    ("llama", "wanda", "2:4"),
    ("gpt2", "sparsegpt", None),  # Conv1D layers store [in, out]: the mask is transposed for them
])
def test_reconstruction_keeps_the_masks_and_moves_every_block_toward_the_dense_one(kind, method, pattern, tmp_path):
    dense = tiny(kind)
    plain = Pruner(tiny(kind))
    plain.prune(tmp_path / "plain", PruningConfig(method=method, pattern=pattern), CALIBRATION, batch_size=8)
    pruner = Pruner(tiny(kind))
    config = PruningConfig(method=method, pattern=pattern, reconstruction_steps=40, reconstruction_lr=1e-3)
    model = pruner.prune(tmp_path / "rec", config, CALIBRATION, batch_size=8)

    layers = {n: m for n, m in model.named_modules() if isinstance(m, SparseLinear)}
    assert layers and set(layers) == set(pruner.masks)
    for name, layer in layers.items():  # exactly the requested sparsity, stored as the method's mask
        assert torch.equal(layer.kept(), ~pruner.masks[name])
        assert layer.nnz == layer.in_features * layer.out_features // 2
    blocks = pruner.report["reconstruction_blocks"]
    assert len(blocks) == 3  # one per decoder block
    assert all(b["loss"] < 0.9 * b["loss_pruned"] for b in blocks), blocks
    # held-out tokens: the reconstructed model is closer to the dense model than SparseGPT/Wanda alone
    assert logit_error(model, dense) < 0.9 * logit_error(plain.model, dense)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "rec")
    assert torch.equal(model_output(reloaded, HELD_OUT), model_output(model, HELD_OUT))
    assert reloaded.config.quantization_config.pruning["reconstruction_steps"] == 40


def test_zero_steps_is_the_plain_method(tmp_path):
    a, b = Pruner(build_tiny("llama")), Pruner(build_tiny("llama"))
    a.prune_in_place(PruningConfig(method="sparsegpt"), CALIBRATION, batch_size=8)
    b.prune_in_place(PruningConfig(method="sparsegpt", reconstruction_steps=0), CALIBRATION, batch_size=8)
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))
    assert b.stats["reconstruction"] is None


def test_bad_reconstruction_settings_fail_early(tmp_path):
    with pytest.raises(ValueError, match="reconstruction_steps applies to the calibrated methods"):
        PruningConfig(method="magnitude", reconstruction_steps=10)
    with pytest.raises(ValueError, match="reconstruction_steps=-1 must be >= 0"):
        PruningConfig(method="sparsegpt", reconstruction_steps=-1)
    with pytest.raises(ValueError, match="reconstruction_lr=0 must be a positive number"):
        PruningConfig(method="sparsegpt", reconstruction_steps=10, reconstruction_lr=0)
    with pytest.raises(ValueError, match="reconstruction_steps.*int"):
        PruningConfig(method="sparsegpt", reconstruction_steps=1.5)
    pruner = Pruner(build_tiny("llama"))
    before = [p.clone() for p in pruner.model.parameters()]
    with pytest.raises(ValueError, match="cannot quantize in the same pass"):
        pruner.prune(tmp_path / "out", PruningConfig(method="sparsegpt", reconstruction_steps=5), CALIBRATION,
                     quantization=AgentOSConfig(bits=4, group_size=32, method="gptq"))
    assert not (tmp_path / "out").exists()
    assert all(torch.equal(p, q) for p, q in zip(before, pruner.model.parameters()))


def test_cli_passes_the_reconstruction_settings():
    args = build_parser().parse_args(["prune", "--model", "m", "--output", "o", "--method", "wanda",
                                      "--reconstruction-steps", "50", "--reconstruction-lr", "2e-4"])
    config, quantization = prune_configs(args)
    assert (config.method, config.reconstruction_steps, config.reconstruction_lr, quantization) == \
        ("wanda", 50, 2e-4, None)
