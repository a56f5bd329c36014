"""What `Quantizer` and `Pruner` share: loading the float model and turning a calibration spec into token ids."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers.utils import logging


logger = logging.get_logger(__name__)


def load_pretrained(model_or_path: str, dtype=torch.float32, **kwargs):
    """Resolve an alias (`smollm2-135m`), folder or Hub id and load model + tokenizer (never `trust_remote_code`)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    from .models import resolve_model
    from .nn.memory import own_memory

    path = resolve_model(model_or_path)
    config = AutoConfig.from_pretrained(path, **kwargs)
    is_causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in (config.architectures or []))
    auto = AutoModelForCausalLM if is_causal else AutoModel
    model = auto.from_pretrained(path, dtype=dtype, **kwargs)
    own_memory(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as err:
        logger.warning(f"No tokenizer could be loaded from {path} ({type(err).__name__}: {err}); the checkpoint will be "
                       "saved without tokenizer files unless you pass tokenizer=.")
        tokenizer = None
    return model, tokenizer, path


class ModelCompressor:
    """A float model (+ tokenizer) to compress, and where it came from (for the card's `base_model`)."""

    def __init__(self, model, tokenizer=None, source: str | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.source = source or getattr(model, "name_or_path", None)
        self.stats: dict = {}

    @classmethod
    def from_pretrained(cls, model_or_path, tokenizer=None, dtype=torch.float32, **kwargs):
        """Load a float model (folder, Hub id or alias such as `smollm2-135m`), or wrap a model object."""
        if not isinstance(model_or_path, (str, Path)):
            return cls(model_or_path, tokenizer)
        model, loaded_tokenizer, _ = load_pretrained(str(model_or_path), dtype=dtype, **kwargs)
        return cls(model, tokenizer or loaded_tokenizer, source=str(model_or_path))

    def calibration_ids(self, calibration_dataset, num_samples: int, seq_len: int) -> torch.Tensor:
        """Token windows `[num_samples, seq_len]` from a dataset name, a list of texts or ready ids."""
        from .calibration.data import calibration_ids

        return calibration_ids(self.tokenizer, calibration_dataset, num_samples, seq_len, type(self).__name__)
