"""Per-layer bits and group size (`AgentOSConfig.layer_overrides`): validated, stored in config.json, honoured by
GPTQ/RTN, quantize-on-load, the loader's tensor checks and a fresh process's reload."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from optimum_agentos import AgentOSConfig, QuantLinear
from optimum_agentos.formats import CorruptCheckpointError
from optimum_agentos.quantization.quantizer import Quantizer

from ..conftest import build_tiny, model_output, read_quant_config, run_python, sample_ids

OVERRIDES = {
    "model.layers.0.self_attn.q_proj": {"bits": 8, "group_size": -1},
    "model.layers.0.mlp.down_proj": {"bits": 2, "group_size": 64},
    "model.layers.1.mlp.up_proj": {"bits": 3},
}


def layer_formats(model) -> dict:
    return {n: (m.bits, m.group_size) for n, m in model.named_modules() if isinstance(m, QuantLinear)}


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_mixed_layers_save_and_reload_bit_exact_in_a_fresh_process(method, tmp_path):
    config = AgentOSConfig(bits=4, group_size=32, method=method, layer_overrides=OVERRIDES)
    ids = sample_ids()
    calibration = torch.randint(2, 128, (8, 32), generator=torch.Generator().manual_seed(3))
    model = Quantizer(build_tiny("llama")).quantize(tmp_path / "q", config, calibration if method == "gptq" else None)
    formats = layer_formats(model)
    assert formats["model.layers.0.self_attn.q_proj"] == (8, -1)
    assert formats["model.layers.0.mlp.down_proj"] == (2, 64)
    assert formats["model.layers.1.mlp.up_proj"] == (3, 32)
    assert formats["model.layers.1.self_attn.k_proj"] == (4, 32)
    stored = read_quant_config(tmp_path / "q")
    assert stored["layer_overrides"] == OVERRIDES and stored["format_version"] == 5
    torch.save({"ids": ids, "logits": model_output(model, ids), "formats": formats}, tmp_path / "expected.pt")
    out = run_python(f"""
        import torch, optimum_agentos
        from transformers import AutoModelForCausalLM
        from optimum_agentos import QuantLinear
        expected = torch.load({str(tmp_path / 'expected.pt')!r}, weights_only=True)
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'q')!r})
        formats = {{n: (m.bits, m.group_size) for n, m in model.named_modules() if isinstance(m, QuantLinear)}}
        assert formats == expected["formats"], formats
        with torch.no_grad():
            print("EQUAL", torch.equal(model(input_ids=expected["ids"]).logits, expected["logits"]))
    """)
    assert "EQUAL True" in out, out


def test_quantize_on_load_honours_layer_overrides(tmp_path):
    build_tiny("llama").save_pretrained(tmp_path / "fp")
    config = AgentOSConfig(bits=4, group_size=32, layer_overrides=OVERRIDES)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=config)
    formats = layer_formats(model)
    assert formats["model.layers.0.mlp.down_proj"] == (2, 64) and formats["model.layers.1.mlp.up_proj"] == (3, 32)
    ids = sample_ids()
    logits = model_output(model, ids)
    model.save_pretrained(tmp_path / "q")
    assert torch.equal(model_output(AutoModelForCausalLM.from_pretrained(tmp_path / "q"), ids), logits)


def test_a_config_json_whose_overrides_disagree_with_the_tensors_is_refused(tmp_path):
    model = Quantizer(build_tiny("llama")).quantize(tmp_path / "q", AgentOSConfig(bits=4, group_size=32,
                                                                                 layer_overrides=OVERRIDES))
    del model
    path = tmp_path / "q" / "config.json"
    data = json.loads(path.read_text())
    data["quantization_config"]["layer_overrides"]["model.layers.0.mlp.down_proj"] = {"bits": 4}
    path.write_text(json.dumps(data))
    with pytest.raises(CorruptCheckpointError, match="down_proj"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "q")


@pytest.mark.parametrize("overrides, message", [
    ({"a.q_proj": {"bits": 5}}, r"layer_overrides\['a.q_proj'\] bits=5 is not supported"),
    ({"a.q_proj": {"bits": 4.0}}, r"bits=4.0 is not supported"),
    ({"a.q_proj": {"group_size": 96}}, r"group_size=96 must be -1"),
    ({"a.q_proj": {"bit": 4}}, r"must be a non-empty mapping with keys from \('bits', 'group_size'\)"),
    ({"a.q_proj": {}}, r"non-empty mapping"),
    ({"a.q_proj": 4}, r"non-empty mapping"),
])
def test_bad_layer_overrides_are_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        AgentOSConfig(layer_overrides=overrides)


def test_overrides_with_w8a8_or_naming_an_unquantized_layer_are_refused(tmp_path):
    with pytest.raises(ValueError, match="layer_overrides .* is weight-only"):
        AgentOSConfig(bits=8, group_size=-1, activations="int8-dynamic", layer_overrides={"x": {"bits": 8}})
    config = AgentOSConfig(layer_overrides={"model.layers.0.self_attn.q_projj": {"bits": 8}})
    with pytest.raises(ValueError, match=r"layer_overrides names \['model.layers.0.self_attn.q_projj'\], not among"):
        Quantizer(build_tiny("llama")).quantize(tmp_path / "q", config)
    assert not (tmp_path / "q").exists()


def test_plain_configs_keep_their_old_format_version():
    assert "layer_overrides" not in AgentOSConfig().to_dict()
    assert AgentOSConfig().stamped().format_version == 1
    assert AgentOSConfig(layer_overrides={"x": {"bits": 8}}).stamped().format_version == 5
