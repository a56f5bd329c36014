"""Streamed compression (`from_pretrained(path, streaming=True)`): the output equals the in-memory path's tensor for
tensor, one block is in memory at a time, activations spill to disk within a budget, and wrong use fails early
without leaving output behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from optimum_agentos import AgentOSConfig, Pruner, PruningConfig, Quantizer
from optimum_agentos.streaming.buffer import BufferBudgetError

from ..conftest import build_tiny, run_python


def save_sharded(model, folder: Path, dtype) -> Path:
    model.to(dtype).save_pretrained(folder, max_shard_size="40KB")  # several shards, blocks split across them
    assert (folder / "model.safetensors.index.json").is_file()
    return folder


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def assert_same_checkpoint(a: Path, b: Path) -> None:
    ta, tb = tensors(a), tensors(b)
    assert sorted(ta) == sorted(tb)
    for key in ta:
        assert ta[key].dtype == tb[key].dtype and torch.equal(ta[key], tb[key]), key
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())


IDS = torch.randint(0, 128, (12, 32), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kind,dtype,config", [
    ("llama", torch.bfloat16, dict(method="gptq")),
    ("qwen2", torch.float32, dict(method="gptq", embedding_bits=8)),  # tied int8 embeddings and head
    ("qwen2", torch.float32, dict(method="gptq")),  # tied float16 embeddings, written a few rows at a time
    ("gpt2", torch.bfloat16, dict(method="rtn")),  # Conv1D layers
])
def test_streamed_quantize_equals_in_memory(tmp_path, kind, dtype, config):
    src = save_sharded(build_tiny(kind, num_hidden_layers=3) if kind != "gpt2" else build_tiny(kind), tmp_path / "src",
                       dtype)
    config = AgentOSConfig(bits=4, group_size=64, **config)
    Quantizer.from_pretrained(src).quantize(tmp_path / "memory", config, IDS, batch_size=4)
    quantizer = Quantizer.from_pretrained(src, streaming=True)
    assert all(p.device.type == "meta" for p in quantizer.model.parameters())  # nothing read yet
    assert quantizer.quantize(tmp_path / "streamed", config, IDS, batch_size=4, max_shard_size="30KB") is None
    assert len(list((tmp_path / "streamed").glob("*.safetensors"))) > 1
    assert_same_checkpoint(tmp_path / "memory", tmp_path / "streamed")
    if kind != "llama":
        return
    # the streamed checkpoint loads in a fresh process and computes the in-memory checkpoint's logits exactly
    out = run_python(f"""
        import torch, optimum_agentos
        from transformers import AutoModelForCausalLM
        ids = torch.arange(24).reshape(2, 12) % 100
        a = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'memory')!r}).eval()(ids).logits
        b = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'streamed')!r}).eval()(ids).logits
        print(torch.equal(a, b), type(b).__name__)
    """)
    assert out.split()[0] == "True"


@pytest.mark.parametrize("kind,dtype,method,quantization,extra", [
    ("llama", torch.bfloat16, "sparsegpt", None, {}),
    ("qwen2", torch.float32, "wanda", dict(method="gptq"), {}),
    ("gpt2", torch.float32, "magnitude", dict(method="rtn"), {}),
    ("gpt2", torch.float32, "sparsegpt", None, dict(reconstruction_steps=6, reconstruction_lr=1e-3)),  # Conv1D
])
def test_streamed_prune_equals_in_memory(tmp_path, kind, dtype, method, quantization, extra):
    src = save_sharded(build_tiny(kind, num_hidden_layers=3) if kind != "gpt2" else build_tiny(kind), tmp_path / "src",
                       dtype)
    config = PruningConfig(method=method, sparsity=0.5, **extra)
    quantization = AgentOSConfig(bits=4, group_size=64, **quantization) if quantization else None
    ids = torch.randint(0, 128, (16, 32), generator=torch.Generator().manual_seed(1))
    memory = Pruner.from_pretrained(src)
    memory.prune(tmp_path / "memory", config, ids, batch_size=4, quantization=quantization)
    streamed = Pruner.from_pretrained(src, streaming=True)
    streamed.prune(tmp_path / "streamed", config, ids, batch_size=4, quantization=quantization, max_shard_size="30KB")
    assert_same_checkpoint(tmp_path / "memory", tmp_path / "streamed")
    assert streamed.report == memory.report
    assert 0.45 < streamed.report["sparsity"] <= 0.5


def test_one_block_in_memory_and_spilled_activations(tmp_path):
    """While a block runs, no other block holds weights; with a tiny buffer budget the activations go to disk (the
    spill folder is empty again after) and the result does not change."""
    src = save_sharded(build_tiny("llama", num_hidden_layers=4), tmp_path / "src", torch.bfloat16)
    config = AgentOSConfig(bits=4, group_size=64, method="gptq")
    Quantizer.from_pretrained(src).quantize(tmp_path / "memory", config, IDS, batch_size=2)
    quantizer = Quantizer.from_pretrained(src, streaming=True)
    blocks = quantizer.model.model.layers
    loaded_when_running = []

    def count_loaded(module, args):
        if any(p.device.type != "meta" for p in module.parameters()):  # not the capture of the first block's inputs
            loaded_when_running.append(sum(any(p.device.type != "meta" for p in b.parameters()) for b in blocks))

    for block in blocks:
        block.register_forward_pre_hook(count_loaded)
    batch_bytes = 2 * 32 * 96 * 4  # one batch of hidden states in float32
    spill = tmp_path / "spill"
    quantizer.quantize(tmp_path / "streamed", config, IDS, batch_size=2, buffer_memory=4 * batch_bytes + 60_000,
                       spill_dir=spill)
    assert len(loaded_when_running) == 4 * 6 * 2 - 6 and set(loaded_when_running) == {1}  # 6 batches, 2 passes
    assert quantizer.stats["spilled_bytes"] >= 2 * batch_bytes
    assert spill.is_dir() and not any(spill.iterdir())
    assert_same_checkpoint(tmp_path / "memory", tmp_path / "streamed")


def test_wrong_use_fails_early_and_leaves_nothing(tmp_path):
    src = save_sharded(build_tiny("llama"), tmp_path / "src", torch.float32)
    config = AgentOSConfig(bits=4, group_size=64, method="gptq")
    # a buffer budget too small for even one batch: a clear error, no output folder
    with pytest.raises(BufferBudgetError, match="buffer_memory"):
        Quantizer.from_pretrained(src, streaming=True).quantize(tmp_path / "out", config, IDS, buffer_memory="10KB")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    # a device that is not there
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="not available"):
            Quantizer.from_pretrained(src, streaming=True, device="cuda")
    # structured pruning needs the whole model
    with pytest.raises(ValueError, match="streaming=False"):
        Pruner.from_pretrained(src, streaming=True).prune(tmp_path / "out", PruningConfig(attention_groups=1), IDS)
    # in-memory calls on a streamed compressor, streaming of a model object
    with pytest.raises(ValueError, match="quantize\\(save_dir"):
        Quantizer.from_pretrained(src, streaming=True).quantize_in_place(config, IDS)
    with pytest.raises(ValueError, match="checkpoint folder"):
        Quantizer.from_pretrained(build_tiny("llama"), streaming=True)
    # a shard named by the index is missing
    shard = sorted(src.glob("model-*.safetensors"))[1]
    shard.rename(tmp_path / "moved.safetensors")
    with pytest.raises(FileNotFoundError, match=shard.name):
        Quantizer.from_pretrained(src, streaming=True)
    # no safetensors at all
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((src / "config.json").read_text())
    (bare / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="no safetensors weights"):
        Quantizer.from_pretrained(bare, streaming=True)


def test_failure_mid_run_keeps_the_previous_checkpoint(tmp_path):
    """A run that fails after some blocks were written (here: the last block's shard is corrupt) leaves the
    existing output folder exactly as it was and no temporary folder behind."""
    src = save_sharded(build_tiny("llama", num_hidden_layers=3), tmp_path / "src", torch.float32)
    config = AgentOSConfig(bits=4, group_size=64, method="rtn")
    out = tmp_path / "out"
    Quantizer.from_pretrained(src, streaming=True).quantize(out, config)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    index = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    last = src / index["model.layers.2.mlp.down_proj.weight"]
    last.write_bytes(last.read_bytes()[:200])  # truncated: reading it fails mid-run
    with pytest.raises(Exception):
        Quantizer.from_pretrained(src, streaming=True).quantize(out, AgentOSConfig(bits=8, method="rtn"))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA accelerator (torch sees none here)")
def test_streamed_gptq_on_accelerator(tmp_path):
    """Blocks calibrated and quantized on the accelerator: the checkpoint loads on CPU and its logits are those of
    the CPU run within float rounding (the codes may differ where a value sits on a rounding boundary)."""
    src = save_sharded(build_tiny("llama", num_hidden_layers=3), tmp_path / "src", torch.bfloat16)
    config = AgentOSConfig(bits=4, group_size=64, method="gptq")
    Quantizer.from_pretrained(src, streaming=True).quantize(tmp_path / "cpu", config, IDS)
    Quantizer.from_pretrained(src, streaming=True, device="cuda").quantize(tmp_path / "cuda", config, IDS)
    from transformers import AutoModelForCausalLM

    ids = torch.arange(24).reshape(2, 12) % 100
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "cpu").eval()(ids).logits
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "cuda").eval()(ids).logits
    assert torch.allclose(a, b, atol=5e-2), (a - b).abs().max()


def test_device_blocks_protocol_on_cpu(tmp_path):
    """The block mover used for accelerators, run with the CPU as the device: same result as without it, and every
    block is back where it was after."""
    from optimum_agentos.calibration.runner import run_blockwise
    from optimum_agentos.nn.targets import resolve_targets
    from optimum_agentos.streaming.device import DeviceBlocks

    config = AgentOSConfig(bits=4, group_size=64, method="gptq")
    plain, moved = Quantizer(build_tiny("llama")), Quantizer(build_tiny("llama"))
    plain.quantize_in_place(config, IDS)
    names = resolve_targets(moved.model, config.target, config.ignore)
    run_blockwise(moved.model, names, IDS, lambda layers, h: moved._gptq_block(layers, h, config), 4, "GPTQ",
                  stream=DeviceBlocks(moved.model, "model.layers", "cpu"))
    a, b = plain.model.state_dict(), moved.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if "layers" in k)


def test_missing_device_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(ValueError, match="device='cpu'"):
        Quantizer(build_tiny("llama"), device="cuda")
    with pytest.raises(ValueError, match="not a device name"):
        Pruner(build_tiny("llama"), device="gpu0")
    assert Quantizer(build_tiny("llama"), device="auto").device.type == "cpu"  # no accelerator: the CPU


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA accelerator (torch sees none here)")
def test_in_memory_gptq_and_sparsegpt_on_accelerator(tmp_path):
    """In-memory model, blocks calibrated on the accelerator: the model ends on the CPU, close to the CPU run."""
    config = AgentOSConfig(bits=4, group_size=64, method="gptq")
    cpu, cuda = Quantizer(build_tiny("llama")), Quantizer(build_tiny("llama"), device="cuda")
    cpu.quantize_in_place(config, IDS)
    cuda.quantize_in_place(config, IDS)
    assert all(p.device.type == "cpu" for p in cuda.model.parameters())
    ids = torch.arange(24).reshape(2, 12) % 100
    assert torch.allclose(cpu.model(ids).logits, cuda.model(ids).logits, atol=5e-2)
    pruner = Pruner(build_tiny("llama"), device="cuda")
    pruner.prune(tmp_path / "sparse", PruningConfig(method="sparsegpt", sparsity=0.5), IDS)
    assert all(p.device.type == "cpu" for p in pruner.model.parameters())


@pytest.mark.slow
@pytest.mark.model("smollm2-135m")
def test_streamed_rtn_of_smollm2_equals_in_memory(tmp_path):
    """The real model (the cached float32 conversion both paths load): streamed RTN int4 with int8 embeddings writes
    the in-memory checkpoint's tensors (GPTQ and SparseGPT on SmolLM2 are compared by benchmarks/streaming.py)."""
    config = AgentOSConfig(bits=4, group_size=128, method="rtn", embedding_bits=8)
    Quantizer.from_pretrained("smollm2-135m").quantize(tmp_path / "memory", config)
    Quantizer.from_pretrained("smollm2-135m", streaming=True).quantize(tmp_path / "streamed", config,
                                                                        max_shard_size="50MB")
    assert len(list((tmp_path / "streamed").glob("*.safetensors"))) > 1
    assert_same_checkpoint(tmp_path / "memory", tmp_path / "streamed")
