"""Perplexity with the GPTQ protocol, so baseline and compressed models are scored on exactly the same tokens.

Protocol: the split's rows joined (`"\\n\\n"` for wikitext2), tokenized once without special tokens, cut into
non-overlapping windows of `seq_len` tokens from the start; perplexity is exp of the mean next-token negative
log-likelihood over every predicted token of the first `num_windows` windows.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers.utils import logging

from ..data import load_text, tokenize_text, windows_from_ids


logger = logging.get_logger(__name__)


def _model_device(model) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def perplexity_from_ids(
    model,
    input_ids: torch.Tensor,
    seq_len: int = 512,
    num_windows: int | None = None,
    batch_size: int = 1,
    bos_token_id: int | None = None,
    show_progress: bool = True,
    device=None,
) -> float:
    """Perplexity of a causal LM over non-overlapping windows of precomputed token ids.

    Without `bos_token_id` each window predicts its tokens 2..seq_len from the ones before (seq_len - 1 predicted
    tokens per window, as in GPTQ). With `bos_token_id` the id is prepended to every window and all seq_len window
    tokens are predicted. Losses are summed in float32 and divided by the number of predicted tokens.

    Args:
        model: a causal LM returning `.logits` `[batch, length, vocab]`; evaluated in eval mode on its own device
            (its training flag is restored afterwards).
        input_ids (`torch.Tensor`): `[N]` or `[1, N]` token ids.
        seq_len (`int`, *optional*, defaults to `512`): tokens per window.
        num_windows (`int`, *optional*): how many windows from the start; `None` uses every full window.
        batch_size (`int`, *optional*, defaults to `1`): windows per forward pass.
        bos_token_id (`int`, *optional*): id to prepend to each window.
        show_progress (`bool`, *optional*, defaults to `True`): show a tqdm bar over windows.
        device (`str` or `torch.device`, *optional*): where to evaluate (`"cpu"`, `"cuda"`, `"cuda:1"`, `"auto"`);
            the model moves there for the evaluation and back after. `None`: where the model is.

    Raises:
        `ValueError`: fewer than `num_windows` full windows, `seq_len` too short to predict anything, or a
            `device` this machine does not have.
    """
    if bos_token_id is None and seq_len < 2:
        raise ValueError("seq_len must be >= 2 to predict at least one token per window.")
    windows = windows_from_ids(torch.as_tensor(input_ids), num_windows, seq_len)
    if bos_token_id is not None:
        windows = torch.cat([torch.full((windows.shape[0], 1), bos_token_id, dtype=torch.long), windows], dim=1)
    home = _model_device(model)
    if device is not None:
        from ..nn.devices import resolve_device

        device = resolve_device(device)  # a missing accelerator is a clear error before anything moves
    if device is None or device == home:
        device = home
    else:
        model.to(device)
    try:
        return _perplexity_on_device(model, windows, batch_size, show_progress, device)
    finally:
        if device != home:
            model.to(home)


def _perplexity_on_device(model, windows: torch.Tensor, batch_size: int, show_progress: bool, device) -> float:
    extra = {"use_cache": False} if hasattr(getattr(model, "config", None), "use_cache") else {}
    was_training = model.training
    model.eval()
    total_nll, total_tokens = 0.0, 0
    progress = tqdm(total=windows.shape[0], desc="Perplexity", unit="window", disable=not show_progress)
    try:
        with torch.inference_mode():
            for batch in torch.split(windows, batch_size):
                batch = batch.to(device)
                logits = model(input_ids=batch, **extra).logits
                # Position t predicts token t + 1; the last position predicts nothing inside the window.
                shifted = logits[:, :-1, :].float()
                targets = batch[:, 1:]
                nll = F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1), reduction="sum")
                total_nll += nll.item()
                total_tokens += targets.numel()
                progress.update(batch.shape[0])
                progress.set_postfix(ppl=f"{math.exp(total_nll / total_tokens):.3f}")
    finally:
        progress.close()
        model.train(was_training)
    ppl = math.exp(total_nll / total_tokens)
    logger.info(f"Perplexity {ppl:.4f} over {windows.shape[0]} windows ({total_tokens} predicted tokens)")
    return ppl


def perplexity(
    model,
    tokenizer,
    dataset: str = "wikitext2",
    split: str = "test",
    seq_len: int = 512,
    num_windows: int | None = 64,
    batch_size: int = 1,
    add_bos: bool = False,
    show_progress: bool = True,
    device=None,
) -> float:
    """Perplexity of a causal LM on a dataset split (GPTQ protocol, see the module docstring).

    Args:
        model: a causal LM (`AutoModelForCausalLM`), on any device.
        tokenizer: its tokenizer.
        dataset (`str`, *optional*, defaults to `"wikitext2"`): dataset name (see `optimum_agentos.data.DATASETS`).
        split (`str`, *optional*, defaults to `"test"`): dataset split.
        seq_len (`int`, *optional*, defaults to `512`): tokens per window.
        num_windows (`int`, *optional*, defaults to `64`): windows from the start of the split; `None` = all.
        batch_size (`int`, *optional*, defaults to `1`): windows per forward pass.
        add_bos (`bool`, *optional*, defaults to `False`): prepend the tokenizer's BOS to each window.
        show_progress (`bool`, *optional*, defaults to `True`): show a tqdm bar over windows.
        device (`str` or `torch.device`, *optional*): where to evaluate (see `perplexity_from_ids`).
    """
    bos = None
    if add_bos:
        bos = tokenizer.bos_token_id
        if bos is None:
            raise ValueError("add_bos=True but the tokenizer has no bos_token_id.")
    ids = tokenize_text(tokenizer, load_text(dataset, split))
    return perplexity_from_ids(model, ids, seq_len, num_windows, batch_size, bos, show_progress, device)
