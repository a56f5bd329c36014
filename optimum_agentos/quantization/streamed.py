"""`Quantizer.quantize` on a streamed checkpoint (`Quantizer.from_pretrained(path, streaming=True)`): the same RTN
and GPTQ steps as in memory, run one block at a time with each block written as soon as it is quantized, so the
output is the in-memory path's, tensor for tensor."""

from __future__ import annotations

from tqdm.auto import tqdm
from transformers.utils import logging

from ..calibration.data import check_calibration_size
from ..calibration.runner import find_blocks, run_blockwise
from ..config import AgentOSConfig
from ..formats.replace import check_group_size
from ..nn.memory import release_free_memory
from ..nn.targets import resolve_targets
from ..streaming.pipeline import run_streamed
from .embedding import quantize_embeddings
from .rtn import quantize_model_rtn


logger = logging.get_logger(__name__)


def quantize_streamed(quantizer, save_dir, config: AgentOSConfig, calibration_dataset=None, num_samples: int = 64,
                      seq_len: int = 512, batch_size: int = 4, overwrite: bool = True, card_extra: dict | None = None,
                      max_shard_size="200MB", buffer_memory=None, spill_dir=None):
    """Quantize the checkpoint `quantizer.streamed` reads into `save_dir`; returns the run's `BlockStream` (its
    per-block seconds and resident memory are in `block_stats`)."""
    from ..hub.card import write_card

    model = quantizer.model
    if config.smoothquant_alpha is not None:
        raise ValueError("smoothquant_alpha is not supported with streaming=True yet (smoothing needs a pass over the "
                         "float model first); quantize with streaming=False, or without smoothquant_alpha.")
    if config.method not in ("rtn", "gptq") or config.awq or config.layer_overrides:
        raise ValueError(f"streaming=True runs method='rtn' and 'gptq' with one bits/group size for every layer; "
                         f"got method={config.method!r}, awq={config.awq!r}, layer_overrides="
                         f"{'set' if config.layer_overrides else None}. Quantize with streaming=False for AWQ, "
                         "learned rounding or mixed precision.")
    names = resolve_targets(model, config.target, config.ignore)
    check_group_size(model, names, config)
    ids = None
    if config.method == "gptq":
        if calibration_dataset is None:
            raise ValueError("method='gptq' needs calibration data: pass calibration_dataset='wikitext2' or texts.")
        ids = quantizer.calibration_ids(calibration_dataset, num_samples, seq_len)
        release_free_memory()  # what tokenizing the calibration text left to the allocator
        check_calibration_size(ids, model, names, "GPTQ")
    blocks_name, blocks = find_blocks(model, names)
    leftover = [n for n in names if not n.startswith(f"{blocks_name}.")]

    def compress_blocks(stream) -> None:
        if config.method == "gptq":
            ids_on_device = ids.to(quantizer.streamed.device)
            run_blockwise(model, names, ids_on_device, lambda layers, h: quantizer._gptq_block(layers, h, config),
                          batch_size, "GPTQ", stream=stream)
            return
        for index in tqdm(range(len(blocks)), desc="RTN", unit="block"):
            name = f"{blocks_name}.{index}"
            stream.load_block(name)
            quantize_model_rtn(model, config, names=[n for n in names if n.startswith(f"{name}.")])
            stream.done_block(name)

    def compress_rest() -> None:
        if leftover:
            if config.method == "gptq":
                logger.warning(f"{len(leftover)} target layers sit outside the repeated blocks; quantized with RTN: "
                               f"{leftover}")
            quantize_model_rtn(model, config, names=leftover)
        if config.embedding_bits:
            quantize_embeddings(model)

    card_info = {"base_model": quantizer.source, "config": config.to_dict(), **(card_extra or {})}
    stream = run_streamed(
        quantizer.streamed, save_dir, names, compress_blocks,
        compress_rest if leftover or config.embedding_bits else None, config.stamped, config.float_dtype,
        quantizer.tokenizer, overwrite, lambda d: write_card(d, card_info), max_shard_size, buffer_memory, spill_dir,
    )
    quantizer.stats = {"layers": len(names), "blocks": stream.block_stats, "spilled_bytes": stream.spilled_bytes,
                       "rss_after_capture": stream.rss_after_capture}
    return stream
