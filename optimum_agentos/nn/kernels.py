"""Packed CPU kernels for `QuantLinear` and `QuantHead`: repacked once after loading; which calls each one serves is
measured on the machine (`dispatch`, `prepare.prepare_kernels`), against the dequant paths (`dequant`).

- int8, one scale per row: `Int8PackKernel` (`_weight_int8pack_mm`, bf16 activations); with
  `activations="int8-dynamic"` (W8A8) `dynamic_int8.Int8DynamicKernel`, int8 x int8 with the activations quantized
  per call and per token (fbgemm up to 31 tokens, oneDNN from 32) for every inference call, since it rounds the
  activations.
- int4 whose group size and `in_features` share a factor 32/64/128/256: `_weight_int4pack_mm_for_cpu` with bf16
  activations.
- the int8 output head (`embedding.QuantHead`): `Int8RowsKernel`, `_weight_int8pack_mm` on its symmetric rows.
- `native.NativeInt8Rows` / `native.NativeInt4Blocks`: float32 activations times the codes in the int8 and int4
  kernels' layouts (compiled once per machine), for calls of up to `native.MAX_TOKENS` tokens.
- `native.NativeInt8Activations` / `native.NativeInt4Activations`: long inputs as one int8 x int8 matmul, the
  activations rounded to about 16 bits per token (int8 codes and their residual), int4 weights put on an int8 grid
  per call.
- training and `policy="reference"`: the reference path (dequantize, then `F.linear` in the activation dtype),
  which is always exact.

The kernel layouts live in non-persistent buffers or attributes: the checkpoint format and `state_dict` do not
change. Tolerance of the bf16 paths against the reference: bfloat16 rounding of the activations and of the int4
scales, about 1% of the output's magnitude (tests/quantization/test_kernels.py); of the int8 path: half an
activation rounding step per input, see `dynamic_int8`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import native, qmath
from .dynamic_int8 import Int8DynamicKernel, per_row_int8_unsupported
from .memory import keep_only_kernel_copy

KERNELS_ENV = "OPTIMUM_AGENTOS_KERNELS"  # "auto" (default), "reference" (always dequantize) or a path name
# torch's CPU `_weight_int8pack_mm` reads its operands with aligned vector loads: an int8 weight or a bf16
# activation starting 8 bytes off a 16-byte boundary crashes the process (SIGSEGV; measured with torch 2.13 on
# AVX-512, at offsets 1, 8 and 24; 0, 16, 32 and 64 ran). Tensors views of a mapped safetensors file or slices of
# a larger activation can start anywhere, so operands are given 64-byte-aligned memory (torch's allocator
# alignment) before they reach a packed kernel.
ALIGNMENT = 64
# and it computes wrong numbers (or crashes) when the input width is not a multiple of 16 (measured: 16, 32, 48,
# 64, 96 exact; 8, 20, 24, 40 wrong or SIGSEGV): such layers take another path
INT8PACK_WIDTH = 16


def int8pack_unsupported(module) -> str | None:
    """Why `_weight_int8pack_mm` cannot serve `module` on this torch build (None when it can)."""
    if not hasattr(torch.ops.aten, "_weight_int8pack_mm"):
        return "this torch build has no _weight_int8pack_mm"
    if module.in_features % INT8PACK_WIDTH:
        return f"in_features {module.in_features} is not a multiple of {INT8PACK_WIDTH}"
    return None


def aligned(t: torch.Tensor) -> torch.Tensor:
    """`t`, or a copy of it in fresh (aligned) memory when its data does not start on an `ALIGNMENT` boundary."""
    return t if t.data_ptr() % ALIGNMENT == 0 else t.clone()


def bf16_input(x: torch.Tensor, in_features: int) -> torch.Tensor:
    """`x` as contiguous bf16 rows `[tokens, in_features]`. q/k/v (and gate/up) read the same activation tensor in
    turn, so its conversion is kept for the next call while the tensor is unchanged (same object, same version)."""
    global _last_bf16_input
    if torch.compiler.is_compiling():  # compiled graphs fuse the conversion and allocate their own buffers
        return x.reshape(-1, in_features).to(torch.bfloat16).contiguous()
    if x.is_inference():  # inference tensors have no version to check
        return aligned(x.reshape(-1, in_features).to(torch.bfloat16).contiguous())
    source, version, flat = _last_bf16_input  # one tuple, read once
    if source is x and version == x._version:
        return flat
    flat = aligned(x.reshape(-1, in_features).to(torch.bfloat16).contiguous())
    _last_bf16_input = (x, x._version, flat)
    return flat


_last_bf16_input: tuple = (None, -1, None)


def _grad_needed(x: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and x.requires_grad


INT4_KERNEL_GROUPS = (256, 128, 64, 32)  # group sizes `_weight_int4pack_mm_for_cpu` accepts, largest first


def int4_kernel_group(in_features: int, group_size: int) -> int | None:
    """The largest kernel group size that divides both the stored group size and `in_features`, or None.

    Every stored group, the short last one included, is then a whole number of kernel groups, so repeating each
    stored scale and zero over its kernel groups is exact: 576 inputs with group 128 (4 x 128 + 64) run as 9 kernel
    groups of 64.
    """
    group = qmath.effective_group_size(in_features, group_size)
    return next((g for g in INT4_KERNEL_GROUPS if group % g == 0 and in_features % g == 0), None)


def unpack_int4pack(packed: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor | None:
    """Codes `[out, in]` (uint8) from `_convert_weight_to_int4pack_for_cpu`'s layout, or None for shapes whose
    layout this does not know. With 64 | out_features the layout (torch 2.13, AVX-512) is blocks of 64 rows: for
    each input k, 32 bytes whose low nibbles are rows 0-31 of the block and high nibbles rows 32-63. `prepare`
    checks the round trip before it relies on it, so another layout only costs the memory of a second copy."""
    if out_features % 64 or packed.numel() * 2 != out_features * in_features:
        return None
    blocks = packed.view(out_features // 64, in_features, 32)
    return torch.cat([blocks & 15, blocks >> 4], dim=2).transpose(1, 2).reshape(out_features, in_features)


class Int4PackKernel:
    """int4 whose group size and `in_features` share a factor 32/64/128/256: `torch._weight_int4pack_mm_for_cpu`."""

    name = "int4pack-bf16"

    @staticmethod
    def unsupported(layer) -> str | None:
        if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
            return "this torch build has no _weight_int4pack_mm_for_cpu"
        if layer.bits != 4:
            return f"{layer.bits}-bit"
        if int4_kernel_group(layer.in_features, layer.group_size) is None:
            return (f"group size {layer.group_size} with in_features {layer.in_features} (needs a group of "
                    "32/64/128/256 dividing both)")
        if layer.out_features % 16:
            return f"out_features {layer.out_features} (needs a multiple of 16)"
        if layer.weight.device.type != "cpu":
            return f"device {layer.weight.device.type}"
        return None

    @staticmethod
    def prepare(layer) -> None:
        group = int4_kernel_group(layer.in_features, layer.group_size)
        stored = qmath.effective_group_size(layer.in_features, layer.group_size)
        # per kernel group: the stored group it lies in
        owner = torch.arange(0, layer.in_features, group) // stored
        codes = layer.codes()
        packed = torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
        layer.register_buffer("kernel_weight", packed, persistent=False)
        scale = layer.weight_scale.float()[:, owner]
        zero = (8 - layer.weight_zero.float()[:, owner]) * scale  # (q - z) s  ==  (q - 8) s + (8 - z) s
        pairs = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
        layer.register_buffer("kernel_scales", pairs, persistent=False)
        layer.kernel_group = group
        unpacked = unpack_int4pack(packed, layer.out_features, layer.in_features)
        layer.int4_layout_known = unpacked is not None and torch.equal(unpacked, codes)
        if layer.int4_layout_known:  # the kernel's copy is exact: keep only it
            keep_only_kernel_copy(layer)
            if native.unavailable() is None:  # float32 scales and shifts per stored group for `native-int4`
                stored_scale = layer.weight_scale.float()
                layer.register_buffer("kernel_group_scales", stored_scale.t().contiguous(), persistent=False)
                shift = (stored_scale * layer.weight_zero.float()).t().contiguous()
                layer.register_buffer("kernel_group_shifts", shift, persistent=False)
                layer.kernel_stored_group = stored
                # `native-int4-act`: one int8 grid per row over its largest |w| = max(|0 s - h|, |15 s - h|)
                largest = torch.maximum(shift.abs(), (15 * stored_scale.t() - shift).abs()).amax(dim=0)
                layer.register_buffer("kernel_int8_scale", largest / 127, persistent=False)

    @staticmethod
    def codes(layer) -> torch.Tensor:
        """The layer's codes `[out, in]`, read back from the kernel's packed layout."""
        return unpack_int4pack(layer.kernel_weight, layer.out_features, layer.in_features)

    @staticmethod
    def run(layer, x: torch.Tensor) -> torch.Tensor:
        flat = bf16_input(x, layer.in_features)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, layer.kernel_weight, layer.kernel_group,
                                                        layer.kernel_scales).to(x.dtype)
        if layer.bias is not None:
            y = y + layer.bias.to(x.dtype)
        return y.reshape(*x.shape[:-1], layer.out_features)


class Int8PackKernel:
    """int8 with one scale per output row (group size -1, or the whole row): `torch._weight_int8pack_mm`.

    The kernel has no zero point, so codes are shifted to int8 (`q - 128`) and the zero point's share is added back
    as `-(z - 128) s * sum(x)`, exact in real arithmetic."""

    name = "int8pack-bf16"

    @staticmethod
    def unsupported(layer) -> str | None:
        return int8pack_unsupported(layer) or per_row_int8_unsupported(layer)

    @staticmethod
    def prepare(layer) -> None:
        codes = (layer.codes().to(torch.int16) - 128).to(torch.int8).contiguous()
        layer.register_buffer("kernel_weight", codes, persistent=False)
        scale = layer.weight_scale.float()[:, 0]
        layer.register_buffer("kernel_scales", scale.to(torch.bfloat16), persistent=False)
        layer.register_buffer("kernel_row_scales", scale.contiguous(), persistent=False)  # float32, for `native-int8`
        zero_term = (layer.weight_zero.float()[:, 0] - 128) * scale
        # symmetric codes (every zero point 128) have no zero-point share: two ops fewer per call
        layer.register_buffer("kernel_zero_term", zero_term if zero_term.any() else None, persistent=False)
        keep_only_kernel_copy(layer)

    @staticmethod
    def codes(layer) -> torch.Tensor:
        """The layer's codes `[out, in]`: the kernel's `q - 128` shifted back."""
        return (layer.kernel_weight.to(torch.int16) + 128).to(torch.uint8)

    @staticmethod
    def run(layer, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int8pack_mm(bf16_input(x, layer.in_features), layer.kernel_weight,
                                               layer.kernel_scales).to(x.dtype)
        if layer.kernel_zero_term is not None:
            flat = x.reshape(-1, layer.in_features)
            y = y.addcmul_(flat.sum(-1, keepdim=True), layer.kernel_zero_term.to(x.dtype), value=-1)
        if layer.bias is not None:
            y = y + layer.bias.to(x.dtype)
        return y.reshape(*x.shape[:-1], layer.out_features)


class Int8RowsKernel:
    """Symmetric int8 rows with float32 row scales (`embedding.QuantHead`): `torch._weight_int8pack_mm` on the rows
    as they are (shared with the tied embedding), with unit scales; the float32 scales are applied to its output."""

    name = "int8rows-bf16"

    @staticmethod
    def unsupported(head) -> str | None:
        if reason := int8pack_unsupported(head):
            return reason
        if head.weight.device.type != "cpu":
            return f"device {head.weight.device.type}"
        return None

    @staticmethod
    def prepare(head) -> None:
        # the kernel reads the rows as they are (at load, a view of the checkpoint file at any offset); `.data`: a
        # tied embedding holding the same tensor follows
        head.weight.data = aligned(head.weight.data)
        ones = torch.ones(head.out_features, dtype=torch.bfloat16, device=head.weight.device)
        head.register_buffer("kernel_unit_scales", ones, persistent=False)  # a buffer: inductor lowers it

    @staticmethod
    def run(head, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int8pack_mm(bf16_input(x, head.in_features), head.weight, head.kernel_unit_scales)
        y = y.to(x.dtype) * head.weight_scale.view(-1).to(x.dtype)
        return y.reshape(*x.shape[:-1], head.out_features)


KERNELS = (Int4PackKernel, Int8DynamicKernel, Int8PackKernel)  # for `QuantLinear`; first fit wins
HEAD_KERNELS = (Int8RowsKernel,)  # for `embedding.QuantHead`


def choose_kernel(layer, activations: str | None = None, candidates=KERNELS):
    """The first of `candidates` that fits the layer, and why the others do not. Kernels that quantize activations
    are only chosen when the checkpoint asks for it (`activations="int8-dynamic"`)."""
    reasons = []
    for kernel in candidates:
        dynamic = getattr(kernel, "quantizes_activations", False)
        reason = "weight-only checkpoint (activations=None)" if dynamic and activations != "int8-dynamic" else None
        reason = reason or kernel.unsupported(layer)
        if reason is None:
            return kernel, None
        reasons.append(f"{kernel.name}: {reason}")
    return None, "; ".join(reasons)


def forward(layer, x: torch.Tensor) -> torch.Tensor:
    """`QuantLinear.forward` (and `QuantHead`'s): with autograd off (`torch.no_grad`, `inference_mode`, `generate`),
    the path `prepare_kernels` measured fastest for this many tokens (`layer.routes`); with autograd on (training,
    LoRA, gradient checkpointing's recomputation), the exact reference path, which autograd differentiates."""
    routes = layer.routes
    if routes is not None and x.numel() and not torch.is_grad_enabled():
        tokens = x.numel() // layer.in_features
        fused = layer.fused  # q/k/v or gate/up in one call (`fusion`)
        if fused is not None and tokens <= fused.max_tokens:
            if not torch.compiler.is_compiling():
                y = fused.output(layer, x)
                if y is not None:
                    return y
            elif fused.in_graphs:  # `compile_for_generation`: the members' identical calls become one
                return fused.traced_output(layer, x)
        for limit, run in routes:
            if tokens <= limit:
                return run(layer, x)
    bias = None if layer.bias is None else layer.bias.to(x.dtype)
    return F.linear(x, layer.dequantize(x.dtype), bias)
