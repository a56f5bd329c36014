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
        (dict(method="awq"), "method='awq'"),
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
