"""Block-by-block calibration: run calibration data through one decoder block at a time, collecting each target
layer's input Hessian (or another input statistic) with forward hooks (no tracing, no whole-model activation store).

Peak memory is the model plus one block's inputs for the calibration set. GPTQ here, SparseGPT/Wanda in the pruner
and SmoothQuant's activation maxima plug in through `process_block`.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.utils import logging

from .accumulators import HessianAccumulator


logger = logging.get_logger(__name__)


class _StopForward(Exception):
    """Raised by the capture hook once the first block's inputs are stored."""


def find_blocks(model: nn.Module, layer_names: list[str]) -> tuple[str, nn.ModuleList]:
    """The `nn.ModuleList` of repeated blocks (decoder/encoder layers) holding the most target layers."""
    best, best_count = None, 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            prefix = f"{name}."
            count = sum(n.startswith(prefix) for n in layer_names)
            if count > best_count:
                best, best_count = (name, module), count
    if best is None:
        raise ValueError(
            f"{type(model).__name__} has no list of repeated blocks holding the target layers; calibrated methods "
            "need one (e.g. model.layers). Use method='rtn' instead."
        )
    return best


def capture_block_inputs(model: nn.Module, first_block: nn.Module, batches: list[torch.Tensor], into=None) -> list[tuple]:
    """Run the model up to `first_block` for each batch and keep that block's `(args, kwargs)` (appended to `into`,
    a list-like store such as `streaming.ActivationBuffer`, when given)."""
    captured = [] if into is None else into

    def hook(module, args, kwargs):
        captured.append((args, kwargs))
        raise _StopForward

    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for ids in batches:
            try:
                model(input_ids=ids, **({"use_cache": False} if _accepts_use_cache(model) else {}))
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


def _accepts_use_cache(model: nn.Module) -> bool:
    return hasattr(getattr(model, "config", None), "use_cache")


class _SharedInputStats:
    """One accumulator per distinct input tensor: q/k/v (or gate/up) read the same tensor and share one Hessian
    (or other statistic).

    `accumulator(in_features, device=...)` makes one; it has an `add(x)` method (default `HessianAccumulator`)."""

    def __init__(self, accumulator: Callable = HessianAccumulator):
        self.accumulator = accumulator
        self.of_layer: dict[str, Any] = {}
        self._seen: list[tuple[weakref.ref, Any]] = []

    def new_batch(self) -> None:
        self._seen = []

    def add(self, name: str, x: torch.Tensor) -> None:
        for ref, acc in self._seen:
            if ref() is x:  # a weak reference: the input is freed when the block is done with it, and a dead
                self.of_layer.setdefault(name, acc)  # reference never matches a new tensor at a reused address
                return
        acc = self.of_layer.setdefault(name, self.accumulator(x.shape[-1], device=x.device))
        acc.add(x)
        self._seen.append((weakref.ref(x), acc))


def hidden_states_of(output):
    """A block's hidden states: the first element when it returns a tuple."""
    return output[0] if isinstance(output, (tuple, list)) else output


EVAL_BATCHES = 4  # block-output errors reported by training steps are measured on the first batches only


def block_outputs(block: nn.Module, inputs: list[tuple]) -> list[torch.Tensor]:
    """The block's hidden-state output for each `(args, kwargs)` batch, detached (training targets)."""
    with torch.no_grad():
        return [hidden_states_of(block(*args, **kwargs)).detach() for args, kwargs in inputs]


def block_call(block: nn.Module, args, kwargs, weights: dict | None = None):
    """`block(*args, **kwargs)`, with `weights` (parameter name -> tensor) in place of its own parameters."""
    if not weights:
        return block(*args, **kwargs)
    return torch.func.functional_call(block, weights, args, kwargs)


def block_output_error(block: nn.Module, inputs: list[tuple], targets: list[torch.Tensor],
                       weights: dict | None = None) -> float:
    """Mean squared error of the block's output against `targets` over `inputs` (one float: all elements)."""
    with torch.no_grad():
        total = sum(nn.functional.mse_loss(hidden_states_of(block_call(block, args, kwargs, weights)).float(), t.float(),
                                           reduction="sum").item() for (args, kwargs), t in zip(inputs, targets))
    return total / sum(t.numel() for t in targets)


@torch.no_grad()
def run_blocks(
    model: nn.Module,
    layer_names: list[str],
    calibration_ids: torch.Tensor,
    process: Callable[[nn.Module, dict[str, nn.Module], list[tuple]], None],
    batch_size: int = 4,
    desc: str = "Calibrating",
    stream=None,
    float_targets: bool = False,
) -> list[str]:
    """Calibrate every block holding target layers, in order; returns the target layers no block holds.

    `process(block, layers, inputs)` receives the block, its target layers by full name and the block's inputs, one
    `(args, kwargs)` per batch (read them, do not change them); it replaces or edits the layers in place. The block
    is then run again so the next block sees the inputs the compressed model will produce. Runs under `no_grad`: a
    `process` that trains enables gradients itself.

    `float_targets=True` also runs the float model beside the compressed one (a second copy of the block inputs in
    memory): `process` then gets `targets=`, the float model's outputs of this block, one per batch, computed from the
    float model's own inputs before `process` changes the block (learned rounding trains towards them).

    `stream` (a `streaming.BlockStream`, for checkpoints larger than memory) keeps the block inputs in its
    `buffer(calibration_ids)`, loads each block before it runs (`load_block(name)`) and writes and frees it after
    (`done_block(name)`).
    """
    if calibration_ids.numel() == 0:
        raise ValueError("The calibration set is empty; pass at least one window of token ids.")
    if float_targets and stream is not None:
        raise ValueError("float_targets keeps a second copy of the block inputs in memory, which streaming (for "
                         "checkpoints larger than memory) does not hold; run without a stream.")
    was_training = model.training
    model.eval()
    blocks_name, blocks = find_blocks(model, layer_names)
    batches = list(torch.split(calibration_ids, batch_size))
    inputs = capture_block_inputs(model, blocks[0], batches,
                                  into=stream.buffer(calibration_ids) if stream is not None else None)
    float_inputs = list(inputs) if float_targets else None  # the float model's inputs (the same tensors at first)
    covered = set()
    for index in tqdm(range(len(blocks)), desc=desc, unit="block"):
        prefix = f"{blocks_name}.{index}."
        names = [n for n in layer_names if n.startswith(prefix)]
        block = blocks[index]
        if stream is not None:
            stream.load_block(f"{blocks_name}.{index}")
        targets = None if float_inputs is None else block_outputs(block, float_inputs)  # the block is still float
        if names:
            covered.update(names)
            # only this dict holds the layers, so a `process` that pops what it replaced frees it at once
            layers = {n: model.get_submodule(n) for n in names}
            if targets is None:
                process(block, layers, inputs)
            else:
                process(block, layers, inputs, targets=targets)
        if index + 1 < len(blocks):
            for i, (args, kwargs) in enumerate(inputs):  # in place: each batch's old input is freed at once
                inputs[i] = ((hidden_states_of(block(*args, **kwargs)),) + tuple(args[1:]), kwargs)
            if float_inputs is not None:
                float_inputs = [((t,) + tuple(args[1:]), kwargs) for t, (args, kwargs) in zip(targets, float_inputs)]
        if stream is not None:
            stream.done_block(f"{blocks_name}.{index}")
    model.train(was_training)
    return [n for n in layer_names if n not in covered]


@torch.no_grad()
def collect_input_stats(block: nn.Module, layers: dict[str, nn.Module], inputs: list[tuple],
                        accumulator: Callable = HessianAccumulator) -> dict[str, Any]:
    """Run `block` over its `inputs` and return one input statistic per target layer (layers reading the same
    tensor share one), made by `accumulator` (default: the input Hessian)."""
    stats = _SharedInputStats(accumulator)
    handles = [module.register_forward_hook(lambda m, args, out, n=n: stats.add(n, args[0]))
               for n, module in layers.items()]
    try:
        for args, kwargs in inputs:
            stats.new_batch()
            block(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    stats.new_batch()
    return stats.of_layer


def run_blockwise(
    model: nn.Module,
    layer_names: list[str],
    calibration_ids: torch.Tensor,
    process_block: Callable[[dict[str, nn.Module], dict[str, Any]], None],
    batch_size: int = 4,
    desc: str = "Calibrating",
    accumulator: Callable = HessianAccumulator,
    stream=None,
) -> list[str]:
    """`run_blocks` for algorithms that need only an input statistic per layer: `process_block(layers, hessians)`
    receives the block's target layers by full name and their input Hessian accumulators (or what `accumulator`
    makes)."""

    def process(block, layers, inputs):
        process_block(layers, collect_input_stats(block, layers, inputs, accumulator))

    return run_blocks(model, layer_names, calibration_ids, process, batch_size, desc, stream)


@torch.no_grad()
def run_with_hooks(model: nn.Module, calibration_ids: torch.Tensor, batch_size: int, hooks: list, desc: str) -> None:
    """Run the decoder stack (not the LM head: no vocabulary-sized logits) over the calibration set with `hooks`
    registered as `(module, pre_hook_fn)` or `(module, fn, "forward")`."""
    if calibration_ids is None or calibration_ids.numel() == 0:
        raise ValueError("The calibration set is empty; pass at least one window of token ids.")
    device = next(model.parameters()).device
    handles = []
    for module, fn, *kind in hooks:
        if kind and kind[0] == "forward":
            handles.append(module.register_forward_hook(fn, with_kwargs=True))
        else:
            handles.append(module.register_forward_pre_hook(fn))
    was_training = model.training
    model.eval()
    try:
        for ids in tqdm(torch.split(calibration_ids, batch_size), desc=desc, unit="batch"):
            model.base_model(input_ids=ids.to(device), use_cache=False)  # model.model, model.transformer, ...
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
