"""Integration tests on the real SmolLM2-135M-Instruct (short eval slices, bounds from measured values)."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from optimum_agentos import AgentOSConfig
from optimum_agentos.formats import folder_size
from optimum_agentos.evaluation import perplexity
from optimum_agentos.models import resolve_model
from optimum_agentos.quantization.quantizer import Quantizer

from .conftest import REPO, run_python

pytestmark = pytest.mark.slow

EVAL = dict(dataset="wikitext2", split="test", seq_len=256, num_windows=8)


@pytest.fixture(scope="module")
def smollm2():
    return resolve_model("smollm2-135m")


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    return AutoTokenizer.from_pretrained(smollm2)


@pytest.fixture(scope="module")
def fp32_ppl(smollm2, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    return perplexity(model, tokenizer, **EVAL)


def quantize(smollm2, config, out, calibration=None):
    quantizer = Quantizer.from_pretrained(smollm2)
    quantizer.quantize(out, config, calibration, num_samples=16, seq_len=256)
    return quantizer.model


def test_int8_per_channel_is_within_half_a_percent(smollm2, tokenizer, fp32_ppl, tmp_path):
    model = quantize(smollm2, AgentOSConfig(bits=8, group_size=-1), tmp_path / "int8")
    ppl = perplexity(model, tokenizer, **EVAL)
    assert abs(ppl / fp32_ppl - 1) < 0.005, (ppl, fp32_ppl)


def test_int4_gptq_beats_rtn_is_small_and_reloads_in_a_fresh_process(smollm2, tokenizer, fp32_ppl, tmp_path):
    rtn_model = Quantizer.from_pretrained(smollm2).quantize_in_place(AgentOSConfig(bits=4, group_size=128))
    rtn_ppl = perplexity(rtn_model, tokenizer, **EVAL)
    model = quantize(smollm2, AgentOSConfig(bits=4, group_size=128, method="gptq"), tmp_path / "gptq", "wikitext2")
    gptq_ppl = perplexity(model, tokenizer, **EVAL)
    assert gptq_ppl < rtn_ppl and gptq_ppl < 1.3 * fp32_ppl, (fp32_ppl, rtn_ppl, gptq_ppl)
    # 576 input features in groups of 128: the last group of every attention/MLP-input layer holds 64 columns.
    assert model.model.layers[0].self_attn.q_proj.weight_scale.shape == (576, 5)
    assert folder_size(tmp_path / "gptq") <= 0.22 * folder_size(smollm2)
    card = (tmp_path / "gptq" / "README.md").read_text()
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card and "import optimum_agentos" in card
    assert str(tmp_path) not in card

    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.save({"ids": ids, "logits": model(ids).logits}, tmp_path / "expected.pt")
    out = run_python(
        f"""
        import torch, optimum_agentos
        from transformers import AutoModelForCausalLM
        expected = torch.load({str(tmp_path / 'expected.pt')!r}, weights_only=True)
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'gptq')!r})
        with torch.no_grad():
            print("EQUAL", torch.equal(model(expected["ids"]).logits, expected["logits"]))
        """
    )
    assert "EQUAL True" in out


def test_cli_quantize_writes_checkpoint_card_and_summary(tmp_path):
    out = tmp_path / "cli-int4"
    proc = subprocess.run(
        [sys.executable, "-m", "optimum_agentos.cli", "quantize", "--model", "smollm2-135m", "--bits", "4",
         "--method", "gptq", "--num-samples", "12", "--seq-len", "128", "--eval", "wikitext2", "--eval-windows", "2",
         "--output", str(out)],
        capture_output=True, text=True, cwd=REPO, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "agentos_summary.json").read_text())
    assert summary["bits"] == 4 and summary["size_mb"] < 0.22 * summary["baseline_size_mb"]
    assert summary["wikitext2_ppl_compressed"] < 1.5 * summary["wikitext2_ppl_baseline"]
    assert "wikitext2_ppl_compressed" in proc.stdout  # the summary table
    card = (out / "README.md").read_text()
    assert "optimum-agentos quantize --model smollm2-135m" in card and "perplexity" in card
    # A second run into the same folder without --overwrite is refused and leaves the checkpoint alone.
    before = (out / "model.safetensors").read_bytes()
    again = subprocess.run(
        [sys.executable, "-m", "optimum_agentos.cli", "quantize", "--model", "smollm2-135m", "--method", "rtn",
         "--output", str(out)], capture_output=True, text=True, cwd=REPO, timeout=600,
    )
    assert again.returncode != 0 and "--overwrite" in again.stderr
    assert (out / "model.safetensors").read_bytes() == before


@pytest.mark.data
@pytest.mark.parametrize("split", ["validation", "test"])
def test_calibration_prefix_tokenization_is_the_whole_splits_start(tokenizer, split):
    """Byte-level BPE: the prefix that calibration tokenizes (to save ~200 MiB) starts like the whole split."""
    from optimum_agentos.data import load_text, tokenize_prefix, tokenize_text

    text = load_text("wikitext2", split)
    whole = tokenize_text(tokenizer, text)
    for tokens in (1, 512, 8 * 512, 64 * 512, 128 * 512):
        assert torch.equal(tokenize_prefix(tokenizer, text, tokens)[:tokens], whole[:tokens])
