"""Choose and prepare the CPU kernel of every compressed layer of a model (after loading or quantizing it)."""

from __future__ import annotations

import os
from collections import Counter

from transformers.utils import logging

from .embedding import QuantHead
from .kernels import DECODE_MAX_TOKENS, HEAD_KERNELS, KERNELS, KERNELS_ENV, bf16_matmul_is_fast, choose_kernel
from .linear import QuantLinear
from .memory import release_free_memory


logger = logging.get_logger(__name__)


def prepare_kernels(model, policy: str | None = None, activations: str | None = None) -> dict[str, str]:
    """Repack every `QuantLinear` (and int8 `QuantHead`) of `model` for its fastest kernel; returns
    `{layer: kernel or "reference"}`.

    Logs once which kernel the layers use, and warns, with the reason, for layers left on the slow reference path.
    `policy="reference"` (or `OPTIMUM_AGENTOS_KERNELS=reference`) keeps every layer on the reference path.
    `activations` (default: the model's `quantization_config.activations`) = `"int8-dynamic"` allows the W8A8 kernel.
    """
    policy = policy or os.environ.get(KERNELS_ENV, "auto")
    if policy not in ("auto", "reference"):
        raise ValueError(f"Unknown kernel policy {policy!r}; use 'auto' or 'reference'.")
    if activations is None:
        config = getattr(getattr(model, "config", None), "quantization_config", None)
        activations = config.get("activations") if isinstance(config, dict) else getattr(config, "activations", None)
    chosen, slow = {}, {}
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            candidates = KERNELS
            module.restore_weight()
        elif isinstance(module, QuantHead):
            candidates = HEAD_KERNELS
        else:
            continue
        kernel, reason = (None, "policy 'reference'") if policy == "reference" else choose_kernel(
            module, activations, candidates)
        if kernel is not None:
            kernel.prepare(module)
        module.kernel = kernel
        module.prefill_bf16 = policy == "auto" and bf16_matmul_is_fast() and module.weight.device.type == "cpu"
        chosen[name] = kernel.name if kernel else "reference"
        if kernel is None:
            slow[name] = reason
    if any(kernel != "reference" for kernel in chosen.values()):
        release_free_memory()  # repacking freed about 4 bytes per weight of temporaries
    if chosen:
        counts = ", ".join(f"{k} x{n}" for k, n in Counter(chosen.values()).items())
        logger.info(f"QuantLinear kernels: {counts} (bf16 packed kernels serve calls of <= {DECODE_MAX_TOKENS} "
                    "tokens, longer inputs dequantize and use F.linear; int8-dynamic serves every call "
                    "without autograd)")
    if slow and policy == "auto":
        first, why = next(iter(slow.items()))
        logger.warning(f"{len(slow)} QuantLinear layers have no fast CPU kernel and dequantize on every call "
                       f"(slow at decode), e.g. {first}: {why}")
    return chosen
