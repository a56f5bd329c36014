"""What `Quantizer` and `Pruner` share: loading the float model and turning a calibration spec into token ids."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers.utils import logging


logger = logging.get_logger(__name__)


def load_pretrained(model_or_path: str, dtype=torch.float32, **kwargs):
    """Resolve an alias (`smollm2-135m`), folder or Hub id and load model + tokenizer (never `trust_remote_code`)."""
    from transformers import AutoConfig

    from .models import resolve_model
    from .nn.memory import own_memory

    path = resolve_model(model_or_path)
    config = AutoConfig.from_pretrained(path, **kwargs)
    model = auto_class(config).from_pretrained(path, dtype=dtype, **kwargs)
    own_memory(model)
    return model, load_tokenizer(path, **kwargs), path


def auto_class(config):
    """`AutoModelForCausalLM` for causal LMs (so the head is kept), else `AutoModel`."""
    from transformers import AutoModel, AutoModelForCausalLM

    is_causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in (config.architectures or []))
    return AutoModelForCausalLM if is_causal else AutoModel


def load_tokenizer(path: str, **kwargs):
    """The tokenizer saved with a model, or None (with a warning) when there is none."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as err:
        logger.warning(f"No tokenizer could be loaded from {path} ({type(err).__name__}: {err}); the checkpoint will be "
                       "saved without tokenizer files unless you pass tokenizer=.")
        tokenizer = None
    return tokenizer


def open_streamed(model_or_path: str, dtype=torch.float32, device=None, **kwargs):
    """A float checkpoint folder (or alias) opened for streamed compression: `(StreamedModel, tokenizer, path)`."""
    from transformers import AutoConfig

    from .models import resolve_model
    from .streaming.skeleton import open_streamed as open_checkpoint

    path = resolve_model(model_or_path)
    config = AutoConfig.from_pretrained(path, **kwargs)
    streamed = open_checkpoint(path, config, auto_class(config), dtype, device)
    return streamed, load_tokenizer(path, **kwargs), path


class ModelCompressor:
    """A float model (+ tokenizer) to compress, and where it came from (for the card's `base_model`).

    Opened with `streaming=True`, `model` is a skeleton without weights and `streamed` reads the checkpoint block by
    block: compressing then writes the output folder block by block (see `optimum_agentos.streaming`)."""

    streamed = None

    def __init__(self, model, tokenizer=None, source: str | None = None, device=None):
        from .nn.devices import resolve_device

        self.model = model
        self.tokenizer = tokenizer
        self.source = source or getattr(model, "name_or_path", None)
        self.stats: dict = {}
        self.device = resolve_device(device)  # where blocks are calibrated ("cpu", "cuda", "auto"); errors early

    def block_stream(self, layer_names: list[str]):
        """For `run_blockwise(..., stream=...)` of an in-memory model: None on the CPU, else the block mover."""
        if self.device.type == "cpu":
            return None
        from .calibration.runner import find_blocks
        from .streaming.device import DeviceBlocks

        return DeviceBlocks(self.model, find_blocks(self.model, layer_names)[0], self.device)

    @classmethod
    def from_pretrained(cls, model_or_path, tokenizer=None, dtype=torch.float32, streaming: bool = False,
                        device=None, **kwargs):
        """Load a float model (folder, Hub id or alias such as `smollm2-135m`), or wrap a model object.

        `device` ("cpu", "cuda", "cuda:1", "auto": an accelerator when there is one) is where each block is
        calibrated and compressed (it moves there and back; the model stays in CPU memory). `streaming=True` reads
        nothing but the safetensors headers now: compression then loads one block at a time (in `dtype`, on
        `device`) and writes each compressed block at once, so a model larger than memory can be compressed."""
        if not isinstance(model_or_path, (str, Path)):
            if streaming:
                raise ValueError("streaming=True needs a checkpoint folder (or alias) to read block by block, not a "
                                 "model object; pass the folder the model was saved to.")
            return cls(model_or_path, tokenizer, device=device)
        if streaming:
            streamed, loaded_tokenizer, _ = open_streamed(str(model_or_path), dtype, device, **kwargs)
            compressor = cls(streamed.model, tokenizer or loaded_tokenizer, source=str(model_or_path), device=device)
            compressor.streamed = streamed
            return compressor
        model, loaded_tokenizer, _ = load_pretrained(str(model_or_path), dtype=dtype, **kwargs)
        return cls(model, tokenizer or loaded_tokenizer, source=str(model_or_path), device=device)

    def calibration_ids(self, calibration_dataset, num_samples: int, seq_len: int) -> torch.Tensor:
        """Token windows `[num_samples, seq_len]` from a dataset name, a list of texts or ready ids."""
        from .calibration.data import calibration_ids

        return calibration_ids(self.tokenizer, calibration_dataset, num_samples, seq_len, type(self).__name__)
