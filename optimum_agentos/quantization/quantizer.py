"""`Quantizer`: load a model, quantize it (RTN or GPTQ) and save an `agentos` checkpoint folder."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from optimum.quantization_base import OptimumQuantizer
from transformers.utils import logging

from ..config import AgentOSConfig
from ..integrations.transformers import attach_quantizer
from .calibration import run_blockwise
from .convert import set_module, quantize_model_rtn
from .gptq import gptq_quantize
from .memory import own_memory
from .linear import SCALE_DTYPES, QuantLinear, float_weight
from .replace import check_group_size
from .targets import resolve_targets


logger = logging.get_logger(__name__)


def load_pretrained(model_or_path: str, dtype=torch.float32, **kwargs):
    """Resolve an alias (`smollm2-135m`), folder or Hub id and load model + tokenizer (never `trust_remote_code`)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    from ..models import resolve_model

    path = resolve_model(model_or_path)
    config = AutoConfig.from_pretrained(path, **kwargs)
    is_causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in (config.architectures or []))
    auto = AutoModelForCausalLM if is_causal else AutoModel
    model = auto.from_pretrained(path, dtype=dtype, **kwargs)
    own_memory(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    except (OSError, ValueError):
        tokenizer = None
    return model, tokenizer, path


class Quantizer(OptimumQuantizer):
    """Post-training weight quantization of a transformers model into an `agentos` checkpoint.

    Example:
    ```python
    >>> from optimum_agentos import AgentOSConfig, Quantizer
    >>> q = Quantizer.from_pretrained("smollm2-135m")
    >>> q.quantize(save_dir="smollm2-int4", config=AgentOSConfig(bits=4, group_size=128, method="gptq"),
    ...            calibration_dataset="wikitext2")
    ```
    """

    def __init__(self, model, tokenizer=None, source: str | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.source = source or getattr(model, "name_or_path", None)
        self.stats: dict = {}

    @classmethod
    def from_pretrained(cls, model_or_path, tokenizer=None, dtype=torch.float32, **kwargs) -> "Quantizer":
        """Load a float model (folder, Hub id or alias such as `smollm2-135m`) to quantize."""
        if not isinstance(model_or_path, (str, Path)):
            return cls(model_or_path, tokenizer)
        model, loaded_tokenizer, _ = load_pretrained(str(model_or_path), dtype=dtype, **kwargs)
        return cls(model, tokenizer or loaded_tokenizer, source=str(model_or_path))

    def calibration_ids(self, calibration_dataset, num_samples: int, seq_len: int) -> torch.Tensor:
        """Token windows `[num_samples, seq_len]` from a dataset name, a list of texts or ready ids."""
        if isinstance(calibration_dataset, torch.Tensor):
            return calibration_dataset.long().reshape(-1, calibration_dataset.shape[-1])
        if self.tokenizer is None:
            raise ValueError("Calibration from text needs a tokenizer: pass tokenizer= to Quantizer.")
        from ..evaluation.data import calibration_windows, windows_from_text

        if isinstance(calibration_dataset, str):
            return calibration_windows(self.tokenizer, calibration_dataset, "validation", num_samples, seq_len)
        return windows_from_text(self.tokenizer, "\n\n".join(calibration_dataset), num_samples, seq_len)

    def quantize_in_place(
        self, config: AgentOSConfig, calibration_dataset=None, num_samples: int = 64, seq_len: int = 512,
        batch_size: int = 4,
    ):
        """Quantize `self.model` in memory and return it (marked quantized, ready for `save_pretrained`)."""
        start = time.perf_counter()
        names = resolve_targets(self.model, config.target, config.ignore)
        check_group_size(self.model, names, config)
        if config.method == "rtn":
            quantize_model_rtn(self.model, config, names)
        else:
            if calibration_dataset is None:
                raise ValueError("method='gptq' needs calibration data: pass calibration_dataset='wikitext2' or texts.")
            ids = self.calibration_ids(calibration_dataset, num_samples, seq_len)
            leftover = run_blockwise(
                self.model, names, ids, lambda layers, h: self._gptq_block(layers, h, config), batch_size, "GPTQ"
            )
            if leftover:
                logger.warning(f"{len(leftover)} target layers sit outside the repeated blocks; quantized with RTN: {leftover}")
                quantize_model_rtn(self.model, config, names=leftover)
        attach_quantizer(self.model, config)
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
    ):
        """Quantize and save model, tokenizer and model card to `save_dir` (atomically). Returns the model."""
        from ..checkpoint import save_model_folder
        from ..hub.card import write_card

        config = config or AgentOSConfig()
        model = self.quantize_in_place(config, calibration_dataset, num_samples, seq_len, batch_size)
        card_info = {"base_model": self.source, "config": config.to_dict(), **(card_extra or {})}
        save_model_folder(model, self.tokenizer, save_dir, overwrite, extra=lambda d: write_card(d, card_info))
        return model
