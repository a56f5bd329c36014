"""Every load/save path goes through transformers: quantize-on-load, save, fresh-process reload, hub cache."""

import json
import os
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import optimum_agentos
from optimum_agentos import AgentOSConfig, QuantLinear
from optimum_agentos.formats import CorruptCheckpointError, folder_size
from optimum_agentos.quantization.quantizer import Quantizer

from optimum_agentos.nn import qmath as rtn
from optimum_agentos.formats.kept_weights import round_kept_weights
from optimum_agentos.nn.linear import float_weight, is_conv1d
from optimum_agentos.nn.targets import resolve_targets

from ..conftest import (
    TINY_MODELS, build_tiny, model_output, read_quant_config, run_python, run_python_expect_failure, sample_ids,
)


def auto_for(kind):
    return AutoModelForSequenceClassification if kind == "bert" else AutoModelForCausalLM


def rtn_reference(kind, src, config):
    """The float model with each targeted weight replaced by its RTN dequantization: what quantize-on-load computes."""
    model = auto_for(kind).from_pretrained(src)
    dequantized = {}
    for name in resolve_targets(model, config.target, config.ignore):
        module = model.get_submodule(name)
        codes, scales, zeros = rtn.quantize_rtn(float_weight(module), config.bits, config.group_size, config.sym)
        deq = rtn.dequantize_codes(codes, scales, zeros, config.group_size)
        dequantized[name] = deq.t() if is_conv1d(module) else deq
    round_kept_weights(model, config.float_dtype)  # embeddings/head at float16 precision (targets overwritten next)
    for name, weight in dequantized.items():
        model.get_submodule(name).weight.data.copy_(weight)
    return model


@pytest.mark.parametrize("kind", list(TINY_MODELS))
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_quantize_on_load_matches_rtn_and_reloads_exactly(kind, bits, tiny_folder, tmp_path, monkeypatch):
    # the quantization math, compared at 1e-5: the reference path (the bf16 kernels are checked in test_kernels.py)
    monkeypatch.setenv("OPTIMUM_AGENTOS_KERNELS", "reference")
    src = tiny_folder(kind)
    config = AgentOSConfig(bits=bits, group_size=64)
    model = auto_for(kind).from_pretrained(src, quantization_config=config)
    quant_layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert quant_layers and all(m.bits == bits for m in quant_layers)
    assert any(m.in_features % 64 for m in quant_layers)  # the short-last-group case is exercised
    ids = sample_ids()
    logits = model_output(model, ids)
    torch.testing.assert_close(logits, model_output(rtn_reference(kind, src, config), ids), atol=1e-5, rtol=1e-4)

    model.save_pretrained(tmp_path / "q")
    saved = read_quant_config(tmp_path / "q")
    assert saved["quant_method"] == "agentos" and saved["bits"] == bits
    assert saved["format_version"] == 1  # no pruning keys: still readable by releases that know only version 1
    assert saved["library_version"] == optimum_agentos.__version__
    assert torch.equal(model_output(auto_for(kind).from_pretrained(tmp_path / "q"), ids), logits)


def test_every_family_reloads_in_a_fresh_process(tiny_folder, tmp_path):
    ids = sample_ids()
    torch.save(ids, tmp_path / "ids.pt")
    expected = {}
    for kind in TINY_MODELS:
        model = auto_for(kind).from_pretrained(tiny_folder(kind), quantization_config=AgentOSConfig(bits=4, group_size=64))
        model.save_pretrained(tmp_path / kind)
        expected[kind] = model_output(model, ids)
    torch.save(expected, tmp_path / "expected.pt")
    autos = {kind: auto_for(kind).__name__ for kind in TINY_MODELS}
    stdout = run_python(
        f"""
        import torch, transformers, optimum_agentos
        from optimum_agentos import QuantLinear
        ids = torch.load({str(tmp_path / 'ids.pt')!r}, weights_only=True)
        expected = torch.load({str(tmp_path / 'expected.pt')!r}, weights_only=True)
        for kind, auto in {autos!r}.items():
            model = getattr(transformers, auto).from_pretrained({str(tmp_path)!r} + "/" + kind)
            assert any(isinstance(m, QuantLinear) for m in model.modules())
            with torch.no_grad():
                print(kind, "EQUAL", torch.equal(model(input_ids=ids).logits, expected[kind]))
        """
    )
    assert stdout.count("EQUAL True") == len(TINY_MODELS), stdout


def test_checkpoint_is_smaller_on_disk(tiny_folder, tmp_path):
    src = tiny_folder("llama")
    model = AutoModelForCausalLM.from_pretrained(src, quantization_config=AgentOSConfig(bits=4, group_size=64))
    model.save_pretrained(tmp_path / "q4")
    linear_params = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantLinear))
    fp_bytes, q_bytes = folder_size(src), folder_size(tmp_path / "q4")
    # The quantized linears shrink from 4 bytes to 0.5 byte per weight (+ scales); embeddings/head stay float.
    assert fp_bytes - q_bytes > 0.8 * linear_params * 3.5


def test_kept_float_weights_are_stored_in_float16(tiny_folder, tmp_path):
    from safetensors import safe_open

    model = AutoModelForCausalLM.from_pretrained(tiny_folder("llama"), quantization_config=AgentOSConfig(bits=4))
    assert model.model.embed_tokens.weight.dtype == torch.float32
    model.save_pretrained(tmp_path / "q")
    with safe_open(tmp_path / "q" / "model.safetensors", "pt") as f:
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == "F16"
        assert f.get_slice("lm_head.weight").get_dtype() == "F16"
        assert f.get_slice("model.norm.weight").get_dtype() == "F32"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert reloaded.model.embed_tokens.weight.dtype == torch.float32
    assert torch.equal(reloaded.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_plain_transformers_without_the_import_fails_loudly(tiny_folder, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_folder("llama"), quantization_config=AgentOSConfig(bits=8))
    model.save_pretrained(tmp_path / "q8")
    stderr = run_python_expect_failure(
        f"""
        from transformers import AutoModelForCausalLM
        AutoModelForCausalLM.from_pretrained({str(tmp_path / 'q8')!r})
        """
    )
    assert "mismatch" in stderr.lower() or "ignore_mismatched_sizes" in stderr


def test_offline_load_by_repo_id_from_hub_cache(tiny_folder, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_folder("qwen2"), quantization_config=AgentOSConfig(bits=4))
    export = tmp_path / "export"
    model.save_pretrained(export)
    # The layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<commit>/...}.
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf_home" / "hub" / "models--agentos-test--tiny-qwen2-int4"
    shutil.copytree(export, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    torch.save(model_output(model, sample_ids()), tmp_path / "logits.pt")
    stdout = run_python(
        f"""
        import torch, optimum_agentos
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained("agentos-test/tiny-qwen2-int4")
        ids = torch.randint(2, 128, (4, 24), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            print("EQUAL", torch.equal(model(input_ids=ids).logits, torch.load({str(tmp_path / 'logits.pt')!r})))
        """,
        env={"HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1"},
    )
    assert "EQUAL True" in stdout


def test_truncated_safetensors_names_the_file(tiny_folder, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_folder("llama"), quantization_config=AgentOSConfig(bits=4))
    model.save_pretrained(tmp_path / "q")
    weights = tmp_path / "q" / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)
    with pytest.raises(CorruptCheckpointError, match="model.safetensors is truncated or corrupt"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "q")


def test_newer_format_version_refuses_to_load(tiny_folder, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_folder("llama"), quantization_config=AgentOSConfig(bits=4))
    model.save_pretrained(tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    config["quantization_config"]["format_version"] = optimum_agentos.FORMAT_VERSION + 1
    (tmp_path / "q" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="reads up to version"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "q")


@pytest.mark.parametrize(
    "config,match",
    [
        (AgentOSConfig(target=["no_such_layer"]), "matches no module"),
        (AgentOSConfig(group_size=512), "exceeds the input width of every selected layer"),
        (AgentOSConfig(target=["re:.*norm.*"]), "unsupported layer types"),
        (AgentOSConfig(ignore=["re:.*"]), "No quantizable layer"),
    ],
)
def test_bad_targets_fail_before_loading(config, match, tiny_folder):
    with pytest.raises(ValueError, match=match):
        AutoModelForCausalLM.from_pretrained(tiny_folder("llama"), quantization_config=config)


def test_quantize_on_load_refuses_gptq(tiny_folder):
    with pytest.raises(ValueError, match="Quantize-on-load only supports method='rtn'"):
        AutoModelForCausalLM.from_pretrained(tiny_folder("llama"), quantization_config=AgentOSConfig(method="gptq"))


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_gptq_quantizer_checkpoint_reloads_identically(kind, tmp_path):
    model = build_tiny(kind)
    ids = sample_ids(12, 32)  # 384 tokens: GPT-2's widest layer (c_proj) reads 4 x 96 inputs
    reference = last_hidden(model, ids)
    rtn_model = Quantizer(build_tiny(kind)).quantize_in_place(AgentOSConfig(bits=3, group_size=64))
    quantizer = Quantizer(model)
    quantizer.quantize(tmp_path / "gptq", AgentOSConfig(bits=3, group_size=64, method="gptq"), calibration_dataset=ids)
    logits = model_output(model, ids)
    # On its own calibration data GPTQ's last block output lands closer to the float model's than RTN's does.
    assert (last_hidden(model, ids) - reference).norm() < 0.8 * (last_hidden(rtn_model, ids) - reference).norm()
    reloaded = auto_for(kind).from_pretrained(tmp_path / "gptq")
    assert torch.equal(model_output(reloaded, ids), logits)
    assert (tmp_path / "gptq" / "README.md").exists()


def last_hidden(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, output_hidden_states=True).hidden_states[-1]


def test_failed_save_keeps_the_old_checkpoint(tmp_path):
    target = tmp_path / "ckpt"
    Quantizer(build_tiny("llama")).quantize(target, AgentOSConfig(bits=4))
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    class Boom(RuntimeError):
        pass

    quantizer = Quantizer(build_tiny("llama", seed=3))
    original = quantizer.model.save_pretrained

    def save_then_fail(folder, **kwargs):
        original(folder, **kwargs)
        raise Boom("disk full")

    quantizer.model.save_pretrained = save_then_fail
    with pytest.raises(Boom):
        quantizer.quantize(target, AgentOSConfig(bits=4))
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary folder left behind


def test_refuses_to_overwrite_unless_asked(tmp_path):
    Quantizer(build_tiny("llama")).quantize(tmp_path / "c", AgentOSConfig(bits=4))
    with pytest.raises(FileExistsError, match="overwrite=True"):
        Quantizer(build_tiny("llama")).quantize(tmp_path / "c", AgentOSConfig(bits=4), overwrite=False)
