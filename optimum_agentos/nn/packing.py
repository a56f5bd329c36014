"""Bit packing of integer codes into bytes, row by row, for 2, 3, 4 and 8 bits.

Each row of `in_features` codes is padded to a multiple of 8 codes; every run of 8 codes (8 * bits bits) is stored
as `bits` little-endian bytes. int4 is then two codes per byte, int2 four per byte, and int3 eight codes per three
bytes. The packed tensor is stored flat (1-D) so that a checkpoint loaded *without* optimum-agentos hits a shape
mismatch instead of silently filling a Linear weight with packed bytes.
"""

from __future__ import annotations

import torch


def packed_row_bytes(in_features: int, bits: int) -> int:
    """Bytes one packed row of `in_features` codes takes."""
    if bits == 8:
        return in_features
    return -(-in_features // 8) * bits


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes `[out, in]` with values in `[0, 2**bits)` into a flat uint8 tensor."""
    if codes.dim() != 2:
        raise ValueError(f"pack expects a 2-D tensor of codes, got shape {tuple(codes.shape)}")
    if bits == 8:
        return codes.to(torch.uint8).reshape(-1).contiguous()
    rows, cols = codes.shape
    padded = -(-cols // 8) * 8
    codes = codes.to(torch.int64)
    if padded != cols:
        codes = torch.nn.functional.pad(codes, (0, padded - cols))
    shifts = torch.arange(8, dtype=torch.int64, device=codes.device) * bits
    words = (codes.view(rows, padded // 8, 8) << shifts).sum(dim=-1)  # at most 32 bits used
    byte_shifts = torch.arange(bits, dtype=torch.int64, device=codes.device) * 8
    packed = (words.unsqueeze(-1) >> byte_shifts) & 0xFF
    return packed.to(torch.uint8).reshape(-1).contiguous()


def unpack(packed: torch.Tensor, bits: int, out_features: int, in_features: int) -> torch.Tensor:
    """Inverse of `pack`: a flat uint8 tensor back to uint8 codes `[out_features, in_features]`."""
    expected = out_features * packed_row_bytes(in_features, bits)
    if packed.numel() != expected:
        raise ValueError(
            f"packed weight holds {packed.numel()} bytes but a {out_features}x{in_features} int{bits} layer needs "
            f"{expected}: the checkpoint does not match its quantization_config."
        )
    if bits == 8:
        return packed.view(out_features, in_features)
    if bits in (2, 4):  # whole codes per byte: shift and mask in uint8, no 64-bit words
        rows = packed.view(out_features, -1)
        mask = (1 << bits) - 1
        parts = [(rows >> (bits * k)) & mask for k in range(8 // bits)]
        return torch.stack(parts, dim=-1).view(out_features, -1)[:, :in_features]
    groups = -(-in_features // 8)
    data = packed.view(out_features, groups, bits).to(torch.int64)
    byte_shifts = torch.arange(bits, dtype=torch.int64, device=packed.device) * 8
    words = (data << byte_shifts).sum(dim=-1, keepdim=True)
    shifts = torch.arange(8, dtype=torch.int64, device=packed.device) * bits
    codes = (words >> shifts) & ((1 << bits) - 1)
    return codes.view(out_features, groups * 8)[:, :in_features].to(torch.uint8)
