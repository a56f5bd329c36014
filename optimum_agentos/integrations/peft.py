"""LoRA over `QuantLinear` (QLoRA-style): the frozen quantized base plus trainable float adapters.

PEFT only dispatches LoRA onto layer types it knows; `register_peft()` adds a dispatcher for `QuantLinear` to
`LoraModel` so plain `get_peft_model(model, LoraConfig(...))` works. It is called when an agentos model is
loaded or quantized, so `import optimum_agentos` itself never imports PEFT.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn

from ..nn import qmath
from ..nn.linear import QuantLinear


_REGISTERED = False


def _lora_class():
    from peft.tuners.lora.layer import LoraLayer

    class QuantLinearLora(nn.Module, LoraLayer):
        """A LoRA layer whose base is a `QuantLinear`; merging dequantizes, adds the delta and requantizes."""

        def __init__(self, base_layer: QuantLinear, adapter_name: str, config, r: int = 0, lora_alpha: int = 1, **kwargs):
            if config.use_dora:
                raise ValueError("DoRA over agentos QuantLinear is not supported; set use_dora=False.")
            super().__init__()
            LoraLayer.__init__(self, base_layer)
            self.fan_in_fan_out = False
            self._active_adapter = adapter_name
            self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

        def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            result = self.base_layer(x)
            if self.disable_adapters or self.merged:
                return result
            for name in self.active_adapters:
                if name not in self.lora_A:
                    continue
                lora_a, lora_b = self.lora_A[name], self.lora_B[name]
                out = lora_b(lora_a(self.lora_dropout[name](x.to(lora_a.weight.dtype))))
                result = result + (out * self.scaling[name]).to(result.dtype)
            return result

        def get_delta_weight(self, adapter: str) -> torch.Tensor:
            return (self.lora_B[adapter].weight @ self.lora_A[adapter].weight) * self.scaling[adapter]

        def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
            base: QuantLinear = self.get_base_layer()
            names = adapter_names or self.active_adapters
            weight = base.dequantize(torch.float32)
            for name in names:
                if name in self.lora_A:
                    weight = weight + self.get_delta_weight(name).float()
                    self.merged_adapters.append(name)
            if safe_merge and not torch.isfinite(weight).all():
                raise ValueError(f"Merging adapters {names} produced non-finite weights; nothing was merged.")
            sym = bool((base.weight_zero == (1 << (base.bits - 1))).all())
            codes, scales, zeros = qmath.quantize_rtn(weight, base.bits, base.group_size, sym, base.weight_scale.dtype)
            base.load_codes(codes, scales, zeros)

        def unmerge(self) -> None:
            raise ValueError(
                "Merged LoRA weights were requantized into the int codes; unmerging cannot recover the original "
                "codes. Reload the checkpoint instead."
            )

        def __repr__(self) -> str:
            return "lora." + super().__repr__()

    return QuantLinearLora


def register_peft() -> bool:
    """Teach PEFT's `LoraModel` to wrap `QuantLinear`; a no-op when PEFT is missing or already done."""
    global _REGISTERED
    if _REGISTERED:
        return True
    if importlib.util.find_spec("peft") is None:
        return False
    from peft.tuners.lora.model import LoraModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    lora_cls = _lora_class()
    original = LoraModel._create_new_module

    def create_new_module(lora_config, adapter_name, target, **kwargs):
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if isinstance(base, QuantLinear):
            return lora_cls(target, adapter_name, config=lora_config, **kwargs)
        return original(lora_config, adapter_name, target, **kwargs)

    LoraModel._create_new_module = staticmethod(create_new_module)
    _REGISTERED = True
    return True
