"""`Pruner`: prune a model (magnitude, Wanda, SparseGPT, N:M, structured), optionally quantize it in the same
pass, and save an `agentos` checkpoint whose sparse layers are stored compressed."""

from __future__ import annotations

import time

import torch
from torch import nn
from transformers.utils import logging

from ..calibration.data import check_calibration_size
from ..calibration.runner import block_outputs, collect_input_stats, run_blocks
from ..compressor import ModelCompressor
from ..config import AgentOSConfig
from ..formats.mark import mark_compressed
from ..formats.replace import check_group_size, check_layer_overrides
from ..nn import qmath
from ..nn.linear import SCALE_DTYPES, QuantLinear, float_weight, is_conv1d, linear_shape
from ..nn.modeling import set_module
from ..nn.sparse_linear import SparseLinear
from ..nn.targets import resolve_targets
from ..quantization import gptq_quantize, quantize_model_rtn  # the one entry point for sparse + quantized
from .config import CALIBRATED_METHODS, PruningConfig
from .masks import (
    check_n_m, global_magnitude_masks, magnitude_scores, mask_from_scores, mask_with_count, score_range, threshold_error,
    threshold_mask, wanda_scores,
)
from .reconstruct import check_reconstruction, reconstruct_block
from .report import sparsity_report
from .sparsegpt import sparsegpt_prune


logger = logging.get_logger(__name__)


def set_float_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Write an `[out, in]` weight back into an `nn.Linear` or `Conv1D` (which stores `[in, out]`)."""
    with torch.no_grad():
        module.weight.copy_(weight.t() if is_conv1d(module) else weight)


class Pruner(ModelCompressor):
    """Prune a transformers model into an `agentos` checkpoint that is smaller on disk and reloads with
    `from_pretrained`.

    Example:
    ```python
    >>> from optimum_agentos import Pruner, PruningConfig
    >>> pruner = Pruner.from_pretrained("smollm2-135m")
    >>> pruner.prune(save_dir="smollm2-sparse50", config=PruningConfig(method="sparsegpt", sparsity=0.5),
    ...              calibration_dataset="wikitext2")
    ```
    """

    masks: dict[str, torch.Tensor]

    def prune_in_place(
        self,
        config: PruningConfig,
        calibration_dataset=None,
        num_samples: int = 64,
        seq_len: int = 512,
        batch_size: int = 4,
        quantization: AgentOSConfig | None = None,
    ) -> nn.Module:
        """Prune (and quantize, with `quantization`) `self.model` in memory; returns it.

        Without `quantization` the pruned layers stay ordinary dense layers with zeros, ready for fine-tuning with
        `MaskFixedCallback`; `compress()` (called by `prune`) turns them into `SparseLinear` for saving.
        """
        if self.streamed is not None:
            raise ValueError("This Pruner streams its checkpoint (streaming=True): it holds no model to prune in "
                             "memory. Call prune(save_dir=...) to write the pruned checkpoint block by block.")
        start = time.perf_counter()
        params_before = self.model.num_parameters()
        wants_gptq = quantization is not None and quantization.method == "gptq"
        if quantization is not None and (quantization.method in ("awq", "autoround") or quantization.awq):
            raise ValueError(f"The pruner quantizes with method='rtn' or 'gptq', got method={quantization.method!r}"
                             f"{' with awq=True' if quantization.awq else ''}; prune first, then quantize the pruned "
                             "checkpoint with `Quantizer`.")
        if quantization is not None and quantization.smoothquant_alpha is not None:
            raise ValueError("The pruner does not apply smoothquant_alpha; prune first, then quantize the pruned "
                             "checkpoint with `Quantizer` and smoothquant_alpha.")
        check_reconstruction(config, quantization)
        ids = None
        if calibration_dataset is not None:
            ids = self.calibration_ids(calibration_dataset, num_samples, seq_len)
        elif config.needs_calibration or wants_gptq or config.layers:
            raise ValueError(
                f"{'method=' + repr(config.method) if config.needs_calibration else 'this setup'} needs calibration data: "
                "pass calibration_dataset='wikitext2', a list of texts or a tensor of token ids."
            )
        if config.is_structured:
            self._prune_structured(config, ids, batch_size)
        self.masks, self._score_ranges, self._input_features, self._reshaped = {}, [], None, config.is_structured
        self.stats_reconstruction = []
        names = resolve_targets(self.model, config.target, config.ignore) if config.method else []
        if names and config.needs_calibration:
            check_calibration_size(ids, self.model, names, config.method)
            if config.n_m:
                modules = dict(self.model.named_modules())
                for name in names:
                    check_n_m(linear_shape(modules[name])[0], config.n_m, name)
        quantized = []
        if quantization is not None:
            quantized = resolve_targets(self.model, quantization.target, quantization.ignore)
            check_group_size(self.model, quantized, quantization)
            check_layer_overrides(quantization, quantized)
            if wants_gptq:
                check_calibration_size(ids, self.model, quantized, "GPTQ")
        self.allocation = None
        if config.allocation == "owl" and names:
            from .owl import owl_allocation

            self.allocation = owl_allocation(self.model, names, ids, config, batch_size)
        if config.method == "magnitude":
            self._prune_magnitude(names, config)
        elif config.method == "column_magnitude":
            self._prune_columns(names, config, ids, batch_size)
        blockwise = config.method in CALIBRATED_METHODS
        if blockwise or wants_gptq:
            todo = list(dict.fromkeys([*(names if blockwise else []), *(quantized if wants_gptq else [])]))
            leftover = self.calibrated_pass(todo, ids.to(self.device), config, names, quantization, batch_size,
                                            stream=self.block_stream(todo))
            if leftover:
                logger.warning(f"{len(leftover)} target layers sit outside the repeated blocks; pruned by magnitude: {leftover}")
                self._prune_magnitude([n for n in leftover if n in names and n not in self.masks], config)
        self._check_threshold_removed(names, config)
        if quantization is not None:
            self._quantize_rest(quantized, quantization)
        self.stats = {
            "seconds": time.perf_counter() - start, "params_before": params_before,
            "params_after": self.model.num_parameters(), "pruned_layers": len(self.masks),
            "input_features": self._input_features,
            "reconstruction": self.stats_reconstruction or None,
        }
        self._quantization = quantization
        return self.model


    def _prune_structured(self, config: PruningConfig, ids, batch_size: int) -> None:
        from . import structured

        if config.layers:
            influence = structured.block_influence(self.model, ids, batch_size)
            drop = sorted(torch.argsort(influence)[: config.layers].tolist())
            logger.info(f"Removing decoder layers {drop} (block influence {[round(float(influence[i]), 4) for i in drop]})")
            structured.remove_layers(self.model, drop)
        if config.attention_groups:
            scores = structured.attention_group_scores(self.model, ids, batch_size)
            structured.prune_attention_heads(self.model, config.attention_groups, scores, config.uniform)
        if config.mlp_neurons:
            scores = structured.mlp_neuron_scores(self.model, ids, batch_size)
            structured.prune_mlp_neurons(self.model, config.mlp_neurons, scores, config.uniform)

    def _prune_magnitude(self, names: list[str], config: PruningConfig) -> None:
        modules = dict(self.model.named_modules())
        weights = {n: float_weight(modules[n]) for n in names}
        if config.threshold is not None:  # all masks first: a bad threshold raises before any weight changes
            masks = {n: threshold_mask(magnitude_scores(w), config.threshold, config.scope, n) for n, w in weights.items()}
            self._score_ranges += [score_range(magnitude_scores(w), config.scope) for w in weights.values()]
        elif config.scope == "global":
            masks = global_magnitude_masks(weights, config.sparsity)
        else:
            masks = {
                n: mask_from_scores(magnitude_scores(w), config.layer_sparsity_of(n), per_row=False, n_m=config.n_m)
                for n, w in weights.items()
            }
        for name, mask in masks.items():
            set_float_weight(modules[name], weights[name].masked_fill(mask, 0))
            self.masks[name] = mask

    def _prune_columns(self, names: list[str], config: PruningConfig, ids, batch_size: int) -> None:
        """`column_magnitude`: zero the chosen input columns, or remove them for real where their producer is known
        (see `pruning.columns`); every choice is made, and checked, before the model changes."""
        from . import columns

        mean_squares = columns.input_mean_squares(self.model, names, ids, batch_size) if config.calibrated else None
        plan = columns.plan_columns(self.model, names, config, mean_squares)
        modules = dict(self.model.named_modules())
        for name, mask in plan.zero_masks(self.model).items():
            set_float_weight(modules[name], float_weight(modules[name]).masked_fill(mask, 0))
            self.masks[name] = mask
        sliced = columns.remove_planned(self.model, plan)
        self._reshaped = self._reshaped or bool(sliced)
        for name, (dim, keep) in sliced.items():
            if name in self.masks:  # e.g. gate_proj with zeroed columns loses the rows of removed neurons
                self.masks[name] = self.masks[name].index_select(dim, keep.to(self.masks[name].device))
        self._input_features = plan.report()

    def _check_threshold_removed(self, names: list[str], config: PruningConfig) -> None:
        """A weight threshold that removed nothing from any layer is an error (the caller asked for a prune)."""
        if config.threshold is None or config.method == "column_magnitude" or not self._score_ranges:
            return
        if any(bool(self.masks[n].any()) for n in names if n in self.masks):
            return
        lo_hi = (min(r[0] for r in self._score_ranges), max(r[1] for r in self._score_ranges))
        raise ValueError(threshold_error(config.threshold, config.scope, f"removes nothing from the {len(names)} "
                                         "target layers", lo_hi))

    def calibrated_pass(self, todo: list[str], ids: torch.Tensor, config: PruningConfig, names: list[str],
                        quantization: AgentOSConfig | None, batch_size: int, stream=None) -> list[str]:
        """Prune (Wanda/SparseGPT) and GPTQ-quantize the layers `todo` block by block, each block then reconstructed
        when `config.reconstruction_steps` asks for it; returns the target layers outside the repeated blocks."""
        steps = config.reconstruction_steps  # validated: non-zero only with Wanda/SparseGPT
        self.stats_reconstruction = []

        def process(block: nn.Module, layers: dict[str, nn.Module], inputs: list[tuple]) -> None:
            targets = block_outputs(block, inputs) if steps else None  # the dense block's outputs
            self._process_block(layers, collect_input_stats(block, layers, inputs), config, names, quantization)
            if steps:
                losses = reconstruct_block(block, {n: m for n, m in layers.items() if n in names}, self.masks, inputs,
                                           targets, steps, config.reconstruction_lr)
                self.stats_reconstruction.append(losses)
                logger.info(f"reconstruction: block output error {losses['loss_pruned']:.3g} (pruned) -> "
                            f"{losses['loss']:.3g}")

        desc = {"sparsegpt": "SparseGPT", "wanda": "Wanda"}.get(config.method, "Calibrating")
        return run_blocks(self.model, todo, ids, process, batch_size, desc + (" + reconstruction" if steps else ""),
                          stream)

    def _process_block(self, layers: dict, hessians: dict, config: PruningConfig, names, quantization) -> None:
        for name, module in layers.items():
            weight = float_weight(module).detach().float().contiguous()
            hessian = hessians[name].hessian()
            count = self.allocation["counts"].get(name) if self.allocation else None
            if name in names and config.method == "sparsegpt":
                weight, mask = sparsegpt_prune(
                    weight, hessian, config.layer_sparsity_of(name), config.n_m, config.block_size, config.damp_percent,
                    count,
                )
            elif name in names and config.method == "wanda":
                scores = wanda_scores(weight, torch.diag(hessian) / 2)  # the Hessian is 2 E[x x^T]: |W_ij| RMS(x_j)
                if config.threshold is not None:
                    mask = threshold_mask(scores, config.threshold, config.scope, name)
                    self._score_ranges.append(score_range(scores, config.scope))
                elif count is not None:  # OWL: this block's share of the weights
                    mask = mask_with_count(scores, count)
                else:
                    mask = mask_from_scores(scores, config.layer_sparsity_of(name), per_row=True, n_m=config.n_m)
                weight = weight.masked_fill(mask, 0)
            else:
                mask = self.masks.get(name)  # magnitude pruned before, or not pruned at all
                mask = None if mask is None else mask.to(weight.device)
            if mask is not None:
                self.masks[name] = mask.cpu()  # the model is on the CPU again after its block: so are its masks
            if quantization is not None and quantization.method == "gptq":
                bits, group_size = quantization.layer_qparams(name)
                codes, scales, zeros = gptq_quantize(
                    weight, hessian, bits, group_size, quantization.sym,
                    quantization.damp_percent, quantization.act_order, quantization.block_size,
                    SCALE_DTYPES[quantization.scale_dtype], quantization.mse_grid, pruned=mask,
                )
                set_module(self.model, name, _quantized_layer(codes, scales, zeros, mask, module.bias, quantization, name))
            else:
                set_float_weight(module, weight.to(module.weight.dtype))

    def _quantize_rest(self, quantized: list[str], quantization: AgentOSConfig) -> None:
        """RTN-quantize the quantization targets still in float (all of them for method='rtn')."""
        modules = dict(self.model.named_modules())
        todo = [n for n in quantized if not isinstance(modules[n], (QuantLinear, SparseLinear))]
        plain = [n for n in todo if n not in self.masks]
        if plain:
            quantize_model_rtn(self.model, quantization, names=plain)
        for name in todo:
            if name in self.masks:
                module = modules[name]
                bits, group_size = quantization.layer_qparams(name)
                codes, scales, zeros = qmath.quantize_rtn(
                    float_weight(module).detach(), bits, group_size, quantization.sym,
                    SCALE_DTYPES[quantization.scale_dtype], quantization.mse_grid,
                )
                layer = _quantized_layer(codes, scales, zeros, self.masks[name], module.bias, quantization, name)
                set_module(self.model, name, layer)

    def compress(self, config: PruningConfig, float_dtype: str | None = "float16") -> nn.Module:
        """Store the pruned layers as `SparseLinear` and mark the model with its agentos config for saving."""
        modules = dict(self.model.named_modules())
        for name, mask in self.masks.items():
            module = modules[name]
            if not isinstance(module, (SparseLinear, QuantLinear)):
                set_module(self.model, name, SparseLinear.from_dense(float_weight(module).detach(), ~mask, module.bias))
        modules = dict(self.model.named_modules())
        sparse = {n: m.nnz for n, m in modules.items() if isinstance(m, SparseLinear)}
        shapes = {}
        if getattr(self, "_reshaped", config.is_structured):
            from ..formats.shapes import module_shapes

            shapes = module_shapes(self.model)
        quantization = self._quantization
        if quantization is None and not sparse and not shapes:
            # uniform structured pruning only: a plain checkpoint that loads without this library, in float_dtype
            return self.model.to(SCALE_DTYPES[float_dtype]) if float_dtype else self.model
        mark_compressed(self.model, self._stored_config(config, float_dtype, sparse, shapes))
        return self.model

    def _stored_config(self, config: PruningConfig, float_dtype: str | None, sparse: dict, shapes: dict) -> AgentOSConfig:
        """The agentos config a pruned checkpoint is saved with: its storage, sparse layers and pruning recipe."""
        quantization = self._quantization
        storage = (quantization.to_dict() if quantization is not None else {"bits": None, "float_dtype": float_dtype})
        storage.pop("quant_method", None)
        storage.update(
            sparse_layers=sparse or None, module_shapes=shapes or None, pruning=config.to_dict(),
            sparsity_pattern=config.pattern if config.n_m else None,
        )
        return AgentOSConfig.from_dict(storage)

    def prune(
        self,
        save_dir,
        config: PruningConfig | None = None,
        calibration_dataset=None,
        num_samples: int = 64,
        seq_len: int = 512,
        batch_size: int = 4,
        quantization: AgentOSConfig | None = None,
        float_dtype: str | None = "float16",
        overwrite: bool = True,
        card_extra: dict | None = None,
        max_shard_size="200MB",
        buffer_memory=None,
        spill_dir=None,
    ) -> nn.Module:
        """Prune, compress and save model, tokenizer and model card to `save_dir` (atomically). Returns the model.

        `float_dtype` is the dtype of the kept float values and embeddings on disk when not quantizing. Opened with
        `streaming=True`, the checkpoint is pruned block by block into shards of `max_shard_size`, with the calibration
        activations within `buffer_memory` (spilling to `spill_dir`), and None is returned.
        """
        from ..formats.folder import check_save_dir, save_model_folder
        from ..hub.card import write_card

        check_save_dir(save_dir, overwrite)  # before minutes of work: refuse a folder holding the user's files
        config = config or PruningConfig()
        if self.streamed is not None:
            from .streamed import prune_streamed

            prune_streamed(self, save_dir, config, calibration_dataset, num_samples, seq_len, batch_size, quantization,
                           float_dtype, overwrite, card_extra, max_shard_size, buffer_memory, spill_dir)
            return None
        self.prune_in_place(config, calibration_dataset, num_samples, seq_len, batch_size, quantization)
        model = self.compress(config, float_dtype)
        self.report = sparsity_report(model, self.stats.get("params_before"),
                                      input_features=self.stats.get("input_features"))
        if self.allocation:  # OWL: each block's outlier ratio and the sparsity it was given
            self.report["owl_blocks"] = self.allocation["blocks"]
        if self.stats.get("reconstruction"):  # each block's output error after pruning, and after reconstruction
            self.report["reconstruction_blocks"] = self.stats["reconstruction"]
        stored = getattr(model.config, "quantization_config", None)
        card_info = {
            "base_model": self.source, "config": stored.to_dict() if stored is not None else {},
            "pruning": config.to_dict(), "report": self.report, **(card_extra or {}),
        }
        save_model_folder(model, self.tokenizer, save_dir, overwrite, extra=lambda d: write_card(d, card_info))
        return model


def _quantized_layer(codes, scales, zeros, mask, bias, quantization: AgentOSConfig, name: str) -> nn.Module:
    bits, group_size = quantization.layer_qparams(name)
    if mask is None:
        return QuantLinear.from_codes(codes, scales, zeros, bias, bits, group_size)
    return SparseLinear.from_codes(codes, scales, zeros, ~mask, bias, bits, group_size)
