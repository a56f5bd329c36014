"""`export()` and `optimum-agentos export`: clear errors naming what exports, nothing written on failure, the same
save rules as every checkpoint, a card with the format and the base model, push and the recipe step."""

from __future__ import annotations

import json

import pytest
import yaml

from optimum_agentos import AgentOSConfig
from optimum_agentos.cli import main
from optimum_agentos.export import ExportError, export
from optimum_agentos.formats import UnsafeOverwriteError
from optimum_agentos.quantization.quantizer import Quantizer

from ..conftest import build_tiny, run_python
from ..test_hub_push import hub, hub_env  # noqa: F401  (the local Hub fixture)
from .tiny import VOCAB, tiny_checkpoint, tiny_tokenizer


@pytest.fixture(scope="module")
def int4(tmp_path_factory):
    """An int4 checkpoint whose card names its Hub base model (as `Quantizer.from_pretrained(hub_id)` records)."""
    folder = tmp_path_factory.mktemp("src") / "int4"
    model = build_tiny("llama", vocab_size=VOCAB)
    Quantizer(model, tiny_tokenizer(), source="HuggingFaceTB/SmolLM2-135M-Instruct").quantize(
        folder, AgentOSConfig(bits=4, group_size=32))
    return folder


def test_asymmetric_int8_names_the_exact_configuration_and_writes_nothing(tmp_path):
    src = tiny_checkpoint(tmp_path / "q8", config=AgentOSConfig(bits=8, group_size=32))
    with pytest.raises(ExportError, match=r"asymmetric int8 has no GGUF type: quantize with sym=True.*--requantize"):
        export(src, "gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("*agentos-tmp*"))
    summary = export(src, "gguf", tmp_path / "out", requantize=True)  # re-encoded to Q8_0, the error reported
    assert summary["tensor_types"]["Q8_0"] == 14 and len(summary["requantized_tensors"]) == 14
    assert 0 < summary["max_abs_weight_error"] < 0.01
    assert "re-quantized" in (tmp_path / "out" / "README.md").read_text()


def test_group_size_that_splits_no_block_is_refused(tmp_path):
    src = tiny_checkpoint(tmp_path / "g16", config=AgentOSConfig(bits=4, group_size=16))
    with pytest.raises(ExportError, match="group_size=32, 64 or 128"):
        export(src, "gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["gpt2", "opt"])
def test_unsupported_architecture_names_the_supported_ones(tmp_path, kind):
    model = build_tiny(kind)
    with pytest.raises(ExportError, match=r"supports the model types llama, mistral, qwen2"):
        export(model, "gguf", tmp_path / "out", tokenizer=tiny_tokenizer())
    assert not (tmp_path / "out").exists()


def test_unknown_format_is_named_before_loading(tmp_path):
    with pytest.raises(ExportError, match="supported: gguf, onnx, compressed-tensors"):
        export(tmp_path / "does-not-exist", "tflite", tmp_path / "out")


def test_user_files_are_never_replaced(tmp_path, int4):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UnsafeOverwriteError, match="notes.txt"):
        export(int4, "gguf", out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"


def test_reexport_needs_overwrite_and_replaces_atomically(tmp_path, int4):
    first = export(int4, "gguf", tmp_path / "out")
    with pytest.raises(FileExistsError, match="overwrite"):
        export(int4, "gguf", tmp_path / "out")
    second = export(int4, "gguf", tmp_path / "out", overwrite=True)
    assert second["files"] == first["files"]
    manifest = json.loads((tmp_path / "out" / "agentos_manifest.json").read_text())
    assert set(manifest["files"]) == {"README.md", "agentos_export.json", first["gguf_file"]}


def test_card_records_format_and_lineage_and_push_uploads_it(tmp_path, int4, hub):  # noqa: F811
    out = tmp_path / "gguf"
    export(int4, "gguf", out)
    card = (out / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta["base_model_relation"] == "quantized"
    assert meta["library_name"] == "gguf" and {"gguf", "int4", "optimum-agentos"} <= set(meta["tags"])
    info = json.loads((out / "agentos_export.json").read_text())
    assert info["source_config"]["bits"] == 4 and info["summary"]["tensor_types"]["Q4_1"] == 14
    run_python(f"""
        from optimum_agentos.hub.push import push_folder
        push_folder({str(out)!r}, "me/tiny-gguf")
        """, env=hub_env(hub, tmp_path, "pusher"))
    files = hub.files("me/tiny-gguf")
    assert {"README.md", "agentos_export.json", "model-Q4_1.gguf"} <= set(files)
    assert files["model-Q4_1.gguf"] == (out / "model-Q4_1.gguf").read_bytes()


def test_cli_exports_and_reports_user_errors(tmp_path, int4, capsys):
    assert main(["export", "--model", str(int4), "--format", "gguf", "--output", str(tmp_path / "out")]) == 0
    assert "model-Q4_1.gguf" in capsys.readouterr().out
    assert main(["export", "--model", str(int4), "--format", "gguf", "--output", str(tmp_path / "out")]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_recipe_export_step(tmp_path, int4):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {int4}\noutput: {tmp_path / 'run'}\nsteps:\n  - export: {{format: gguf}}\n")
    assert main(["run", str(recipe)]) == 0
    assert (tmp_path / "run" / "01-export" / "model-Q4_1.gguf").is_file()


def test_the_package_is_the_function(tmp_path):
    import optimum_agentos

    assert callable(optimum_agentos.export) and optimum_agentos.export.export is export
    with pytest.raises(ExportError, match="Unknown export format"):
        optimum_agentos.export(tmp_path, "tflite", tmp_path / "out")


def test_uneven_layer_widths_name_uniform_pruning(tmp_path):
    from optimum_agentos import Pruner, PruningConfig

    tokenizer = tiny_tokenizer()
    ids = tokenizer("The quick brown fox jumps over the lazy dog. " * 8, return_tensors="pt").input_ids[:, :48]
    Pruner(build_tiny("llama", vocab_size=VOCAB, num_hidden_layers=3), tokenizer).prune(
        tmp_path / "src", PruningConfig(method=None, mlp_neurons=0.3, uniform=False), calibration_dataset=ids.repeat(
            2, 1), num_samples=2, seq_len=48, float_dtype="float32")
    with pytest.raises(ExportError, match=r"differ in width \(ffn: \[.*uniform=True"):
        export(tmp_path / "src", "gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()
