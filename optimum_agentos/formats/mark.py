"""Mark an in-memory compressed model as an `agentos` checkpoint, so `save_pretrained`/`push_to_hub` write it."""

from __future__ import annotations

from ..config import QUANT_METHOD, AgentOSConfig
from ..nn.prepare import prepare_kernels
from .kept_weights import round_kept_weights


def mark_compressed(model, config: AgentOSConfig) -> None:
    """Attach the `agentos` quantizer (looked up in transformers' registry, where `import optimum_agentos` put it)
    and the stamped config; round the kept float weights and prepare the kernels, so the in-memory model computes
    exactly as the reloaded one will."""
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING

    config = config.stamped()
    round_kept_weights(model, config.float_dtype)
    model.hf_quantizer = AUTO_QUANTIZER_MAPPING[QUANT_METHOD](config, pre_quantized=True)
    model.is_quantized = True
    model.quantization_method = QUANT_METHOD
    model.config.quantization_config = config
    prepare_kernels(model)
