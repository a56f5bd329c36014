"""The tokenizer metadata of a GGUF file, built so that llama.cpp tokenizes exactly like the Hugging Face tokenizer.

Supported: byte-level BPE tokenizers (GPT-2 style: SmolLM2, Llama 3, Qwen2, Mistral's Tekken-free BPE models). The
vocabulary and merges are written as they are; llama.cpp's pre-tokenizer (`tokenizer.ggml.pre`) is chosen from the
Hugging Face pre-tokenizer's own splitting rule (plain byte-level: `gpt-2`; the Llama 3 and Qwen2 split patterns:
`llama-bpe`, `qwen2`), never guessed from the model name. Anything else stops with an `ExportError`.
"""

from __future__ import annotations

import json

from gguf import GGUFWriter, TokenType

from .layers import ExportError

# The split patterns of Hugging Face pre-tokenizers and the llama.cpp pre-tokenizer applying the same rule.
_LETTERS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+"
_REST = r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
SPLIT_PATTERNS = {
    _LETTERS + r"|\p{N}{1,3}|" + _REST: "llama-bpe",
    _LETTERS + r"|\p{N}|" + _REST: "qwen2",
}
SUPPORTED = "byte-level BPE tokenizers (GPT-2 style, as SmolLM2; the Llama 3 and Qwen2 split patterns)"


def _pre_tokenizer_name(spec: dict | None) -> str:
    """llama.cpp's `tokenizer.ggml.pre` for a tokenizer.json `pre_tokenizer`, or `ExportError`."""
    steps = (spec or {}).get("pretokenizers") if (spec or {}).get("type") == "Sequence" else [spec or {}]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        pattern = steps[0].get("pattern", {}).get("Regex")
        if pattern in SPLIT_PATTERNS:
            return SPLIT_PATTERNS[pattern]
    raise ExportError(f"The tokenizer's pre-tokenizer ({json.dumps(spec)[:200]}) has no llama.cpp equivalent known to "
                      f"this exporter; supported: {SUPPORTED}.")


def _adds(tokenizer, bos_id, eos_id) -> tuple[bool, bool]:
    """Whether encoding adds the BOS / EOS token (llama.cpp's add_bos_token / add_eos_token)."""
    ids = tokenizer("a").input_ids
    extra = len(ids) > len(tokenizer("a", add_special_tokens=False).input_ids)
    return (extra and bos_id is not None and ids[0] == bos_id), (extra and eos_id is not None and ids[-1] == eos_id)


def add_vocab(writer: GGUFWriter, tokenizer, vocab_size: int) -> dict:
    """Write `tokenizer.ggml.*` for a byte-level BPE tokenizer whose ids fit a `vocab_size` embedding."""
    if tokenizer is None:
        raise ExportError("A GGUF file carries its tokenizer, and none was found: save the checkpoint with its "
                          "tokenizer, or pass tokenizer= to export().")
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ExportError(f"{type(tokenizer).__name__} is a slow (Python) tokenizer; GGUF export reads the fast "
                          f"tokenizer's tokenizer.json. Supported: {SUPPORTED}.")
    spec = json.loads(backend.to_str())
    model = spec["model"]
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise ExportError(f"GGUF export supports {SUPPORTED}; this tokenizer is a {model.get('type')} model"
                          f"{' with byte fallback (sentencepiece style)' if model.get('byte_fallback') else ''}.")
    pre = _pre_tokenizer_name(spec.get("pre_tokenizer"))
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    by_id = {i: t for t, i in model["vocab"].items()}
    by_id.update({i: t["content"] for i, t in added.items()})
    if max(by_id) >= vocab_size:
        raise ExportError(f"The tokenizer has ids up to {max(by_id)} but the model's embedding has {vocab_size} rows.")
    tokens, types = [], []
    for i in range(vocab_size):
        if i in added:
            types.append(TokenType.CONTROL if added[i].get("special") else TokenType.USER_DEFINED)
        else:
            types.append(TokenType.NORMAL if i in by_id else TokenType.UNUSED)
        tokens.append(by_id.get(i, f"[PAD{i}]"))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)

    special = {kind: getattr(tokenizer, f"{kind}_token_id", None) for kind in ("bos", "eos", "unk", "pad")}
    for kind, token in special.items():
        if token is not None:
            getattr(writer, f"add_{kind}_token_id")(token)
    add_bos, add_eos = _adds(tokenizer, special["bos"], special["eos"])
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(add_eos)
    writer.add_add_space_prefix(False)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        writer.add_chat_template(template)
    return {"tokenizer": "gpt2", "pre_tokenizer": pre, "tokens": len(tokens), "merges": len(merges),
            "add_bos_token": add_bos}
