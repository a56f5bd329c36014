"""Trainer callbacks that keep pruned weights at zero while a pruned model is fine-tuned to recover its accuracy.

Mask names are module names of the underlying transformers model: a `DistributedDataParallel`-style wrapper
(`.module`) and a PEFT model (`get_base_model()`) are unwrapped and PEFT's `.base_layer` is hidden, so masks taken
from the plain model (`model.layers.0.self_attn.q_proj`) also fit it after `get_peft_model` (a fully prefixed name
such as `base_model.model.model.layers.0.self_attn.q_proj.base_layer` is accepted too). LoRA adapters are never
masked; merging them into the base weights fills the zeros back in.
"""

from __future__ import annotations

import re

import torch
from torch import nn
from transformers import TrainerCallback
from transformers.utils import logging

from ..config import DEFAULT_IGNORE
from ..nn.linear import float_weight, is_conv1d
from ..nn.targets import is_supported_layer, matches
from .masks import check_n_m, check_sparsity, magnitude_scores, mask_from_scores, parse_pattern


logger = logging.get_logger(__name__)


def cubic_sparsity(
    step: int, final_sparsity: float, initial_sparsity: float = 0.0, start_step: int = 0, end_step: int = 1
) -> float:
    """Zhu & Gupta (2017): `s_f + (s_i - s_f) * (1 - (t - t0) / (t_end - t0)) ** 3`, prunes fast first, then slowly.

    `initial_sparsity` before `start_step`, `final_sparsity` from `end_step` on.
    """
    if step <= start_step:
        return initial_sparsity
    if step >= end_step:
        return final_sparsity
    progress = (step - start_step) / (end_step - start_step)
    return final_sparsity + (initial_sparsity - final_sparsity) * (1.0 - progress) ** 3


def _unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside DDP-like (`.module`) and PEFT (`get_base_model()`) wrappers."""
    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    if hasattr(model, "get_base_model") and hasattr(model, "peft_config"):
        model = model.get_base_model()
    return model


def _canonical(name: str) -> str:
    """Strip the prefixes and suffix that wrappers add: `module.`, PEFT's `base_model.model.` and `.base_layer`."""
    name = re.sub(r"^(module\.)*(base_model\.model\.)?", "", name)
    return name.replace(".base_layer", "")


def _all_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every nn.Linear/Conv1D by canonical name; a PEFT tuner layer stands for its base layer, adapters are skipped."""
    layers, tuner_prefixes = {}, []
    for name, module in _unwrap(model).named_modules():
        if not name or any(name.startswith(p) for p in tuner_prefixes):
            continue
        if hasattr(module, "get_base_layer") and hasattr(module, "base_layer"):  # PEFT BaseTunerLayer
            tuner_prefixes.append(name + ".")
            module = module.get_base_layer()
        if is_supported_layer(module):
            layers[_canonical(name)] = module
    return layers


def _select_layers(model: nn.Module, target: list[str] | None, ignore) -> dict[str, nn.Module]:
    """The layers chosen by `target`/`ignore` (same syntax as `AgentOSConfig`); raises when nothing is selected."""
    layers = _all_layers(model)
    names = list(layers)
    if target is not None:
        names = []
        for pattern in target:
            hits = [n for n in layers if matches(n, pattern)]
            if not hits:
                raise ValueError(
                    f"Target pattern {pattern!r} matches no linear layer; names look like {list(layers)[:3]}."
                )
            names.extend(h for h in hits if h not in names)
    names = [n for n in names if not any(matches(n, p) for p in ignore or [])]
    if not names:
        raise ValueError(f"No linear layer left to prune (target={target}, ignore={ignore}).")
    return {n: layers[n] for n in names}


def masks_from_zeros(
    model: nn.Module, target: list[str] | None = None, ignore=DEFAULT_IGNORE
) -> dict[str, torch.Tensor]:
    """`{module name: weight == 0}` for the selected layers: a pruned model's zeros become its masks."""
    return {name: module.weight.detach() == 0 for name, module in _select_layers(model, target, ignore).items()}


class MaskFixedCallback(TrainerCallback):
    """Keeps pruned weights exactly zero during fine-tuning.

    Their gradients are zeroed by tensor hooks (so optimizer moments stay zero) and the weights are re-zeroed after
    every optimizer step (weight decay or stale moments could still move them). Hooks are removed on train end.

    Args:
        masks (`dict[str, torch.Tensor]`, *optional*):
            Module name -> bool mask shaped like the module's weight (`[in, out]` for GPT-2's `Conv1D`), `True` where
            pruned. `None` takes the zeros of the selected layers when training begins (`masks_from_zeros`).
        target (`list[str]`, *optional*):
            Layers to take masks from when `masks` is `None`; same syntax as `AgentOSConfig.target`.
        ignore (`list[str]`, *optional*):
            Layers left alone; `None` means the output head and embeddings (`DEFAULT_IGNORE`).
    """

    def __init__(self, masks: dict[str, torch.Tensor] | None = None, target=None, ignore=None):
        self._given = masks
        self.target = target
        self.ignore = list(DEFAULT_IGNORE) if ignore is None else ignore
        self.masks: dict[str, torch.Tensor] = {}
        self._layers: dict[str, nn.Module] = {}
        self._hooks = []

    def _bind(self, model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
        """Check `masks` against `model`, keep them on the weights' devices and hook the weights' gradients."""
        layers = _all_layers(model)
        self.masks, self._layers = {}, {}
        for name, mask in masks.items():
            key = _canonical(name)
            if key not in layers:
                raise ValueError(
                    f"Mask names module {name!r}, which is not a linear layer of the model; "
                    f"names look like {list(layers)[:3]}."
                )
            weight = layers[key].weight
            if tuple(mask.shape) != tuple(weight.shape):
                hint = " (Conv1D weights are [in, out])" if is_conv1d(layers[key]) else ""
                raise ValueError(
                    f"Mask for {name!r} has shape {tuple(mask.shape)}, weight is {tuple(weight.shape)}{hint}."
                )
            self.masks[key] = mask.to(device=weight.device, dtype=torch.bool)
            self._layers[key] = layers[key]
        self._remove_hooks()
        for key, module in self._layers.items():
            if module.weight.requires_grad:  # frozen base weights under LoRA get no gradient
                hook = module.weight.register_hook(lambda grad, key=key: grad.masked_fill(self.masks[key], 0))
                self._hooks.append(hook)

    def _apply(self, optimizer=None) -> None:
        """Zero the masked weights and, when given, the matching entries of the optimizer's per-weight state."""
        state = getattr(optimizer, "state", None) or {}
        with torch.no_grad():
            for key, module in self._layers.items():
                mask = self.masks[key]
                module.weight.masked_fill_(mask, 0)
                for value in state.get(module.weight, {}).values():
                    if torch.is_tensor(value) and value.shape == mask.shape:
                        value.masked_fill_(mask, 0)

    def _remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        masks = self._given if self._given is not None else masks_from_zeros(model, self.target, self.ignore)
        self._bind(model, masks)
        self._apply(optimizer)
        pruned = sum(int(m.sum()) for m in self.masks.values())
        logger.info(f"MaskFixedCallback: keeping {pruned} weights of {len(self.masks)} layers at zero.")

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self._apply()

    def on_train_end(self, args, state, control, **kwargs):
        self._remove_hooks()


class GradualPruningCallback(MaskFixedCallback):
    """Magnitude pruning during training on the cubic schedule of Zhu & Gupta (2017).

    Every `frequency` optimizer steps from `start_step` to `end_step` (and at `end_step`) each selected layer is
    re-masked by weight magnitude to the schedule's sparsity, the same in every row; in between and after, the masks
    are held fixed exactly as by `MaskFixedCallback`. With an `"N:M"` pattern the schedule anneals unstructured
    per-row masks up to `1 - N/M`, and at `end_step` the masks snap to the N:M pattern (N largest of every M inputs),
    leaving the steps after `end_step` to recover from the switch.

    Args:
        final_sparsity (`float`):
            Fraction of each row pruned at the end, in [0, 1); with a pattern it must equal `1 - N/M`.
        initial_sparsity (`float`, *optional*, defaults to `0.0`):
            Sparsity applied at `start_step`; at most `final_sparsity`.
        start_step (`int`, *optional*, defaults to `0`):
            First optimizer step that prunes.
        end_step (`int`, *optional*):
            Step at which `final_sparsity` is reached; `None` means 75% of `max_steps`, leaving a quarter to recover.
        frequency (`int`, *optional*, defaults to `10`):
            Optimizer steps between two pruning steps.
        pattern (`str`, *optional*):
            `"N:M"` (e.g. `"2:4"`) for semi-structured sparsity, `None` for unstructured.
        target (`list[str]`, *optional*):
            Layers to prune; same syntax as `AgentOSConfig.target`. `None` means every linear layer not ignored.
        ignore (`list[str]`, *optional*):
            Layers left dense; `None` means the output head and embeddings.
    """

    def __init__(self, final_sparsity: float, initial_sparsity: float = 0.0, start_step: int = 0, end_step=None,
                 frequency: int = 10, pattern: str | None = None, target=None, ignore=None):
        super().__init__(None, target, ignore)
        check_sparsity(final_sparsity)
        check_sparsity(initial_sparsity)
        if initial_sparsity > final_sparsity:
            raise ValueError(f"initial_sparsity={initial_sparsity} must not exceed final_sparsity={final_sparsity}.")
        if frequency < 1 or start_step < 0:
            raise ValueError(f"frequency={frequency} must be >= 1 and start_step={start_step} >= 0.")
        if end_step is not None and end_step <= start_step:
            raise ValueError(f"end_step={end_step} must be after start_step={start_step}.")
        self.n_m = parse_pattern(pattern)
        if self.n_m and abs(final_sparsity - (1 - self.n_m[0] / self.n_m[1])) > 1e-6:
            raise ValueError(
                f"pattern={pattern!r} prunes {1 - self.n_m[0] / self.n_m[1]:g}, not final_sparsity={final_sparsity}."
            )
        self.final_sparsity, self.initial_sparsity = final_sparsity, initial_sparsity
        self.start_step, self.end_step, self.frequency = start_step, end_step, frequency
        self.current_sparsity = 0.0

    def _prune(self, step: int, optimizer=None) -> None:
        sparsity = cubic_sparsity(step, self.final_sparsity, self.initial_sparsity, self.start_step, self._end)
        n_m = self.n_m if step >= self._end else None
        for key, module in self._layers.items():
            scores = magnitude_scores(float_weight(module))
            mask = mask_from_scores(scores, sparsity, per_row=True, n_m=n_m)
            self.masks[key] = (mask.t() if is_conv1d(module) else mask).contiguous()
        self.current_sparsity = sparsity
        self._apply(optimizer)
        logger.info(f"GradualPruningCallback: step {step}, sparsity {sparsity:.4f}{' (N:M)' if n_m else ''}.")

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._end = self.end_step if self.end_step is not None else int(0.75 * state.max_steps)
        if self._end <= self.start_step:
            raise ValueError(
                f"end_step={self._end} (75% of max_steps={state.max_steps}) is not after start_step={self.start_step}."
            )
        layers = _select_layers(model, self.target, self.ignore)
        if self.n_m:
            for name, module in layers.items():
                check_n_m(float_weight(module).shape[1], self.n_m, name)
        self._bind(model, {n: torch.zeros_like(m.weight, dtype=torch.bool) for n, m in layers.items()})
        if state.global_step >= self.start_step:
            self._prune(min(state.global_step, self._end), optimizer)

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        step = state.global_step
        due = (step - self.start_step) % self.frequency == 0 or step == self._end
        if self.start_step <= step <= self._end and due:
            self._prune(step, optimizer)
