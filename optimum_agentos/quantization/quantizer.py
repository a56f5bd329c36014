"""`Quantizer`: load a model, quantize it (RTN, GPTQ, AWQ, learned rounding) and save an `agentos` checkpoint."""

from __future__ import annotations

import copy
import time
from collections import Counter

from optimum.quantization_base import OptimumQuantizer
from transformers.utils import logging

from ..calibration.data import check_calibration_size
from ..calibration.runner import run_blockwise
from ..compressor import ModelCompressor
from ..config import AgentOSConfig
from ..formats.mark import mark_compressed
from ..formats.replace import check_group_size, check_layer_overrides
from ..nn.linear import SCALE_DTYPES, QuantLinear, float_weight
from ..nn.memory import release_free_memory
from ..nn.modeling import set_module
from ..nn.targets import resolve_targets
from .awq import awq_groups
from .calibrated import quantize_calibrated
from .embedding import quantize_embeddings
from .gptq import gptq_quantize, invert_hessian
from .rtn import quantize_model_rtn
from .smoothquant import smooth_model


logger = logging.get_logger(__name__)


class Quantizer(ModelCompressor, OptimumQuantizer):
    """Post-training weight quantization of a transformers model into an `agentos` checkpoint.

    Example:
    ```python
    >>> from optimum_agentos import AgentOSConfig, Quantizer
    >>> q = Quantizer.from_pretrained("smollm2-135m")
    >>> q.quantize(save_dir="smollm2-int4", config=AgentOSConfig(bits=4, group_size=128, method="gptq"),
    ...            calibration_dataset="wikitext2")
    ```
    """

    def quantize_in_place(
        self, config: AgentOSConfig, calibration_dataset=None, num_samples: int = 64, seq_len: int = 512,
        batch_size: int = 4,
    ):
        """Quantize `self.model` in memory and return it (marked quantized, ready for `save_pretrained`).

        With `config.smoothquant_alpha` the float model is smoothed first (SmoothQuant), on the calibration data."""
        if self.streamed is not None:
            raise ValueError("This Quantizer streams its checkpoint (streaming=True): it holds no model to quantize in "
                             "memory. Call quantize(save_dir=...) to write the quantized checkpoint block by block.")
        start = time.perf_counter()
        names = resolve_targets(self.model, config.target, config.ignore)
        check_group_size(self.model, names, config)
        check_layer_overrides(config, names)
        # AWQ's layout check, before calibration data is loaded: it needs none
        awq_layout = awq_groups(self.model, names) if config.method == "awq" or config.awq else None
        uses_data = []
        if config.method != "rtn":
            uses_data.append(f"method={config.method!r}")
        if config.smoothquant_alpha is not None:
            uses_data.append("smoothquant_alpha")
        if uses_data and calibration_dataset is None:
            raise ValueError(f"{' and '.join(uses_data)} needs calibration data: pass calibration_dataset='wikitext2' "
                             "or texts.")
        ids = self.calibration_ids(calibration_dataset, num_samples, seq_len) if uses_data else None
        if config.method in ("gptq", "awq") or config.awq:  # the methods using input Hessians
            what = "GPTQ" if config.method == "gptq" else f"method={config.method!r}"
            check_calibration_size(ids, self.model, names, what)
        if config.smoothquant_alpha is not None:
            smooth_model(self.model, names, ids, config.smoothquant_alpha, batch_size)
        self.stats = {}
        if config.method == "rtn":
            quantize_model_rtn(self.model, config, names)
        else:
            if config.method == "gptq" and not config.awq:
                leftover = run_blockwise(
                    self.model, names, ids.to(self.device), lambda layers, h: self._gptq_block(layers, h, config),
                    batch_size, "GPTQ", stream=self.block_stream(names),
                )
            else:
                leftover = quantize_calibrated(self.model, names, ids.to(self.device), config, batch_size, self.stats,
                                               awq_layout)
            if leftover:
                logger.warning(f"{len(leftover)} target layers sit outside the repeated blocks; quantized with RTN: {leftover}")
                quantize_model_rtn(self.model, config, names=leftover)
        if config.embedding_bits:
            quantize_embeddings(self.model)
        mark_compressed(self.model, config)
        self.stats.update(layers=len(names), seconds=time.perf_counter() - start)
        return self.model

    def _gptq_block(self, layers: dict, hessians: dict, config: AgentOSConfig) -> None:
        """GPTQ every layer of a block, in order. Consumes `layers` and `hessians` (entries are popped): layers
        reading one input share one inverted Hessian, made in the accumulator's own storage, and each Hessian and
        each float weight is released as soon as its last layer is quantized, so a block holds its Hessians and
        weights only until they are used (what bounds streamed compression's memory)."""
        users = Counter(id(acc) for acc in hessians.values())
        inverses = {}
        for name in list(layers):
            module, acc = layers.pop(name), hessians.pop(name)
            key = id(acc)
            if key not in inverses:
                release_free_memory()  # what the statistics pass and the last solve freed goes back to the system
                inverses[key] = invert_hessian(acc.take_hessian(), config.damp_percent, config.act_order, inplace=True)
            bits, group_size = config.layer_qparams(name)
            codes, scales, zeros = gptq_quantize(
                float_weight(module), None, bits, group_size, config.sym, config.damp_percent, config.act_order,
                config.block_size, SCALE_DTYPES[config.scale_dtype], config.mse_grid, inverse=inverses[key],
            )
            set_module(self.model, name, QuantLinear.from_codes(codes, scales, zeros, module.bias, bits, group_size))
            del module, acc, codes, scales, zeros
            users[key] -= 1
            if not users[key]:
                del inverses[key]

    def quantize(
        self,
        save_dir,
        config: AgentOSConfig | None = None,
        calibration_dataset=None,
        num_samples: int = 64,
        seq_len: int = 512,
        batch_size: int = 4,
        overwrite: bool = True,
        card_extra: dict | None = None,
        file_prefix=None,
        max_shard_size="200MB",
        buffer_memory=None,
        spill_dir=None,
    ):
        """Quantize and save model, tokenizer and model card to `save_dir` (atomically). Returns the model.

        Opened with `streaming=True`, the checkpoint is quantized block by block into shards of `max_shard_size`
        (the most output held in memory before it is written), with the calibration activations kept within
        `buffer_memory` (e.g. "2GB"; the rest spills to `spill_dir`, default the system's temporary folder), and
        None is returned (no model is held in memory: load `save_dir` to use it)."""
        from ..formats.folder import check_save_dir, save_model_folder
        from ..hub.card import write_card

        check_save_dir(save_dir, overwrite)  # before minutes of work: refuse a folder holding the user's files
        config = config or AgentOSConfig()
        if self.streamed is not None:
            from .streamed import quantize_streamed

            quantize_streamed(self, save_dir, config, calibration_dataset, num_samples, seq_len, batch_size, overwrite,
                              card_extra, max_shard_size, buffer_memory, spill_dir)
            return None
        model = self.quantize_in_place(config, calibration_dataset, num_samples, seq_len, batch_size)
        card_info = {"base_model": self.source, "config": config.to_dict(), **(card_extra or {})}
        save_model_folder(model, self.tokenizer, save_dir, overwrite, extra=lambda d: write_card(d, card_info))
        return model

    def quantize_in_place_to_budget(
        self, max_size_mb: float, calibration_dataset="wikitext2", num_samples: int = 64, seq_len: int = 512,
        candidates=None, base: AgentOSConfig | None = None, error_samples: int = 8, batch_size: int = 4,
        sensitivity: dict | None = None, sensitivity_method: str | None = None,
    ):
        """Mixed precision in memory: plan per-layer formats that fit `max_size_mb` on disk (`plan_mixed_precision`),
        quantize with them (GPTQ unless `base.method="rtn"`) and measure each block's output error against the float
        model. `self.plan` holds the plan; `self.mixed_report` the plan with `measured_error` (sum of the measured
        block errors) beside its `predicted_error`. Returns the model."""
        from .budget import DEFAULT_CANDIDATES
        from .mixed import plan_mixed_precision
        from .sensitivity import block_errors

        if calibration_dataset is None:
            raise ValueError("Mixed precision measures each layer's sensitivity on calibration data: pass "
                             "calibration_dataset='wikitext2' or texts.")
        ids = self.calibration_ids(calibration_dataset, num_samples, seq_len)
        plan = plan_mixed_precision(self.model, ids, max_size_mb, candidates or DEFAULT_CANDIDATES, base,
                                    error_samples, batch_size, sensitivity, sensitivity_method)
        float_model = copy.deepcopy(self.model)
        self.quantize_in_place(plan.config, ids, num_samples, seq_len, batch_size)
        measured = block_errors(float_model, self.model, list(plan.layers), ids[:error_samples], batch_size)
        del float_model
        self.plan = plan
        self.mixed_report = {**plan.to_dict(), "measured_error": sum(measured), "measured_block_errors": measured}
        return self.model

    def quantize_to_budget(self, save_dir, max_size_mb: float, calibration_dataset="wikitext2", overwrite: bool = True,
                           card_extra: dict | None = None, **kwargs):
        """`quantize_in_place_to_budget` (same keyword arguments), then save model, tokenizer, card and the plan
        (`mixed_precision.json`) to `save_dir` atomically; checks the safetensors files fit `max_size_mb`."""
        import json

        from ..formats.folder import check_save_dir, folder_size, save_model_folder
        from ..hub.card import write_card

        check_save_dir(save_dir, overwrite)
        model = self.quantize_in_place_to_budget(max_size_mb, calibration_dataset, **kwargs)
        card_info = {"base_model": self.source, "config": self.plan.config.to_dict(), **(card_extra or {})}

        def extra(folder):
            write_card(folder, card_info)
            (folder / "mixed_precision.json").write_text(json.dumps(self.mixed_report, indent=2) + "\n")

        save_model_folder(model, self.tokenizer, save_dir, overwrite, extra=extra)
        size = folder_size(save_dir)
        if size > max_size_mb * 1e6:  # the plan bounds the files from above: a failure here is a bug
            raise RuntimeError(f"{save_dir} takes {size} bytes, over max_size_mb={max_size_mb}; please report.")
        self.stats["size_bytes"] = size
        return model
