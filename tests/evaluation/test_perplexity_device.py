"""`perplexity(..., device=)`: the model is evaluated where asked and comes back where it was."""

import pytest
import torch

from optimum_agentos.evaluation import perplexity_from_ids

from ..conftest import build_tiny

IDS = torch.randint(0, 128, (4 * 32,), generator=torch.Generator().manual_seed(0))


def test_cpu_device_is_the_same_evaluation():
    model = build_tiny("llama")
    assert perplexity_from_ids(model, IDS, 32, device="cpu") == perplexity_from_ids(model, IDS, 32)


def test_missing_accelerator_is_a_clear_error_before_anything_moves():
    model = build_tiny("llama")
    missing = f"cuda:{torch.cuda.device_count()}"  # one past the last device: never there
    with pytest.raises(ValueError, match="not available on this machine"):
        perplexity_from_ids(model, IDS, 32, device=missing)
    assert next(model.parameters()).device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA accelerator (torch sees none here)")
def test_evaluates_on_the_accelerator_and_moves_back():
    model = build_tiny("llama")
    on_cpu = perplexity_from_ids(model, IDS, 32)
    on_gpu = perplexity_from_ids(model, IDS, 32, device="cuda")
    assert next(model.parameters()).device.type == "cpu"
    assert abs(on_gpu - on_cpu) / on_cpu < 1e-3  # float32 on both; kernels differ in summation order only
