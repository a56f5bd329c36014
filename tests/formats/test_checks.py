"""Load checks: a checkpoint whose files do not hold what its config.json describes fails naming the tensor."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from optimum_agentos import AgentOSConfig
from optimum_agentos.formats.checks import CorruptCheckpointError, check_safetensors
from optimum_agentos.quantization.quantizer import Quantizer

from ..conftest import build_tiny


@pytest.fixture
def checkpoint(tmp_path):
    folder = tmp_path / "ckpt"
    Quantizer(build_tiny("llama")).quantize(folder, AgentOSConfig(bits=4, group_size=64, embedding_bits=8))
    return folder


def _rewrite(folder, change):
    path = folder / "model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize("key", ["model.layers.0.self_attn.q_proj.weight_scale", "model.layers.1.mlp.down_proj.weight",
                                 "model.embed_tokens.weight_scale"])
def test_a_deleted_tensor_of_a_compressed_layer_is_an_error(checkpoint, key):
    _rewrite(checkpoint, lambda t: t.pop(key))
    with pytest.raises(CorruptCheckpointError, match=key.replace(".", r"\.")):
        AutoModelForCausalLM.from_pretrained(checkpoint)


def test_a_tensor_of_the_wrong_shape_is_an_error(checkpoint):
    key = "model.layers.0.mlp.up_proj.weight_zero"

    def shrink(tensors):
        tensors[key] = tensors[key][:-1].clone()

    _rewrite(checkpoint, shrink)
    with pytest.raises(CorruptCheckpointError, match="wrong shapes or dtypes.*up_proj.weight_zero"):
        AutoModelForCausalLM.from_pretrained(checkpoint)


def test_malformed_header_entry_is_named(tmp_path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [1]}}).encode()  # no data_offsets
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(CorruptCheckpointError, match="malformed header entry for 'w'"):
        check_safetensors(path)


def test_intact_checkpoint_still_loads(checkpoint):
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 128)
