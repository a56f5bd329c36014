"""compressed-tensors export: symmetric int4/int8 written from our codes (pack-quantized) load with plain
transformers + compressed-tensors in a fresh process that never imports optimum_agentos, computing our logits;
what transformers cannot load compressed stops with an error naming the configuration that exports."""

from __future__ import annotations

import json

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
from transformers import AutoModelForCausalLM

from optimum_agentos import AgentOSConfig, Pruner, PruningConfig
from optimum_agentos.export import ExportError, export
from optimum_agentos.export.compressed_tensors import pack_int32

from ..conftest import build_tiny, run_python
from .tiny import VOCAB, result_of, tiny_checkpoint, tiny_tokenizer


@pytest.mark.parametrize("bits, cols", [(4, 96), (4, 100), (8, 96), (8, 30)])
def test_packing_matches_compressed_tensors(bits, cols):
    g = torch.Generator().manual_seed(bits)
    values = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (5, cols), generator=g)
    packed = pack_int32(values, bits)
    assert packed.dtype == torch.int32
    assert torch.equal(unpack_from_int32(packed, bits, torch.Size([5, cols])).long(), values)


def _sparse(folder):
    Pruner(build_tiny("llama", vocab_size=VOCAB), tiny_tokenizer()).prune(
        folder, PruningConfig(method="magnitude", pattern="2:4"), quantization=AgentOSConfig(bits=4, group_size=32,
                                                                                               sym=True))
    return folder


CASES = {
    "int4-sym-g32": lambda f: tiny_checkpoint(f, config=AgentOSConfig(bits=4, group_size=32, sym=True)),
    "int8-sym-channel": lambda f: tiny_checkpoint(f, config=AgentOSConfig(bits=8, group_size=-1, sym=True)),
    "qwen2-int4-sym-int8-embedding": lambda f: tiny_checkpoint(
        f, "qwen2", AgentOSConfig(bits=4, group_size=32, sym=True, embedding_bits=8)),
    "sparse-2:4-int4-sym": _sparse,
}

LOAD = """
import json, sys, torch
from transformers import AutoModelForCausalLM
out = {{}}
for name, folder in {folders!r}.items():
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        out[name] = model(torch.tensor([{ids!r}])).logits[0].float().tolist()
assert "optimum_agentos" not in sys.modules
print("RESULT" + json.dumps(out))
"""


def test_transformers_loads_the_exports_without_optimum_agentos(tmp_path, monkeypatch):
    # ours on the exact path (dequantize, float32 matmul): the measured fast paths may round activations to bf16
    monkeypatch.setenv("OPTIMUM_AGENTOS_KERNELS", "reference")
    ids = list(range(2, 60))
    folders, ours = {}, {}
    for name, build in CASES.items():
        src = build(tmp_path / name / "src")
        summary = export(src, "compressed-tensors", tmp_path / name / "out")
        assert summary["requantized_tensors"] == [] and summary["quantized_layers"] == 14
        config = json.loads((tmp_path / name / "out" / "config.json").read_text())["quantization_config"]
        assert config["format"] == "pack-quantized" and config["quant_method"] == "compressed-tensors"
        folders[name] = str(tmp_path / name / "out")
        with torch.no_grad():
            ours[name] = AutoModelForCausalLM.from_pretrained(src).eval()(torch.tensor([ids])).logits[0].float()
    got = result_of(run_python(LOAD.format(folders=folders, ids=ids)))
    for name, logits in got.items():
        # the same weights; float32 matmuls in another order
        assert torch.allclose(torch.tensor(logits), ours[name], atol=1e-4, rtol=1e-4), name


def test_asymmetric_names_sym_and_the_dequantize_route(tmp_path):
    src = tiny_checkpoint(tmp_path / "asym", config=AgentOSConfig(bits=4, group_size=32))
    with pytest.raises(ExportError, match=r"sym=True.*dequantize=True|dequantize=True.*sym=True"):
        export(src, "compressed-tensors", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    summary = export(src, "compressed-tensors", tmp_path / "out", requantize=True)
    assert len(summary["requantized_tensors"]) == 14 and 0 < summary["max_abs_weight_error"] < 0.05


def test_group_that_does_not_divide_is_refused(tmp_path):
    src = tiny_checkpoint(tmp_path / "g64", config=AgentOSConfig(bits=4, group_size=64, sym=True))  # 96 inputs
    with pytest.raises(ExportError, match="group_size=64 does not divide in_features=96.*group_size=32"):
        export(src, "compressed-tensors", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_float_model_is_refused(tmp_path):
    with pytest.raises(ExportError, match="needs a quantized checkpoint"):
        export(tiny_checkpoint(tmp_path / "float"), "compressed-tensors", tmp_path / "out")
