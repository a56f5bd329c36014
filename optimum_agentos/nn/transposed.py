"""`dequant-t`: a long-input path for CPUs without native bfloat16 (no AVX512-BF16, no AMX).

On such CPUs the bf16 paths run emulated, so long inputs compute in float32 and the cost beside the matmul is
dequantizing the weight on every call. Two things make that cheap here:

- the codes are kept once more, unpacked to one byte per weight and transposed to `[in, out]`: dequantizing is then a
  contiguous uint8 -> float32 copy plus one multiply-add whose group scales broadcast along the contiguous `out`
  dimension, about 4x faster than unpacking the int4 kernel's interleaved nibbles (measured on an Intel Xeon with
  AVX-512 but no bf16: 1536 x 576 in 0.21 ms instead of 0.87 ms);
- `x @ W` with `W` stored `[in, out]` is also the faster operand order for oneDNN's float32 GEMM at 16-32 tokens
  on that CPU (0.13 ms against 0.84 ms for `F.linear` with `[out, in]`, 1536 x 576, 16 tokens).
Per-row quantization (one group per row) skips the multiply-add: the row scale and zero point apply to the output.

The extra layout costs one byte per weight (a float32 copy would cost four). `prepare.prepare_kernels` builds it
before choosing, and drops it again when no token count chose this path, so it only costs memory where it pays.
The weight is dequantized into the scratch buffer the other dequant paths share (`dequant.scratch`); layers larger
than that buffer (the output head) are not served.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import dequant, qmath

NAME = "dequant-t"
BUFFERS = ("kernel_codes_t", "kernel_t_scale", "kernel_t_shift")


def layout_bytes(layer) -> int:
    """Bytes the transposed layout of `layer` holds now (0 without one)."""
    tensors = [getattr(layer, name, None) for name in BUFFERS]
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def unsupported(layer) -> str | None:
    """Why `layer` cannot have the transposed layout (None when it can)."""
    if not hasattr(layer, "weight_zero"):
        return "not a QuantLinear"
    if layer.weight.device.type != "cpu":
        return f"device {layer.weight.device.type}"
    if layer.out_features * layer.in_features > dequant.SCRATCH_ELEMENTS:
        return "larger than the scratch buffer"
    return None


def prepare(layer) -> None:
    """Build the layout from the layer's codes: `[in, out]` uint8 codes, `[groups, out]` float32 scales and shifts
    (`-zero * scale`, so that `(q - z) s == q s + shift`)."""
    drop(layer)
    if unsupported(layer) is not None:
        return
    scale = layer.weight_scale.float()
    shift = -layer.weight_zero.float() * scale
    layer.register_buffer("kernel_codes_t", layer.codes().t().contiguous(), persistent=False)
    layer.register_buffer("kernel_t_scale", scale.t().contiguous(), persistent=False)
    layer.register_buffer("kernel_t_shift", shift.t().contiguous(), persistent=False)


def refresh(layer) -> None:
    """Rebuild the layout after the codes changed, if the layer keeps one."""
    if getattr(layer, "kernel_codes_t", None) is not None:
        prepare(layer)


def drop(layer) -> None:
    for name in BUFFERS:
        if name in layer._buffers:
            del layer._buffers[name]


class DequantTransposed:
    """float32 codes `[in, out]` in the scratch buffer, scaled per group, times float32 activations."""

    name = NAME
    tolerance = 1e-5  # float32 throughout: only the rounding order differs from the reference

    @staticmethod
    def unsupported(layer) -> str | None:
        if getattr(layer, "kernel_codes_t", None) is None:
            return unsupported(layer) or "no transposed layout prepared"
        return None

    @staticmethod
    def run(layer, x: torch.Tensor) -> torch.Tensor:
        bias = None if layer.bias is None else layer.bias.to(x.dtype)
        if torch.compiler.is_compiling():  # no in-place scratch in graphs
            return F.linear(x, layer.dequantize(x.dtype), bias)
        flat = x.reshape(-1, layer.in_features).float()
        weight = dequant.scratch(layer.in_features * layer.out_features, torch.float32)
        weight = weight.view(layer.in_features, layer.out_features)
        weight.copy_(layer.kernel_codes_t)
        scale, shift = layer.kernel_t_scale, layer.kernel_t_shift
        if scale.shape[0] == 1:  # one group per row: scale and zero point apply to the output
            y = torch.mm(flat, weight).mul_(scale[0]).addcmul_(flat.sum(-1, keepdim=True), shift[0])
        else:
            size = qmath.effective_group_size(layer.in_features, layer.group_size)
            full = layer.in_features // size
            body = weight[: full * size].view(full, size, layer.out_features)
            body.mul_(scale[:full, None]).add_(shift[:full, None])
            if full < scale.shape[0]:  # the short last group
                weight[full * size:].mul_(scale[full]).add_(shift[full])
            y = torch.mm(flat, weight)
        y = y.to(x.dtype)
        if bias is not None:
            y = y + bias
        return y.reshape(*x.shape[:-1], layer.out_features)
