"""`Quantizer`: load a model, quantize it (RTN or GPTQ) and save an `agentos` checkpoint folder."""

from __future__ import annotations

import time

from optimum.quantization_base import OptimumQuantizer
from transformers.utils import logging

from ..calibration.data import check_calibration_size
from ..calibration.runner import run_blockwise
from ..compressor import ModelCompressor
from ..config import AgentOSConfig
from ..formats.mark import mark_compressed
from ..formats.replace import check_group_size
from ..nn.linear import SCALE_DTYPES, QuantLinear, float_weight
from ..nn.modeling import set_module
from ..nn.targets import resolve_targets
from .embedding import quantize_embeddings
from .gptq import gptq_quantize
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
        uses_data = []
        if config.method == "gptq":
            uses_data.append("method='gptq'")
        if config.smoothquant_alpha is not None:
            uses_data.append("smoothquant_alpha")
        if uses_data and calibration_dataset is None:
            raise ValueError(f"{' and '.join(uses_data)} needs calibration data: pass calibration_dataset='wikitext2' "
                             "or texts.")
        ids = self.calibration_ids(calibration_dataset, num_samples, seq_len) if uses_data else None
        if config.method == "gptq":
            check_calibration_size(ids, self.model, names, "GPTQ")
        if config.smoothquant_alpha is not None:
            smooth_model(self.model, names, ids, config.smoothquant_alpha, batch_size)
        if config.method == "rtn":
            quantize_model_rtn(self.model, config, names)
        else:
            leftover = run_blockwise(
                self.model, names, ids.to(self.device), lambda layers, h: self._gptq_block(layers, h, config),
                batch_size, "GPTQ", stream=self.block_stream(names),
            )
            if leftover:
                logger.warning(f"{len(leftover)} target layers sit outside the repeated blocks; quantized with RTN: {leftover}")
                quantize_model_rtn(self.model, config, names=leftover)
        if config.embedding_bits:
            quantize_embeddings(self.model)
        mark_compressed(self.model, config)
        self.stats = {"layers": len(names), "seconds": time.perf_counter() - start}
        return self.model

    def _gptq_block(self, layers: dict, hessians: dict, config: AgentOSConfig) -> None:
        for name, module in layers.items():
            codes, scales, zeros = gptq_quantize(
                float_weight(module), hessians[name].hessian(), config.bits, config.group_size, config.sym,
                config.damp_percent, config.act_order, config.block_size, SCALE_DTYPES[config.scale_dtype],
                config.mse_grid,
            )
            set_module(self.model, name, QuantLinear.from_codes(codes, scales, zeros, module.bias, config.bits, config.group_size))

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
