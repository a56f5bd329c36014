import json

import pytest

from optimum_agentos import FORMAT_VERSION, AgentOSConfig, __version__
from optimum_agentos.config import CheckpointVersionError


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(bits=5), "bits=5 is not supported"),
        (dict(bits=1), "bits=1"),
        (dict(group_size=100), "power of two"),
        (dict(group_size=0), "power of two"),
        (dict(method="hqq"), "method='hqq'"),
        (dict(damp_percent=1.5), "damp_percent"),
        (dict(target=["re:("]), "not a valid regex"),
        (dict(scale_dtype="int8"), "scale_dtype"),
    ],
)
def test_bad_values_are_rejected_with_the_fix(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AgentOSConfig(**kwargs)


def test_json_round_trip_and_versions():
    config = AgentOSConfig(bits=3, group_size=64, sym=True, method="gptq", act_order=True, target=["q_proj"])
    data = json.loads(config.to_json_string())
    assert data["quant_method"] == "agentos"
    assert data["format_version"] == FORMAT_VERSION and data["library_version"] == __version__
    assert AgentOSConfig.from_dict(data).to_dict() == config.to_dict()


def test_defaults_keep_head_and_embeddings_in_full_precision():
    assert "lm_head" in AgentOSConfig().ignore


def test_unknown_keys_are_rejected():
    with pytest.raises(ValueError, match="Unknown agentos quantization_config keys \\['grup_size'\\]"):
        AgentOSConfig.from_dict({"bits": 4, "grup_size": 64})


def test_newer_format_version_names_the_upgrade():
    with pytest.raises(CheckpointVersionError, match="pip install -U optimum-agentos"):
        AgentOSConfig.from_dict({"format_version": FORMAT_VERSION + 1, "library_version": "9.0.0"})


@pytest.mark.parametrize(
    "data,match",
    [
        ({"sym": "false"}, r"sym='false' \(str\) must be a boolean"),
        ({"act_order": 1}, r"act_order=1 \(int\) must be a boolean"),
        ({"bits": 4.0}, r"bits=4.0 \(float\) must be an integer"),
        ({"bits": True}, r"bits=True \(bool\) must be an integer"),
        ({"group_size": "128"}, r"group_size='128' \(str\) must be an integer"),
        ({"damp_percent": "0.01"}, r"damp_percent='0.01' \(str\) must be a finite number"),
        ({"damp_percent": float("nan")}, r"damp_percent=nan \(float\) must be a finite number"),
        ({"method": 1}, r"method=1 \(int\) must be a string"),
        ({"target": "q_proj"}, r"target='q_proj' \(str\) must be a list of non-empty strings"),
        ({"ignore": ["lm_head", 3]}, r"ignore=\['lm_head', 3\] \(list\) must be a list of non-empty strings"),
        ({"bits": None, "sparse_layers": {"a": 1.5}}, r"sparse_layers\['a'\]=1.5 must be a count"),
        ({"bits": None, "module_shapes": {"a": [True, 3]}}, r"module_shapes\['a'\]=\[True, 3\] must be"),
        ({"sparsity_pattern": 24}, r"sparsity_pattern=24 \(int\) must be a string"),
        ({"pruning": ["magnitude"]}, r"pruning=\['magnitude'\] \(list\) must be a mapping"),
        ({"format_version": "2"}, r"format_version='2' \(str\) must be an integer from 1 to"),
        ({"format_version": 0}, r"format_version=0 \(int\) must be an integer from 1 to"),
        ({"library_version": 1}, r"library_version=1 \(int\) must be a string"),
        ({"quant_method": "gptq"}, r"quant_method='gptq': this config class reads quant_method='agentos' only"),
    ],
)
def test_wrong_types_in_config_json_name_key_value_and_expectation(data, match):
    with pytest.raises(ValueError, match=match):
        AgentOSConfig.from_dict({"bits": 4, **data})


def test_constructor_checks_types_too():
    with pytest.raises(ValueError, match="target='q_proj'"):  # not silently ['q', '_', 'p', ...]
        AgentOSConfig(target="q_proj")
    with pytest.raises(ValueError, match="sym='yes'"):
        AgentOSConfig(sym="yes")
    assert AgentOSConfig(target=("q_proj",)).target == ["q_proj"]


def test_quantization_config_must_be_a_mapping():
    with pytest.raises(ValueError, match="quantization_config must be a mapping .* got list"):
        AgentOSConfig.from_dict([("bits", 4)])


def test_newer_format_version_asks_for_an_upgrade_before_reporting_its_new_keys():
    data = {"bits": 4, "format_version": FORMAT_VERSION + 1, "library_version": "9.0.0", "a_key_from_the_future": 1}
    with pytest.raises(CheckpointVersionError, match="written by optimum-agentos 9.0.0.*Upgrade optimum-agentos"):
        AgentOSConfig.from_dict(data)


def test_every_older_format_version_still_reads():
    for version in range(1, FORMAT_VERSION + 1):
        assert AgentOSConfig.from_dict({"bits": 4, "format_version": version}).format_version == version


@pytest.mark.parametrize(
    "data,match",
    [
        ({"sparsity": "0.5"}, r"sparsity='0.5' \(str\) must be a finite number"),
        ({"pattern": 24}, r"pattern=24 \(int\) must be a string"),
        ({"layer_sparsity": {"mlp": "0.6"}}, r"layer_sparsity\['mlp'\]='0.6' \(str\) must be a number"),
        ({"layer_sparsity": ["mlp"]}, r"layer_sparsity=\['mlp'\] \(list\) must be a mapping"),
        ({"target": "mlp"}, r"target='mlp' \(str\) must be a list of non-empty strings"),
        ({"ignore": ["re:("]}, r"ignore pattern 're:\(' is not a valid regex"),
        ({"block_size": 16.0}, r"block_size=16.0 \(float\) must be an integer"),
        ({"attention_groups": True}, r"attention_groups=True \(bool\) must be an integer"),
        ({"uniform": "false"}, r"uniform='false' \(str\) must be a boolean"),
        ({"mlp_neurons": None}, r"mlp_neurons=None \(NoneType\) must be a finite number"),
    ],
)
def test_pruning_config_rejects_wrong_types(data, match):
    from optimum_agentos.pruning.config import PruningConfig

    with pytest.raises(ValueError, match=match):
        PruningConfig.from_dict({"method": "magnitude", **data})
    with pytest.raises(ValueError, match="must be a mapping"):
        PruningConfig.from_dict("magnitude")
