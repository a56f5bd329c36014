"""The shard writer writes one part file per block and joins the parts into shards by copying bytes: the shards
must be ordinary safetensors files that safetensors and transformers read, with every tensor exact."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from optimum_agentos.streaming.writer import ShardWriter


def blocks_of_tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    blocks = []
    for b in range(5):  # mixed dtypes and odd byte sizes: the join must keep the data aligned and exact
        blocks.append({
            f"layers.{b}.codes": torch.randint(0, 255, (33, 7), generator=g, dtype=torch.uint8),
            f"layers.{b}.scales": torch.randn(33, 3, generator=g).half(),
            f"layers.{b}.norm": torch.randn(31, generator=g),
            f"layers.{b}.steps": torch.arange(3, dtype=torch.int64) + b,
        })
    return blocks


@pytest.mark.parametrize("max_shard_size,shards", [("1MB", 1), ("1500B", 3)])
def test_parts_join_into_readable_shards(tmp_path, max_shard_size, shards):
    writer = ShardWriter(tmp_path, max_shard_size)
    expected = {}
    for block in blocks_of_tensors():
        writer.add(block)
        writer.flush()  # as the streamed pipeline does after every block
        expected.update(block)
    names = writer.finish()
    assert len(names) == shards
    assert not list(tmp_path.glob(".part-*"))  # the parts are gone
    read = {}
    for name in names:
        read.update(load_file(tmp_path / name))
        with safe_open(tmp_path / name, framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
        header_size = int.from_bytes((tmp_path / name).read_bytes()[:8], "little")
        assert header_size % 8 == 0  # the data starts aligned, as safetensors writes it
    assert read.keys() == expected.keys()
    assert all(read[k].dtype == v.dtype and torch.equal(read[k], v) for k, v in expected.items())
    if shards > 1:
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(expected)
        assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in expected.values())
        assert all((tmp_path / f).is_file() for f in index["weight_map"].values())


def test_joined_checkpoint_loads_in_transformers(tmp_path):
    """A tiny model written through the writer block by block reloads with from_pretrained, weights exact."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                         num_attention_heads=2, num_key_value_heads=2)
    model = LlamaForCausalLM(config)
    state = model.state_dict()
    writer = ShardWriter(tmp_path, "6KB")
    for i in range(3):
        writer.add({k: v for k, v in state.items() if k.startswith(f"model.layers.{i}.")})
        writer.flush()
    writer.add({k: v for k, v in state.items() if not k.startswith("model.layers.")})
    writer.finish()
    config.save_pretrained(tmp_path)
    loaded = LlamaForCausalLM.from_pretrained(tmp_path)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())


def test_part_files_are_byte_identical_to_save_file(tmp_path):
    """Parts are written from the tensors' memory (no serialized copy), in safetensors' own layout and order."""
    from safetensors.torch import save_file

    from optimum_agentos.streaming.writer import _save

    g = torch.Generator().manual_seed(0)
    tensors = {
        "b.weight": torch.randn(7, 5, generator=g), "a.codes": torch.randint(0, 255, (3, 8), dtype=torch.uint8),
        "a.scales": torch.randn(3, 2, generator=g).to(torch.bfloat16), "c.half": torch.randn(4, generator=g).half(),
        "c.index": torch.arange(6, dtype=torch.int32), "d.count": torch.tensor(3), "e.mask": torch.rand(5, 3) > 0.5,
        "f.zeros": torch.randint(-8, 7, (2, 3), dtype=torch.int8), "g.empty": torch.empty(0, 4),
        "h.view": torch.randn(6, 4, generator=g)[:, 1],  # not contiguous
    }
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_path / "reference.safetensors",
              metadata={"format": "pt"})
    _save({k: v.contiguous() for k, v in tensors.items()}, tmp_path / "ours.safetensors")
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "reference.safetensors").read_bytes()
