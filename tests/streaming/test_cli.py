"""`optimum-agentos quantize/prune --streaming [--device]`: the command writes what the Python API writes in memory,
tensor for tensor, and refuses options that need the model in memory."""

from __future__ import annotations

import pytest

from optimum_agentos import AgentOSConfig, Pruner, PruningConfig, Quantizer
from optimum_agentos.cli import main

from ..evaluation.test_report import tiny_lm_folder
from .test_streamed import assert_same_checkpoint

CALIBRATION = ["--calibration-dataset", "wikitext2", "--num-samples", "4", "--seq-len", "64"]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return tiny_lm_folder(tmp_path_factory.mktemp("cli-stream") / "fp32")


def test_quantize_streaming_equals_in_memory(source, tmp_path):
    assert main(["quantize", "--model", str(source), "--output", str(tmp_path / "cli"), "--method", "gptq",
                 "--group-size", "32", "--streaming", "--device", "cpu", "--buffer-memory", "1MB",
                 "--spill-dir", str(tmp_path / "spill"), *CALIBRATION]) == 0
    config = AgentOSConfig(bits=4, group_size=32, method="gptq")
    Quantizer.from_pretrained(source).quantize(tmp_path / "api", config, "wikitext2", num_samples=4, seq_len=64)
    assert_same_checkpoint(tmp_path / "api", tmp_path / "cli")
    assert (tmp_path / "cli" / "tokenizer.json").is_file() and (tmp_path / "cli" / "README.md").is_file()
    assert "--streaming" in (tmp_path / "cli" / "README.md").read_text()  # the card records the command


def test_prune_streaming_equals_in_memory(source, tmp_path):
    assert main(["prune", "--model", str(source), "--output", str(tmp_path / "cli"), "--method", "sparsegpt",
                 "--sparsity", "0.5", "--streaming", *CALIBRATION]) == 0
    Pruner.from_pretrained(source).prune(tmp_path / "api", PruningConfig(method="sparsegpt", sparsity=0.5),
                                         "wikitext2", num_samples=4, seq_len=64)
    assert_same_checkpoint(tmp_path / "api", tmp_path / "cli")


def test_streaming_refuses_eval_in_one_line(source, tmp_path, capsys):
    code = main(["quantize", "--model", str(source), "--output", str(tmp_path / "o"), "--streaming", "--eval",
                 "wikitext2", *CALIBRATION])
    assert code != 0 and "--eval" in capsys.readouterr().err and not (tmp_path / "o").exists()
