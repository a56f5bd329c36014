"""Our integer codes in the layout of ONNX Runtime's `MatMulNBits` contrib op (`com.microsoft`), without rounding.

`MatMulNBits` computes `Y = A @ dequant(B)^T` with `dequant(B)[n, k] = (code - zero) * scale` per block of
`block_size` consecutive input columns (`block_size` a power of two >= 16). Its tensors:
- `B`: uint8 `[N, blocks, block_size * bits / 8]`, codes packed low nibble first along K (4 bits) or one per byte (8
  bits); the last block of a row is padded when `block_size` does not divide K;
- `scales`: `[N * blocks]` in the activations' dtype (float32 here);
- `zero_points` (optional, default `2**(bits-1)`): uint8, for 4 bits two per byte (low nibble first) with each
  row padded to whole bytes, `[N * ceil(blocks / 2)]`; for 8 bits `[N * blocks]`.

Our groups map onto it exactly when a power-of-two block >= 16 tiles a group (the group's scale and zero are then
repeated over its blocks) or one block spans the whole row: a ragged last group becomes the op's padded last block.
int2/int3 codes fit 4-bit storage as they are. int8 rows of the quantized output head (`QuantHead`, signed codes and
one scale per row) become unsigned codes `q + 128` with the default zero point 128.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..nn import QuantHead, QuantLinear, SparseLinear, packing, qmath

MIN_BLOCK = 16
MAX_BLOCK = 256  # the largest block ONNX Runtime's CPU kernels (MLAS) run without a dequantize fallback


class NotExportableError(ValueError):
    """A layer whose codes `MatMulNBits` cannot hold exactly (and `requantize` was not asked for)."""


@dataclass
class LayerCodes:
    """A quantized layer's weight as integer codes `[out, in]` with per-group `scales`/`zeros` `[out, groups]`."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int
    group_size: int  # -1: one group per row

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def dequantize(self) -> torch.Tensor:
        return qmath.dequantize_codes(self.codes, self.scales, self.zeros, self.group_size, torch.float32)

    def symmetric(self) -> bool:
        """Every zero point sits at the middle of the range (how `sym=True` stores them)."""
        return bool((self.zeros == (1 << (self.bits - 1))).all())


def layer_codes(module) -> LayerCodes | None:
    """The codes of a quantized layer (`QuantLinear`, quantized `SparseLinear`, `QuantHead`); None for float ones."""
    if isinstance(module, QuantLinear):
        return LayerCodes(module.codes(), module.weight_scale.detach(), module.weight_zero.detach(), module.bits,
                          module.group_size)
    if isinstance(module, SparseLinear) and module.bits is not None:
        # pruned positions hold their group's zero point: they decode to exactly 0.0
        codes = qmath.expand_groups(module.weight_zero, module.in_features, module.group_size).clone()
        codes.masked_scatter_(module.kept(), packing.unpack(module.weight, module.bits, 1, module.nnz)[0])
        return LayerCodes(codes, module.weight_scale.detach(), module.weight_zero.detach(), module.bits,
                          module.group_size)
    if isinstance(module, QuantHead):
        codes = (module.weight.detach().to(torch.int16) + 128).to(torch.uint8)
        zeros = torch.full((module.out_features, 1), 128, dtype=torch.uint8)
        return LayerCodes(codes, module.weight_scale.detach().float(), zeros, 8, -1)
    return None


def storage_bits(bits: int) -> int:
    """`MatMulNBits` bits holding our codes exactly: int2/int3/int4 as 4, int8 as 8."""
    return 4 if bits <= 4 else 8


def exact_block(in_features: int, group_size: int) -> int | None:
    """The `MatMulNBits` block size that holds groups of `group_size` exactly, or None when there is none.

    The largest power of two (<= `MAX_BLOCK`, >= 16) dividing the group; for one group per row whose width has no
    such divisor, a single padded block over the whole row."""
    group = qmath.effective_group_size(in_features, group_size)
    block = group & -group  # largest power of two dividing the group
    block = min(block, MAX_BLOCK)
    if block >= MIN_BLOCK:
        return block
    if group >= in_features:  # one group per row: one block, padded past K
        return 1 << (in_features - 1).bit_length()
    return None


def requantize_block(in_features: int, group_size: int) -> int:
    """Block size for re-encoding a layer no block holds exactly: the power of two nearest below its group,
    within [16, 256]."""
    group = qmath.effective_group_size(in_features, group_size)
    return min(max(1 << (group.bit_length() - 1), MIN_BLOCK), MAX_BLOCK)


def requantize(layer: LayerCodes) -> tuple[LayerCodes, float]:
    """Round-to-nearest re-encoding of a layer's float weight at an exportable block size (same bits, same
    symmetry, float32 scales); returns it with the relative Frobenius error it adds to the weight."""
    weight = layer.dequantize()
    block = requantize_block(weight.shape[1], layer.group_size)
    bits = storage_bits(layer.bits)
    codes, scales, zeros = qmath.quantize_rtn(weight, bits, block, layer.symmetric(), torch.float32)
    new = LayerCodes(codes, scales, zeros, bits, block)
    error = float((new.dequantize() - weight).norm() / weight.norm().clamp_min(torch.finfo(torch.float32).tiny))
    return new, error


def not_exportable_message(name: str, layer: LayerCodes) -> str:
    return (
        f"{name}: groups of {qmath.effective_group_size(layer.shape[1], layer.group_size)} input columns have no "
        f"exact ONNX MatMulNBits form (blocks are powers of two >= {MIN_BLOCK} lying inside one group). Quantize "
        f"with group_size a power of two >= {MIN_BLOCK} (e.g. 32 or 128) or -1, or pass requantize=True "
        f"(--requantize) to re-encode this layer in blocks of {requantize_block(layer.shape[1], layer.group_size)} "
        "(the added error is reported)."
    )


def matmul_nbits(layer: LayerCodes, block: int) -> dict:
    """`MatMulNBits` tensors (numpy) and attributes for a layer whose groups `block` tiles (see `exact_block`)."""
    out_features, in_features = layer.shape
    bits = storage_bits(layer.bits)
    blocks = -(-in_features // block)
    group = qmath.effective_group_size(in_features, layer.group_size)
    per_block = torch.arange(blocks) * block // group  # the group each block lies in
    scales = layer.scales.float()[:, per_block].contiguous()
    zeros = layer.zeros[:, per_block].to(torch.uint8)
    # pad the last block with each row's zero point, so padding decodes to 0.0
    pad = blocks * block - in_features
    codes = torch.cat([layer.codes.to(torch.uint8), zeros[:, -1:].expand(-1, pad)], dim=1) if pad else layer.codes
    codes = codes.to(torch.uint8).view(out_features, blocks, block)
    attrs = {"K": in_features, "N": out_features, "bits": bits, "block_size": block}
    tensors = {"B": _pack_nibbles(codes) if bits == 4 else codes.contiguous(), "scales": scales.reshape(-1)}
    if not bool((zeros == (1 << (bits - 1))).all()):  # the op's default zero point is the middle of the range
        tensors["zero_points"] = (_pack_nibbles(zeros) if bits == 4 else zeros).reshape(-1)
    return {"attrs": attrs, "tensors": {k: v.contiguous().numpy() for k, v in tensors.items()}}


def _pack_nibbles(values: torch.Tensor) -> torch.Tensor:
    """uint8 values < 16, two per byte along the last axis (low nibble first), the last axis padded to even."""
    if values.shape[-1] % 2:
        values = torch.nn.functional.pad(values, (0, 1))
    return values[..., 0::2] | (values[..., 1::2] << 4)
