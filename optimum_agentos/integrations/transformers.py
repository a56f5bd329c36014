"""The transformers side of `quant_method: "agentos"`: config + `HfQuantizer`, registered on import."""

from __future__ import annotations

import torch
from transformers.core_model_loading import ConversionOps
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.utils import logging

from ..config import QUANT_METHOD, AgentOSConfig
from ..formats.checks import check_layer_tensors, check_safetensors, check_sparse_layers, check_sparse_value_shapes
from ..formats.kept_weights import round_kept_weights, state_dict_for_save
from ..formats.mark import mark_compressed
from ..formats.replace import dequantize_model, replace_with_quant_linear
from ..nn import qmath
from ..nn.embedding import QuantEmbedding, QuantHead, quantize_rows_int8
from ..nn.linear import SCALE_DTYPES, QuantLinear
from ..nn.memory import own_memory
from ..nn.packing import pack
from ..nn.prepare import prepare_kernels
from .peft import register_peft


logger = logging.get_logger(__name__)


class AgentOSQuantizeOp(ConversionOps):
    """Quantize-on-load: turns one float checkpoint weight into the packed tensors of its `QuantLinear`."""

    def __init__(self, hf_quantizer: "AgentOSHfQuantizer"):
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict, model=None, full_layer_name=None, missing_keys=None, **kwargs):
        target_key, value = next(iter(input_dict.items()))
        value = value[0] if isinstance(value, (list, tuple)) else value
        module = model.get_submodule(target_key.rpartition(".")[0])
        if isinstance(module, (QuantEmbedding, QuantHead)):
            codes, scale = quantize_rows_int8(value)
            return {target_key: codes, f"{target_key}_scale": scale}
        weight = value.t() if getattr(module, "transposed", False) else value
        config = self.hf_quantizer.quantization_config
        # the layer was built with its own bits and group size (layer_overrides): quantize to what it holds
        codes, scales, zeros = qmath.quantize_rtn(
            weight, module.bits, module.group_size, config.sym, SCALE_DTYPES[config.scale_dtype], config.mse_grid
        )
        return {
            target_key: pack(codes, module.bits),
            f"{target_key}_scale": scales,
            f"{target_key}_zero": zeros,
        }


class AgentOSHfQuantizer(HfQuantizer):
    """Loads `agentos` checkpoints (packed tensors 1:1 into `QuantLinear`) and quantizes float ones on load (RTN)."""

    requires_calibration = False
    quantization_config: AgentOSConfig

    def __init__(self, quantization_config: AgentOSConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        register_peft()  # LoRA over QuantLinear, for any model this quantizer loads or marks
        if not self.pre_quantized and (quantization_config.sparse_layers or quantization_config.module_shapes):
            raise ValueError(
                "sparse_layers/module_shapes describe a saved pruned checkpoint; they cannot be applied on load. "
                "Prune with `optimum_agentos.Pruner` instead."
            )
        if not self.pre_quantized and quantization_config.method != "rtn":
            raise ValueError(
                f"Quantize-on-load only supports method='rtn' (no calibration data at load time); got "
                f"method={quantization_config.method!r}. Use `optimum_agentos.Quantizer(...).quantize(...)` for GPTQ."
            )
        if not self.pre_quantized and quantization_config.smoothquant_alpha is not None:
            raise ValueError(
                "Quantize-on-load cannot apply smoothquant_alpha (it needs calibration data, absent at load time). Use "
                "`optimum_agentos.Quantizer(...).quantize(..., calibration_dataset='wikitext2')`."
            )

    def validate_environment(self, *args, **kwargs):
        """Any device map works, disk offload included: accelerate's hooks load an offloaded layer's packed tensors
        before it runs, and such layers compute on the reference path (dequantize, then matmul)."""

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        if self.pre_quantized:
            return False
        module_name, _, tensor_name = param_name.rpartition(".")
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            return False
        return isinstance(module, (QuantLinear, QuantEmbedding, QuantHead)) and tensor_name == "weight"

    def get_quantize_ops(self):
        return AgentOSQuantizeOp(self)

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        headers = {}
        for file in checkpoint_files or []:
            if str(file).endswith(".safetensors"):
                headers.update(check_safetensors(file))
        names = replace_with_quant_linear(model, self.quantization_config)
        check_sparse_value_shapes(model, self.quantization_config, headers)
        if self.pre_quantized:  # every compressed layer's tensors are in the files, with the shapes config.json implies
            check_layer_tensors(model, headers, getattr(model, "all_tied_weights_keys", None))
        logger.info(f"agentos: {len(names)} compressed layers")
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        check_sparse_layers(model, self.quantization_config)
        if not self.pre_quantized:
            round_kept_weights(model, self.quantization_config.float_dtype)
        self.quantization_config = self.quantization_config.stamped()
        model.config.quantization_config = self.quantization_config
        prepare_kernels(model)
        own_memory(model)  # tensors still viewing the checkpoint file get their own copies; its pages go
        return model

    def get_state_dict_and_metadata(self, model):
        return state_dict_for_save(model, self.quantization_config.float_dtype), {}

    def update_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return dtype

    def is_serializable(self, safe_serialization=None):
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        """Full fine-tuning (no adapters) of a checkpoint that holds only float weights: a prune that only changed
        layer shapes (`module_shapes`, e.g. a non-uniform structured or column prune) trains like a plain model."""
        config = self.quantization_config
        return config.bits is None and not config.sparse_layers and config.embedding_bits is None

    @property
    def is_compileable(self) -> bool:
        return True

    def _dequantize(self, model, dtype=None):
        return dequantize_model(model, dtype)


# Kept for code that marked models through this module; algorithms use `formats.mark.mark_compressed`.
attach_quantizer = mark_compressed


def register() -> None:
    """Register `"agentos"` with transformers once (importing the package twice must not raise)."""
    if AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is not AgentOSConfig:
        register_quantization_config(QUANT_METHOD)(AgentOSConfig)
    if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not AgentOSHfQuantizer:
        register_quantizer(QUANT_METHOD)(AgentOSHfQuantizer)
