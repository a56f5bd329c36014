"""Language-model training windows from any text (`lm_dataset_from_text`) and from a standard split (`lm_dataset`)."""

import pytest
import torch
from transformers import AutoTokenizer

from optimum_agentos.data import load_text, tokenize_text
from optimum_agentos.distillation.tasks import lm_dataset, lm_dataset_from_text
from optimum_agentos.models import resolve_model


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_model("minilm-l6"))


@pytest.mark.model("minilm-l6")
def test_windows_of_the_users_own_text_are_its_consecutive_tokens(tokenizer):
    text = "\n".join(f"review {i}: the film was {'good' if i % 2 else 'slow'} and long." for i in range(40))
    ids = tokenize_text(tokenizer, text)
    data = lm_dataset_from_text(tokenizer, text, seq_len=16, num_windows=5)
    assert len(data) == 5
    windows = torch.tensor(data["input_ids"])
    assert torch.equal(windows.reshape(-1), ids[:80])
    assert data["labels"] == data["input_ids"]
    assert all(sum(mask) == 16 for mask in data["attention_mask"])
    every = lm_dataset_from_text(tokenizer, text, seq_len=16)  # None: every full window
    assert len(every) == ids.numel() // 16


@pytest.mark.model("minilm-l6")
def test_text_too_short_for_the_windows_says_how_many_fit(tokenizer):
    with pytest.raises(ValueError, match="full windows"):
        lm_dataset_from_text(tokenizer, "a short review.", seq_len=16, num_windows=2)


@pytest.mark.data
@pytest.mark.model("minilm-l6")
def test_standard_split_windows_are_its_first_tokens(tokenizer):
    by_name = lm_dataset(tokenizer, "wikitext2", "validation", seq_len=32, num_windows=3)
    ids = tokenizer(load_text("wikitext2", "validation")[:5000], add_special_tokens=False)["input_ids"]
    assert by_name["input_ids"] == [ids[i:i + 32] for i in (0, 32, 64)]  # the split's first 96 tokens, in order
