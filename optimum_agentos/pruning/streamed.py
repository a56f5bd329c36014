"""`Pruner.prune` on a streamed checkpoint (`Pruner.from_pretrained(path, streaming=True)`): magnitude, Wanda and
SparseGPT (with or without quantization in the same pass) run one block at a time with the same per-layer steps as
in memory, each block written as soon as it is compressed, so the output is the in-memory path's, tensor for
tensor. Structured pruning and `scope='global'` need the whole model at once and are refused."""

from __future__ import annotations

from tqdm.auto import tqdm
from transformers.utils import logging

from ..calibration.data import check_calibration_size
from ..calibration.runner import find_blocks
from ..config import AgentOSConfig
from ..formats.replace import check_group_size
from ..nn.linear import QuantLinear, float_weight, linear_shape
from ..nn.modeling import set_module
from ..nn.sparse_linear import SparseLinear
from ..nn.memory import release_free_memory
from ..nn.targets import resolve_targets
from ..streaming.pipeline import BlockStream, run_streamed
from .config import PruningConfig
from .masks import check_n_m
from .reconstruct import check_reconstruction
from .report import count_zeros, logical_parameters


logger = logging.get_logger(__name__)


class _PruneStream:
    """A `BlockStream` that magnitude-prunes each block as it is loaded and stores it compressed (quantized rest,
    `SparseLinear`) before it is written; it counts the report's zeros while the block is in memory."""

    def __init__(self, stream: BlockStream, pruner, config: PruningConfig, names, quantized, quantization):
        self.stream, self.pruner, self.config = stream, pruner, config
        self.names, self.quantized, self.quantization = names, quantized, quantization
        self.sparse: dict[str, int] = {}
        self.layers, self.zeros, self.total, self.all_zeros = {}, 0, 0, 0

    def buffer(self, calibration_ids=None):
        return self.stream.buffer(calibration_ids)

    def load_block(self, name: str) -> None:
        self.stream.load_block(name)
        if self.config.method == "magnitude":
            self.pruner._prune_magnitude(_under(self.names, name), self.config)

    def done_block(self, name: str) -> None:
        self.finish_layers(_under(self.names, name), _under(self.quantized, name))
        self.count(name)
        self.stream.done_block(name)

    def finish_layers(self, names: list[str], quantized: list[str]) -> None:
        """What `Pruner.prune` does after the calibration, for these layers: RTN for the quantization targets still
        in float, `SparseLinear` for the pruned ones left dense."""
        pruner = self.pruner
        if self.quantization is not None and quantized:
            pruner._quantize_rest(quantized, self.quantization)
        modules = dict(pruner.model.named_modules())
        for layer in [n for n in names if n in pruner.masks]:
            module = modules[layer]
            if not isinstance(module, (SparseLinear, QuantLinear)):
                new = SparseLinear.from_dense(float_weight(module).detach(), ~pruner.masks[layer], module.bias)
                set_module(pruner.model, layer, new)
        modules = dict(pruner.model.named_modules())
        self.sparse.update({n: modules[n].nnz for n in names if isinstance(modules[n], SparseLinear)})

    def count(self, prefix: str = "", skip: tuple[str, ...] = ()) -> None:
        module = self.pruner.model.get_submodule(prefix) if prefix else self.pruner.model
        layers, zeros, total, all_zeros = count_zeros(module, prefix=prefix, skip=skip)
        self.layers.update(layers)
        self.zeros, self.total, self.all_zeros = self.zeros + zeros, self.total + total, self.all_zeros + all_zeros
        for layer in list(layers):
            self.pruner.masks.pop(layer, None)  # the block is written: its masks are no longer needed


def _under(names: list[str], prefix: str) -> list[str]:
    return [n for n in names if n.startswith(f"{prefix}.")]


def prune_streamed(pruner, save_dir, config: PruningConfig, calibration_dataset=None, num_samples: int = 64,
                   seq_len: int = 512, batch_size: int = 4, quantization: AgentOSConfig | None = None,
                   float_dtype: str | None = "float16", overwrite: bool = True, card_extra: dict | None = None,
                   max_shard_size="200MB", buffer_memory=None, spill_dir=None):
    """Prune the checkpoint `pruner.streamed` reads into `save_dir`, block by block."""
    from ..hub.card import write_card

    model = pruner.model
    if config.is_structured or config.scope == "global":
        raise ValueError("Structured pruning and scope='global' rank weights across the whole model, which "
                         "streaming=True never holds; prune with streaming=False, or use a per-layer unstructured "
                         "method (magnitude, wanda, sparsegpt).")
    if config.threshold is not None or config.method == "column_magnitude" or config.allocation != "uniform":
        raise ValueError("streaming=True prunes by a sparsity with magnitude, wanda or sparsegpt, uniform over the "
                         f"blocks; got method={config.method!r}, threshold={config.threshold!r}, "
                         f"allocation={config.allocation!r}. Prune with streaming=False for thresholds, "
                         "column_magnitude or OWL.")
    if quantization is not None and (quantization.method not in ("rtn", "gptq") or quantization.awq
                                     or quantization.layer_overrides):
        raise ValueError("streaming=True quantizes with method='rtn' or 'gptq' and one bits/group size for every "
                         "layer; prune and quantize with streaming=False for AWQ, learned rounding or mixed precision.")
    if quantization is not None and quantization.smoothquant_alpha is not None:
        raise ValueError("The pruner does not apply smoothquant_alpha; prune first, then quantize the pruned "
                         "checkpoint with `Quantizer` and smoothquant_alpha.")
    check_reconstruction(config, quantization)
    wants_gptq = quantization is not None and quantization.method == "gptq"
    if calibration_dataset is None and (config.needs_calibration or wants_gptq):
        raise ValueError(f"{'method=' + repr(config.method) if config.needs_calibration else 'this setup'} needs "
                         "calibration data: pass calibration_dataset='wikitext2', a list of texts or a tensor of ids.")
    names = resolve_targets(model, config.target, config.ignore) if config.method else []
    pruner.allocation = None  # uniform over the blocks (OWL is refused above)
    ids = None
    if config.needs_calibration or wants_gptq:
        ids = pruner.calibration_ids(calibration_dataset, num_samples, seq_len)
        release_free_memory()  # what tokenizing the calibration text left to the allocator
    if names and config.needs_calibration:
        check_calibration_size(ids, model, names, config.method)
        if config.n_m:
            modules = dict(model.named_modules())
            for name in names:
                check_n_m(linear_shape(modules[name])[0], config.n_m, name)
    quantized = []
    if quantization is not None:
        quantized = resolve_targets(model, quantization.target, quantization.ignore)
        check_group_size(model, quantized, quantization)
        if wants_gptq:
            check_calibration_size(ids, model, quantized, "GPTQ")
    pruner.masks, pruner._quantization = {}, quantization
    params_before = model.num_parameters()
    every = list(dict.fromkeys([*names, *quantized]))
    blocks_name, blocks = find_blocks(model, every)
    state = {}

    def compress_blocks(stream: BlockStream) -> None:
        wrapped = state["stream"] = _PruneStream(stream, pruner, config, names, quantized, quantization)
        if config.needs_calibration or wants_gptq:
            todo = list(dict.fromkeys([*(names if config.needs_calibration else []), *(quantized if wants_gptq else [])]))
            pruner.calibrated_pass(todo, ids.to(pruner.streamed.device), config, names, quantization, batch_size,
                                   stream=wrapped)
            return
        for index in tqdm(range(len(blocks)), desc="Pruning", unit="block"):
            wrapped.load_block(f"{blocks_name}.{index}")
            wrapped.done_block(f"{blocks_name}.{index}")

    def compress_rest() -> None:
        wrapped = state["stream"]
        outside = [n for n in every if not n.startswith(f"{blocks_name}.")]
        rest_names = [n for n in names if n in outside]
        if rest_names:
            if config.needs_calibration:
                logger.warning(f"{len(rest_names)} target layers sit outside the repeated blocks; pruned by magnitude: "
                               f"{rest_names}")
            pruner._prune_magnitude(rest_names, config)
        wrapped.finish_layers(rest_names, [n for n in quantized if n in outside])
        wrapped.count(skip=(f"{blocks_name}.",))
        params_after = logical_parameters(model)
        pruner.report = {
            "layers": wrapped.layers, "sparsity": wrapped.zeros / wrapped.total if wrapped.total else 0.0,
            "params_before": params_before, "params_after": params_after,
            "nonzero_params": params_after - wrapped.all_zeros,
        }
        if getattr(pruner, "stats_reconstruction", None):
            pruner.report["reconstruction_blocks"] = pruner.stats_reconstruction

    def stored_config() -> AgentOSConfig:
        return pruner._stored_config(config, float_dtype, state["stream"].sparse if "stream" in state else {},
                                     {}).stamped()

    def card(folder) -> None:
        stored = stored_config()
        write_card(folder, {"base_model": pruner.source, "config": stored.to_dict(), "pruning": config.to_dict(),
                            "report": pruner.report, **(card_extra or {})})

    stream = run_streamed(
        pruner.streamed, save_dir, every, compress_blocks, compress_rest, stored_config,
        quantization.float_dtype if quantization is not None else float_dtype, pruner.tokenizer, overwrite,
        card, max_shard_size, buffer_memory, spill_dir,
    )
    pruner.stats = {"params_before": params_before, "pruned_layers": len(state["stream"].sparse),
                    "blocks": stream.block_stats,
                    "spilled_bytes": stream.spilled_bytes, "rss_after_capture": stream.rss_after_capture}
    return stream
