"""Quantization-aware training (QAT): train an agentos-quantized model through its rounding, then pack it back.

`prepare_qat` swaps every `QuantLinear` for a `FakeQuantLinear` (a float weight started from the dequantized codes,
rounded onto the layer's grid in the forward pass, straight-through gradients), so any `transformers.Trainer` (or
`DistillationTrainer`, teacher = the float model) can train it. `convert_qat` packs the trained weights back into
`QuantLinear` layers of the same format and marks the model again, so `save_pretrained` writes a normal `agentos`
checkpoint that `from_pretrained` reloads bit-exactly. `QATCallback` checks the model at the start of training and
converts it at the end.
"""

from __future__ import annotations

from torch import nn
from transformers import TrainerCallback
from transformers.utils import logging

from ..config import QUANT_METHOD, AgentOSConfig
from ..formats.kept_weights import round_kept_weights
from ..formats.mark import mark_compressed
from ..nn.linear import QuantLinear
from ..nn.modeling import set_module
from ..nn.sparse_linear import SparseLinear
from .fake_quant import SCALE_MODES, FakeQuantLinear
from .rtn import quantize_model_rtn

logger = logging.get_logger(__name__)

QAT_CONFIG_ATTR = "_agentos_qat_config"  # the checkpoint's AgentOSConfig, kept on the model while it trains


def _quantized_config(model: nn.Module) -> AgentOSConfig | None:
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if isinstance(config, AgentOSConfig):
        return config
    if isinstance(config, dict) and config.get("quant_method") == QUANT_METHOD:
        return AgentOSConfig.from_dict(config)
    return None


def qat_layers(model: nn.Module) -> dict[str, FakeQuantLinear]:
    """The model's fake-quantized layers, by name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, FakeQuantLinear)}


def _check_model(model: nn.Module) -> None:
    if hasattr(model, "peft_config") or hasattr(model, "get_base_model"):
        raise ValueError("prepare_qat got a PEFT model: QAT trains the full quantized weights, not adapters. Call "
                         "prepare_qat on the base model (before get_peft_model), or train LoRA adapters on the "
                         "agentos model without QAT.")
    if qat_layers(model):
        raise ValueError("This model is already prepared for QAT (it has FakeQuantLinear layers); train it, then "
                         "call convert_qat(model).")
    if any(isinstance(m, SparseLinear) for m in model.modules()):
        raise ValueError("QAT of pruned (sparse) layers is not supported: the fake-quantized weight would refill the "
                         "pruned positions. Quantize the pruned float model with prepare_qat(model, config) instead, "
                         "or fine-tune it before quantizing.")


def prepare_qat(model: nn.Module, config: AgentOSConfig | None = None, scale_mode: str = "learned",
                freeze_others: bool = True) -> nn.Module:
    """Make a quantized model trainable through its rounding, in place; returns it.

    Args:
        model (`PreTrainedModel`): an agentos checkpoint loaded with `from_pretrained` (or quantized in memory by
            `Quantizer`), or a float model when `config` is given.
        config (`AgentOSConfig`, *optional*): quantize the float `model` with round to nearest (`method="rtn"`)
            first; leave it out for an already quantized model (its GPTQ/AWQ/... codes are the start).
        scale_mode (`str`, *optional*, defaults to `"learned"`): `"learned"` trains each group's scale too (its
            gradient taken with the codes held fixed), the zero points fixed; `"frozen"` keeps the start's scales and
            trains only where the weights round to, which needs the weights to travel half a grid step from where
            they start (on their grid points) before anything changes; `"minmax"` recomputes the scales from the
            weights' group min/max at every step. On a tiny random Llama int4 g64, 8 Adam steps on the KL to the
            float model (one batch of 8 text windows) left it at 0.042 with `"frozen"` (lr 1e-3: no code moved)
            and lowered it to 0.024 with `"learned"` (lr 1e-4).
        freeze_others (`bool`, *optional*, defaults to `True`): train only the quantized layers' weights and biases
            (embeddings, norms and the output head keep their values).

    Example:
    ```python
    >>> model = AutoModelForCausalLM.from_pretrained("smollm2-int4-gptq")
    >>> prepare_qat(model)
    >>> Trainer(model=model, args=args, train_dataset=train, callbacks=[QATCallback()]).train()
    >>> model.save_pretrained("smollm2-int4-qat")  # converted by QATCallback at the end of training
    ```
    """
    if scale_mode not in SCALE_MODES:
        raise ValueError(f"scale_mode={scale_mode!r} is not supported; use one of {SCALE_MODES}.")
    _check_model(model)
    loaded = _quantized_config(model)
    has_layers = any(isinstance(m, QuantLinear) for m in model.modules())
    if config is not None:
        if loaded is not None or has_layers:
            raise ValueError("config= quantizes a float model, but this model is already agentos-quantized; call "
                             "prepare_qat(model) without config to train from its codes.")
        if config.method != "rtn":
            raise ValueError(f"prepare_qat(model, config) starts from round to nearest, got method={config.method!r}. "
                             "For a calibrated start quantize with Quantizer first, then call prepare_qat(model).")
        if not config.is_quantized:
            raise ValueError("config has bits=None: QAT needs a quantized format (e.g. bits=4, group_size=128).")
        quantize_model_rtn(model, config)
        round_kept_weights(model, config.float_dtype)  # as saving will: the model trained is the model saved
        loaded = config
    elif not has_layers:
        raise ValueError(f"{type(model).__name__} has no agentos quantized layers (QuantLinear) to train. Load an "
                         "agentos checkpoint, or pass config=AgentOSConfig(bits=4, group_size=128) to quantize this "
                         "float model with round to nearest first.")
    if loaded.activations is not None:
        raise ValueError(f"QAT rounds the weights only; activations={loaded.activations!r} (W8A8) also rounds the "
                         "activations at run time, which this training would not see. Use a weight-only checkpoint.")
    if freeze_others:
        model.requires_grad_(False)
    count = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantLinear):
            set_module(model, name, FakeQuantLinear.from_quant_linear(module, loaded.sym, scale_mode))
            count += 1
    # While it trains, the model is a float model to transformers (the Trainer refuses "purely quantized" models,
    # and a checkpoint saved mid-training holds the float weights); convert_qat restores the agentos marks.
    setattr(model, QAT_CONFIG_ATTR, loaded)
    if getattr(model, "config", None) is not None and hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None
    logger.info(f"prepare_qat: {count} fake-quantized layers (scale_mode={scale_mode!r})")
    return model


def convert_qat(model: nn.Module) -> nn.Module:
    """Pack every `FakeQuantLinear` back into a `QuantLinear` (same bits, group size and scale dtype) and mark the
    model as an agentos checkpoint again, in place; returns it, ready for `save_pretrained`."""
    layers = qat_layers(model)
    config = getattr(model, QAT_CONFIG_ATTR, None)
    if not layers or config is None:
        raise ValueError(f"{type(model).__name__} has no fake-quantized layers to convert: call prepare_qat(model) "
                         "before training, and convert_qat(model) once after it.")
    for name, layer in layers.items():
        set_module(model, name, layer.to_quant_linear())
    delattr(model, QAT_CONFIG_ATTR)
    mark_compressed(model, config)
    model.eval()
    return model


class QATCallback(TrainerCallback):
    """Checks that the trained model was prepared with `prepare_qat`, and converts it when training ends.

    Args:
        convert_on_end (`bool`, *optional*, defaults to `True`): call `convert_qat` at the end of `train()`, so
            `trainer.save_model()` / `model.save_pretrained()` write the agentos checkpoint.
    """

    def __init__(self, convert_on_end: bool = True):
        self.convert_on_end = convert_on_end

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None and not qat_layers(model):
            raise ValueError("QATCallback: the model has no fake-quantized layers; call prepare_qat(model) before "
                             "building the Trainer.")

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.convert_on_end and model is not None and qat_layers(model):
            convert_qat(model)
