"""`dequant-t`: a long-input path for CPUs without native bfloat16 (no AVX512-BF16, no AMX).

On such CPUs the bf16 paths run emulated, so long inputs compute in float32 and the cost beside the matmul is
dequantizing the weight on every call. Two things make that cheap here:

- the codes are kept once more, transposed to `[in, out]` (codes of up to 4 bits two to a byte: column `j` in the low
  nibble, column `j + out/2` in the high one, so both halves unpack with one contiguous operation each; 8-bit codes
  one to a byte): dequantizing is then contiguous uint8 -> float32 copies plus one multiply-add whose group scales
  broadcast along the contiguous `out` dimension, 2-4x faster than from the int4 kernel's interleaved 64-row blocks
  (measured on an Intel Xeon with AVX-512 but no bf16, 1536 x 576: 0.21 ms from bytes, 0.31 ms from nibbles,
  0.87 ms from the kernel's blocks);
- `x @ W` with `W` stored `[in, out]` is also the faster operand order for oneDNN's float32 GEMM at 16-32 tokens
  on that CPU (0.13 ms against 0.84 ms for `F.linear` with `[out, in]`, 1536 x 576, 16 tokens).
Per-row quantization (one group per row) skips the multiply-add: the row scale and zero point apply to the output.

The extra layout costs half a byte per weight up to 4 bits, one byte at 8 bits (a float32 copy would cost four).
`prepare.prepare_kernels` builds it before choosing, and drops it again when no token count chose this path, so it
only costs memory where it pays; `OPTIMUM_AGENTOS_TRANSPOSED=0` never builds it (the other paths serve).
The weight is dequantized into the scratch buffer the other dequant paths share (`dequant.scratch`); layers larger
than that buffer (the output head) are not served.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import dequant, qmath

NAME = "dequant-t"
ENV = "OPTIMUM_AGENTOS_TRANSPOSED"  # "0": never build the layout
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


def _nibbles(layer) -> bool:
    return layer.bits <= 4 and layer.out_features % 2 == 0


def prepare(layer) -> None:
    """Build the layout from the layer's codes: `[in, out]` codes (`[in, out/2]` nibble pairs up to 4 bits),
    `[groups, out]` float32 scales and shifts (`-zero * scale`, so that `(q - z) s == q s + shift`)."""
    drop(layer)
    if unsupported(layer) is not None:
        return
    scale = layer.weight_scale.float()
    shift = -layer.weight_zero.float() * scale
    codes = layer.codes().t()
    if _nibbles(layer):
        half = layer.out_features // 2
        codes = torch.bitwise_or(codes[:, :half], torch.bitwise_left_shift(codes[:, half:], 4))
    layer.register_buffer("kernel_codes_t", codes.contiguous(), persistent=False)
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


def _unpack(layer, weight: torch.Tensor) -> None:
    """The codes, as float32, into `weight` `[in, out]`."""
    codes = layer.kernel_codes_t
    if codes.shape[1] == layer.out_features:
        weight.copy_(codes)
        return
    half = layer.out_features // 2  # nibble pairs: through a uint8 scratch, one contiguous operation per half
    unpacked = dequant.scratch(layer.in_features * layer.out_features, torch.uint8)
    unpacked = unpacked.view(layer.in_features, layer.out_features)
    torch.bitwise_and(codes, 15, out=unpacked[:, :half])
    torch.bitwise_right_shift(codes, 4, out=unpacked[:, half:])
    weight.copy_(unpacked)


class DequantTransposed:
    """The codes `[in, out]` as float32 in the scratch buffer, scaled per group, times float32 activations."""

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
        _unpack(layer, weight)
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
