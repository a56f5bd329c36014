"""push_to_hub / push_folder with the real huggingface_hub client against a local Hub endpoint, then load back by
repo id in a fresh process with an empty cache."""


import pytest
import torch

from optimum_agentos import AgentOSConfig
from optimum_agentos.quantization.quantizer import Quantizer

from .conftest import build_tiny, model_output, run_python, run_python_expect_failure, sample_ids
from .hub_server import LocalHub

TOKEN = "hf_localtesttoken0123456789"


def hub_env(hub, tmp_path, name, token=True):
    env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / name), "HF_HUB_DISABLE_XET": "1",
           "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1"}
    if token:
        env["HF_TOKEN"] = TOKEN
    return env


@pytest.fixture
def hub():
    with LocalHub() as server:
        yield server


@pytest.fixture
def checkpoint(tmp_path):
    model = build_tiny("llama")
    Quantizer(model).quantize(tmp_path / "ckpt", AgentOSConfig(bits=4, group_size=64))
    torch.save({"ids": sample_ids(), "logits": model_output(model, sample_ids())}, tmp_path / "expected.pt")
    return tmp_path / "ckpt"


LOAD_BACK = """
import torch, optimum_agentos
from transformers import AutoModelForCausalLM
expected = torch.load({expected!r}, weights_only=True)
model = AutoModelForCausalLM.from_pretrained({repo!r}, revision={revision!r})
with torch.no_grad():
    print("EQUAL", torch.equal(model(input_ids=expected["ids"]).logits, expected["logits"]))
"""


def test_model_push_to_hub_then_load_by_repo_id(hub, checkpoint, tmp_path):
    run_python(
        f"""
        import optimum_agentos
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(checkpoint)!r})
        model.push_to_hub("me/tiny-int4", private=True)
        """,
        env=hub_env(hub, tmp_path, "pusher"),
    )
    files = hub.files("me/tiny-int4")
    assert {"config.json", "model.safetensors"} <= set(files)
    assert hub.repos["me/tiny-int4"]["private"] is True
    assert b'"quant_method": "agentos"' in files["config.json"]
    writes = [r for r in hub.requests if r["method"] == "POST"]
    assert writes and all(r["authorization"] == f"Bearer {TOKEN}" for r in writes)
    out = run_python(LOAD_BACK.format(expected=str(tmp_path / "expected.pt"), repo="me/tiny-int4", revision="main"),
                     env=hub_env(hub, tmp_path, "fresh-cache", token=False))
    assert "EQUAL True" in out


def test_push_folder_to_a_branch_with_card(hub, checkpoint, tmp_path):
    run_python(
        f"""
        from optimum_agentos.hub.push import push_folder
        print(push_folder({str(checkpoint)!r}, "me/tiny-branch", revision="dev"))
        """,
        env=hub_env(hub, tmp_path, "pusher"),
    )
    dev = hub.files("me/tiny-branch", "dev")
    assert {"config.json", "model.safetensors", "README.md"} <= set(dev)
    assert "model.safetensors" not in hub.files("me/tiny-branch", "main")
    assert TOKEN.encode() not in dev["README.md"]
    out = run_python(LOAD_BACK.format(expected=str(tmp_path / "expected.pt"), repo="me/tiny-branch", revision="dev"),
                     env=hub_env(hub, tmp_path, "fresh-cache", token=False))
    assert "EQUAL True" in out


def test_push_without_credentials_fails_before_uploading(hub, checkpoint, tmp_path):
    stderr = run_python_expect_failure(
        f"""
        from optimum_agentos.hub.push import push_folder
        push_folder({str(checkpoint)!r}, "me/nothing")
        """,
        env={**hub_env(hub, tmp_path, "anon", token=False), "HF_TOKEN": ""},
    )
    assert "No Hugging Face token" in stderr and "Nothing was uploaded" in stderr
    assert hub.requests == [] and hub.repos == {}
