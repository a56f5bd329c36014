"""Loading an agentos checkpoint beyond memory: accelerate's `device_map="auto"` with a `max_memory` a third of the
checkpoint and an `offload_folder` (layers on disk) computes the logits of the fully loaded model exactly; and
`save_pretrained(max_shard_size=...)` writes shards that reload to the same logits."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from optimum_agentos import AgentOSConfig, Pruner, PruningConfig, Quantizer
from optimum_agentos.formats.folder import folder_size

from ..conftest import build_tiny


IDS = torch.arange(24).reshape(2, 12) % 100


def _logits(model):
    with torch.no_grad():
        return model.eval()(IDS).logits


@pytest.mark.parametrize("kind", ["int4-e8", "sparse-int4"])
def test_disk_offload_gives_identical_logits(tmp_path, kind, monkeypatch):
    """Offloaded layers compute on the reference path (their tensors arrive only when they run, too late for a
    packed kernel), so both models are loaded with the reference kernels: the logits are then equal bit for bit."""
    from optimum_agentos.nn.kernels import KERNELS_ENV

    monkeypatch.setenv(KERNELS_ENV, "reference")
    model = build_tiny("llama", num_hidden_layers=6, hidden_size=256, intermediate_size=512, tie_word_embeddings=True)
    folder = tmp_path / "ckpt"
    calibration = torch.randint(0, 128, (8, 64), generator=torch.Generator().manual_seed(0))
    if kind == "int4-e8":
        Quantizer(model).quantize(folder, AgentOSConfig(bits=4, group_size=64, method="rtn", embedding_bits=8))
    else:
        Pruner(model).prune(folder, PruningConfig(method="wanda", sparsity=0.5), calibration,
                            quantization=AgentOSConfig(bits=4, group_size=64, method="rtn"))
    reference = _logits(AutoModelForCausalLM.from_pretrained(folder))
    size = folder_size(folder)
    offloaded = AutoModelForCausalLM.from_pretrained(
        folder, device_map="auto", max_memory={"cpu": size // 3}, offload_folder=tmp_path / "offload"
    )
    placements = set(offloaded.hf_device_map.values())
    assert "disk" in placements, offloaded.hf_device_map
    assert any(p.device.type == "meta" for p in offloaded.parameters())  # really not in memory
    assert torch.equal(_logits(offloaded), reference)


def test_save_pretrained_shards_reload(tmp_path):
    model = build_tiny("llama", num_hidden_layers=4)
    Quantizer(model).quantize(tmp_path / "ckpt", AgentOSConfig(bits=4, group_size=64, method="rtn"))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    reference = _logits(loaded)
    loaded.save_pretrained(tmp_path / "sharded", max_shard_size="50KB")
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "sharded")), reference)
