"""GGUF tensor blocks built from our integer codes, with no re-quantization.

GGUF quantizes rows in blocks of 32 weights. The three block types used here hold our codes exactly:
- `Q8_0`: fp16 `d`, 32 int8 `q`; `w = d q`: symmetric int8 (code - 128), and the int8 embeddings;
- `Q4_0`: fp16 `d`, 16 bytes; `w = d (q - 8)`: symmetric int2/3/4 (code shifted so the zero point lands on 8);
- `Q4_1`: fp16 `d`, fp16 `m`, 16 bytes; `w = d q + m`: asymmetric int2/3/4 (`d = s`, `m = -s z` rounded to fp16).
In the 4-bit blocks byte `j` holds element `j` in its low nibble and element `j + 16` in its high one. A block must
lie inside one of our groups, so the group size must be a multiple of 32 (or one group per row) and `in_features`
a multiple of 32. What does not fit is re-encoded from the float weight by `gguf.quants` only with `requantize`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGMLQuantizationType as QType
from gguf import quants

from .layers import ExportError, Weight

BLOCK = 32
FLOAT_TYPES = {torch.float32: QType.F32, torch.float16: QType.F16, torch.bfloat16: QType.BF16}


@dataclass
class Encoded:
    """A tensor ready for `GGUFWriter.add_tensor`: numpy data, its GGML type, and the largest absolute difference
    between the weight GGUF will compute with and ours (0 for floats, fp16 rounding for exact blocks)."""

    data: np.ndarray
    qtype: QType
    max_abs_error: float = 0.0
    requantized: bool = False


def exact_type(weight: Weight) -> QType | str:
    """The GGUF type holding `weight`'s codes exactly, or a string saying why none does."""
    cols = weight.shape[1]
    gs = cols if weight.group_size == -1 else weight.group_size
    if cols % BLOCK:
        return (f"{cols} inputs is not a multiple of 32, the size of every GGUF quantized block: keep this layer in "
                "float (ignore it when quantizing) or prune to widths that are multiples of 32")
    if gs % BLOCK:
        return (f"GGUF blocks hold 32 weights; group_size={weight.group_size} over {cols} inputs does not split into "
                f"them: quantize with group_size=32, 64 or 128 (a multiple of 32)")
    if weight.scales.dtype != torch.float16 and not _fits_fp16(weight.scales):
        return (f"GGUF stores scales in float16; these {str(weight.scales.dtype).replace('torch.', '')} scales do "
                "not round-trip through it: quantize with scale_dtype='float16'")
    if weight.bits == 8:
        if not weight.sym:
            return ("asymmetric int8 has no GGUF type: quantize with sym=True (Q8_0), or with bits=4 (Q4_1)")
        return QType.Q8_0
    return QType.Q4_0 if weight.sym else QType.Q4_1


def _fits_fp16(scales: torch.Tensor) -> bool:
    return bool((scales.to(torch.float16).to(scales.dtype) == scales).all())


def _block_params(values: torch.Tensor, cols: int, group_size: int) -> torch.Tensor:
    """Per-group values `[rows, groups]` -> per-block `[rows, cols // 32]`."""
    gs = cols if group_size == -1 else group_size
    return values[:, torch.arange(0, cols, BLOCK) // gs]


def _fp16_bytes(values: torch.Tensor) -> np.ndarray:
    return values.to(torch.float16).numpy().view(np.uint8).reshape(*values.shape, 2)


def _nibbles(codes: torch.Tensor) -> np.ndarray:
    """Codes `[rows, blocks, 32]` (0..15) -> bytes `[rows, blocks, 16]` in GGUF's nibble order."""
    c = codes.to(torch.uint8)
    return (c[..., :16] | (c[..., 16:] << 4)).numpy()


def encode_codes(weight: Weight, qtype: QType) -> Encoded:
    """Blocks of `qtype` holding `weight`'s codes (`qtype` from `exact_type`)."""
    rows, cols = weight.shape
    nblocks = cols // BLOCK
    scale = _block_params(weight.scales.float(), cols, weight.group_size)
    zero = _block_params(weight.zeros.float(), cols, weight.group_size)
    codes = weight.codes.view(rows, nblocks, BLOCK).to(torch.int16)
    d = _fp16_bytes(scale)
    if qtype == QType.Q8_0:
        q = (codes - zero.to(torch.int16).unsqueeze(-1)).to(torch.int8).numpy().view(np.uint8)
        parts = [d, q]
    elif qtype == QType.Q4_0:  # symmetric: shift so the zero point is 8
        parts = [d, _nibbles(codes + (8 - zero.to(torch.int16)).unsqueeze(-1))]
    else:
        parts = [d, _fp16_bytes(-scale * zero), _nibbles(codes)]
    data = np.concatenate(parts, axis=-1).reshape(rows, -1)
    return Encoded(data, qtype, _max_abs_error(data, qtype, weight))


def _max_abs_error(data: np.ndarray, qtype: QType, weight: Weight) -> float:
    theirs = torch.from_numpy(quants.dequantize(data, qtype).astype(np.float32))
    return float((theirs - weight.dequantize()).abs().max())


def requantize_type(weight: Weight) -> QType:
    """The GGUF type a weight is re-encoded to when it has no exact one: Q8_0 for 8 bits, else Q4_1 / Q4_0."""
    if weight.bits == 8:
        return QType.Q8_0
    return QType.Q4_0 if weight.sym else QType.Q4_1


def encode_weight(weight: Weight, requantize: bool, name: str) -> Encoded:
    """A quantized weight's exact blocks; re-encoded from its float values with `requantize`, else `ExportError`."""
    qtype = exact_type(weight)
    if isinstance(qtype, QType):
        return encode_codes(weight, qtype)
    if not requantize:
        raise ExportError(f"{name}: {qtype}; or pass requantize=True (CLI: --requantize) to re-encode it and report "
                          "the added error.")
    if weight.shape[1] % BLOCK:
        raise ExportError(f"{name}: {weight.shape[1]} inputs is not a multiple of 32, which every GGUF block type "
                          "needs; this layer cannot be written to GGUF.")
    target = requantize_type(weight)
    dense = weight.dequantize()
    data = quants.quantize(dense.numpy(), target)
    return Encoded(data, target, _max_abs_error(data, target, weight), requantized=True)


def encode_float(tensor: torch.Tensor, force_f32: bool = False) -> Encoded:
    """A float tensor in its own dtype (F32, F16 or BF16); norms and biases always F32, as llama.cpp expects."""
    tensor = tensor.detach()
    if force_f32 or tensor.dtype not in FLOAT_TYPES:
        tensor = tensor.float()
    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: the raw bits, with the type named
        return Encoded(tensor.view(torch.int16).numpy().view(np.uint16).copy(), QType.BF16)
    return Encoded(tensor.numpy().copy(), FLOAT_TYPES[tensor.dtype])


def permute_rows(tensor: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's q/k row order for a Llama weight, scale, zero or bias (rows are `[heads, 2, half]` in HF, the
    halves interleaved in GGUF). Only rows move, so codes and their group parameters permute alike."""
    rows = tensor.shape[0]
    return (tensor.reshape(n_head, 2, rows // n_head // 2, *tensor.shape[1:]).swapaxes(1, 2)
            .reshape(tensor.shape))


def permute_weight(weight: Weight, n_head: int) -> Weight:
    if weight.codes is None:
        return Weight(weight.shape, dense=permute_rows(weight.dense, n_head), sparse=weight.sparse)
    return Weight(weight.shape, codes=permute_rows(weight.codes, n_head), scales=permute_rows(weight.scales, n_head),
                  zeros=permute_rows(weight.zeros, n_head), bits=weight.bits, group_size=weight.group_size,
                  sym=weight.sym, sparse=weight.sparse)
