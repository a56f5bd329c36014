"""`compare` and the compression report: recovery, footprint measured in a fresh process, JSON/markdown/PNG."""

import json

import pytest
from transformers import AutoTokenizer, LlamaForCausalLM

from optimum_agentos import AgentOSConfig
from optimum_agentos.evaluation import CompressionReport, compare
from optimum_agentos.evaluation.measure import count_parameters
from optimum_agentos.models import resolve_model

from ..conftest import build_tiny


def tiny_lm_folder(folder, seed=0):
    """A tiny Llama that shares SmolLM2's tokenizer (so real text can be evaluated), saved with it."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))
    model = build_tiny("llama", seed, vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                       max_position_embeddings=256)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def lm_folder(tmp_path_factory):
    return tiny_lm_folder(tmp_path_factory.mktemp("tiny") / "fp32")


def quantized(folder, bits=4):
    model = LlamaForCausalLM.from_pretrained(folder, quantization_config=AgentOSConfig(bits=bits, group_size=32))
    return model


@pytest.mark.data
@pytest.mark.model("smollm2-135m")
def test_compare_report(lm_folder, tmp_path):
    report = compare(str(lm_folder), {"int4": quantized(lm_folder)}, tasks=["wikitext2"], ppl_windows=2, seq_len=64,
                     baseline_name="fp32")
    (row,) = report.rows()
    base = report.baseline.results[0]["value"]
    assert row["baseline"] == base and row["task"] == "wikitext2" and row["metric"] == "perplexity"
    assert row["recovery"] == pytest.approx(base / row["compressed"])  # lower is better: baseline / compressed
    fp, q = report.baseline.stats, report.models[0].stats
    assert q["size_mb"] < 0.5 * fp["size_mb"]  # int4 linears; embeddings stay fp32
    assert q["params"] == fp["params"]  # logical parameters, not packed bytes
    for stats in (fp, q):
        assert stats["prefill_tokens_per_s"] > 0 and stats["decode_tokens_per_s"] > 0 and stats["peak_rss_mb"] > 0
    report.save(tmp_path / "report")
    png = (tmp_path / "report" / "size_vs_quality.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "| wikitext2 | perplexity | 2 |" in markdown and "int4" in markdown and "peak RSS MiB" in markdown
    again = CompressionReport.load(tmp_path / "report")
    assert again.rows() == report.rows()
    assert report.failures(row["recovery"] - 1e-9) == [] and report.failures(row["recovery"] + 1e-6) == [row]


@pytest.mark.model("smollm2-135m")
def test_count_parameters_sees_through_packing(lm_folder):
    dense = LlamaForCausalLM.from_pretrained(lm_folder)
    total, nonzero = count_parameters(dense)
    assert total == dense.num_parameters() and nonzero == total
    q = quantized(lm_folder)
    assert count_parameters(q)[0] == total


@pytest.mark.data
@pytest.mark.model("smollm2-135m")
def test_zero_shot_report_rows_are_accuracy_ratios(lm_folder):
    report = compare(str(lm_folder), [quantized(lm_folder, bits=8)], tasks=["arc_easy"], limit=8, speed=False)
    (row,) = report.rows()
    assert row["metric"] == "acc" and row["n"] == 8
    expected = row["compressed"] / row["baseline"] if row["baseline"] and row["compressed"] else float("nan")
    assert row["recovery"] == pytest.approx(expected, nan_ok=True)
    json.dumps(report.to_dict(), default=str)
