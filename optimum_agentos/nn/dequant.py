"""Long-input paths of `QuantLinear` and `QuantHead` without AMX: dequantize into a reused scratch buffer, then one
matmul.

- `dequant-bf16`: the weight dequantized to bfloat16 times bfloat16 activations (oneDNN's bf16 GEMM, on
  AVX512-BF16 or AMX where the CPU has them; benchmarks/kernel_layers.py times it per layer). Tolerance:
  bfloat16 rounding of activations and weights, about 1% of the output's magnitude, as the packed kernels.
- `dequant-exact`: the weight dequantized in the activations' dtype; the same numbers as the reference path
  (`F.linear(x, layer.dequantize(x.dtype))`), without its temporaries.

The codes are read from the layout the layer's packed kernel keeps (no second copy of them): the int4 kernel's
64-row blocks of nibble pairs, the int8 kernel's `q - 128` rows, `QuantHead`'s symmetric rows. Layers without such a
layout unpack `layer.codes()`. The scratch buffer is shared by every layer of the thread (layers run one after
another) and holds at most `SCRATCH_ELEMENTS` weights: larger layers (the output head) run in blocks of rows, so the
memory cost is bounded whatever the model's size, and there is never a float copy of the model.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

from . import native, qmath

# weights per scratch chunk: 4 Mi elements (8 MiB in bf16, 16 MiB in float32); SmolLM2's largest linear layer
# (576 x 1536) fits whole, its output head (49152 x 576) runs in 8 blocks of rows
SCRATCH_ELEMENTS = 4 << 20
_local = threading.local()


def scratch(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A flat buffer of `numel` elements reused across calls of this thread (grown, never shrunk).

    Always a normal tensor, even when first needed inside `torch.inference_mode` (perplexity runs there): an
    inference tensor could not be written to by a later call outside it (`torch.no_grad`, lm-eval, training)."""
    buffers = _local.__dict__.setdefault("buffers", {})
    buffer = buffers.get(dtype)
    if buffer is None or buffer.numel() < numel:
        with torch.inference_mode(False):
            buffer = buffers[dtype] = torch.empty(numel, dtype=dtype)
    return buffer[:numel]


def scratch_bytes() -> int:
    """Bytes the scratch buffers of this thread hold now."""
    return sum(b.numel() * b.element_size() for b in _local.__dict__.get("buffers", {}).values())


def _int4_layout(layer) -> bool:
    return getattr(layer.kernel, "name", None) == "int4pack-bf16" and getattr(layer, "int4_layout_known", False)


def _rows_per_chunk(layer) -> int:
    rows = max(64, SCRATCH_ELEMENTS // layer.in_features // 64 * 64)
    return layer.out_features if rows >= layer.out_features else rows


def scratch_elements(layer) -> int:
    """Weights the scratch buffer holds for `layer` (one chunk of rows)."""
    return min(layer.out_features, _rows_per_chunk(layer)) * layer.in_features


def _fill(layer, start: int, stop: int, out: torch.Tensor) -> None:
    """Dequantize rows `start:stop` of the layer's weight into `out` `[stop - start, in]`: computed in float32 (as
    `qmath.dequantize_codes` does) and rounded once to `out`'s dtype. Other dtypes go through a float32 staging
    buffer: bf16 element-wise arithmetic is slower than float32 plus one conversion."""
    if out.dtype != torch.float32:
        staging = (torch.empty(out.shape) if torch.compiler.is_compiling()
                   else scratch(out.numel(), torch.float32).view(out.shape))
        _fill(layer, start, stop, staging)
        out.copy_(staging)
        return
    rows = out.shape[0]
    if hasattr(layer, "weight_zero"):  # QuantLinear
        kernel_name = getattr(layer.kernel, "name", None)
        if _int4_layout(layer):  # 64-row blocks; for input k, 32 bytes: low nibbles rows 0-31, high rows 32-63
            blocks = layer.kernel_weight.view(layer.out_features // 64, layer.in_features, 32)[start // 64:stop // 64]
            if _native_fill(out):
                size = qmath.effective_group_size(layer.in_features, layer.group_size)
                native.OPS.int4_blocks_dequantize(blocks, layer.weight_zero[start:stop].float(),
                                                  layer.weight_scale[start:stop].float(), size, out)
                return
            view = out.view(rows // 64, 64, layer.in_features)
            view[:, :32].copy_(torch.bitwise_and(blocks, 15).transpose(1, 2))
            view[:, 32:].copy_(torch.bitwise_right_shift(blocks, 4).transpose(1, 2))
            zero = layer.weight_zero[start:stop]
        elif kernel_name == "int8pack-bf16":  # codes q - 128 in int8
            zero = layer.weight_zero[start:stop].float() - 128
            if _native_fill(out):
                size = qmath.effective_group_size(layer.in_features, layer.group_size)
                native.OPS.int8_rows_dequantize(layer.kernel_weight[start:stop], zero,
                                                layer.weight_scale[start:stop].float(), size, out)
                return
            out.copy_(layer.kernel_weight[start:stop])
        else:
            out.copy_(layer.codes()[start:stop])
            zero = layer.weight_zero[start:stop]
        _apply_groups(out, zero, layer.weight_scale[start:stop], layer.group_size)
    else:  # QuantHead: symmetric int8 rows, float32 row scales
        out.copy_(layer.weight[start:stop]).mul_(layer.weight_scale[start:stop])


def _native_fill(out: torch.Tensor) -> bool:
    """Whether the native library fills `out`: one pass over the codes instead of three (int8) or six (int4) tensor
    operations, the same numbers. Outside compiled graphs, where the library is built."""
    return out.is_contiguous() and not torch.compiler.is_compiling() and native.library()[0]


def _apply_groups(out: torch.Tensor, zero: torch.Tensor, scale: torch.Tensor, group_size: int) -> None:
    """`out = (out - zero) * scale` per group along the input dimension, the short last group included; mixed dtypes
    compute in float32, as `qmath.dequantize_codes` does."""
    rows, in_features = out.shape
    size = qmath.effective_group_size(in_features, group_size)
    full = in_features // size
    if full:
        body = out[:, :full * size].view(rows, full, size) if full * size < in_features else out.view(rows, full, size)
        body.sub_(zero[:, :full].unsqueeze(-1)).mul_(scale[:, :full].unsqueeze(-1))
    if full * size < in_features:
        out[:, full * size:].sub_(zero[:, full:]).mul_(scale[:, full:])


def weight(layer, dtype: torch.dtype) -> torch.Tensor:
    """The whole dequantized weight `[out, in]` in `dtype` (a new tensor: for tests and compiled graphs)."""
    out = torch.empty(layer.out_features, layer.in_features, dtype=dtype)
    for start in range(0, layer.out_features, _rows_per_chunk(layer)):
        stop = min(start + _rows_per_chunk(layer), layer.out_features)
        _fill(layer, start, stop, out[start:stop])
    return out


def _matmul(layer, flat: torch.Tensor, dtype: torch.dtype, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.linear(flat, W, bias)` with `W` dequantized in `dtype`, chunk by chunk through the scratch buffer."""
    if torch.compiler.is_compiling():  # no in-place scratch in graphs
        return F.linear(flat, weight(layer, dtype), bias)
    step = _rows_per_chunk(layer)
    if step == layer.out_features:
        buffer = scratch(layer.out_features * layer.in_features, dtype).view(layer.out_features, layer.in_features)
        _fill(layer, 0, layer.out_features, buffer)
        return F.linear(flat, buffer, bias)
    y = torch.empty(len(flat), layer.out_features, dtype=flat.dtype)
    buffer = scratch(step * layer.in_features, dtype)
    for start in range(0, layer.out_features, step):
        stop = min(start + step, layer.out_features)
        block = buffer[: (stop - start) * layer.in_features].view(stop - start, layer.in_features)
        _fill(layer, start, stop, block)
        y[:, start:stop] = F.linear(flat, block, None if bias is None else bias[start:stop])
    return y


def unsupported(layer) -> str | None:
    """Why the dequant paths cannot serve `layer` (None when they can)."""
    if layer.weight.device.type != "cpu":
        return f"device {layer.weight.device.type}"
    if _int4_layout(layer) and _rows_per_chunk(layer) % 64:
        return "int4 block layout with a chunk not a multiple of 64 rows"
    return None


class DequantBF16:
    """bf16 weight (dequantized into the scratch buffer) times bf16 activations."""

    name = "dequant-bf16"
    tolerance = 1e-2  # of the output's magnitude: bf16 rounding of activations and weights
    unsupported = staticmethod(unsupported)

    @staticmethod
    def run(layer, x: torch.Tensor) -> torch.Tensor:
        from .kernels import bf16_input

        y = _matmul(layer, bf16_input(x, layer.in_features), torch.bfloat16, None).to(x.dtype)
        if layer.bias is not None:  # added in the activations' dtype, not rounded to bf16
            y = y + layer.bias.to(x.dtype)
        return y.reshape(*x.shape[:-1], layer.out_features)


class DequantExact:
    """The weight dequantized in the activations' dtype (into the scratch buffer): the reference's numbers."""

    name = "dequant-exact"
    tolerance = 1e-5
    unsupported = staticmethod(unsupported)

    @staticmethod
    def run(layer, x: torch.Tensor) -> torch.Tensor:
        bias = None if layer.bias is None else layer.bias.to(x.dtype)
        y = _matmul(layer, x.reshape(-1, layer.in_features), x.dtype, bias)
        return y.reshape(*x.shape[:-1], layer.out_features)

