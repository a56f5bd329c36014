"""`SparseLinear`: a pruned linear layer stored as a bitmask of kept positions plus only the kept values.

On disk a 50%-sparse layer then takes half its values plus one bit per weight. The values are either floats or,
when the layer is also quantized, the packed integer codes of the kept weights with per-group scales and zero
points over the whole row (pruned positions decode to the zero point, hence exactly 0.0).
"""

from __future__ import annotations

import torch
from torch import nn

from . import packing, qmath


_BIT_WEIGHTS = 1 << torch.arange(8, dtype=torch.int64)
# byte value -> its 8 bits, least significant first: unpacking is one gather instead of eight mask ops
_BYTE_BITS = (torch.arange(256).unsqueeze(1).bitwise_and(_BIT_WEIGHTS) != 0)


class SparseCheckpointError(ValueError):
    """A sparse layer whose bitmask and stored values disagree (a corrupt or hand-edited checkpoint)."""


def pack_bitmask(kept: torch.Tensor) -> torch.Tensor:
    """Bool `[out, in]` (True = kept) -> flat uint8, 8 positions per byte, row-major, least significant bit first."""
    flat = kept.reshape(-1).to(torch.int64)
    flat = nn.functional.pad(flat, (0, -flat.numel() % 8))
    return (flat.view(-1, 8) * _BIT_WEIGHTS.to(flat.device)).sum(dim=1).to(torch.uint8)


def unpack_bitmask(packed: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """Inverse of `pack_bitmask`: bool `[out, in]`, True where a weight was kept."""
    bits = _BYTE_BITS.to(packed.device)[packed.long()]
    return bits.view(-1)[: out_features * in_features].view(out_features, in_features)


def bitmask_bytes(out_features: int, in_features: int) -> int:
    return -(-out_features * in_features // 8)


class SparseLinear(nn.Module):
    """Pruned replacement for `nn.Linear` (and GPT-2 `Conv1D`) that stores only the kept weights.

    Tensors (plain, saved as they are in safetensors):
    - `weight_mask`: uint8, flat bitmask of the `[out, in]` weight, bit set = kept;
    - `weight`: the kept values in row-major order: `[nnz]` floats, or with `bits` the packed codes of those values;
    - `weight_scale` / `weight_zero`: `[out, groups]` quantization parameters, only with `bits`;
    - `bias`: optional.

    Forward: after `prepare.prepare_kernels` (run at load) a float layer computes with a dense copy of its weight in
    the model's dtype (a non-persistent buffer: the checkpoint stays compressed), a quantized one through a
    `QuantLinear` of its dense codes (zero points where pruned) with that layer's measured paths. Before that, with
    `policy="reference"`, or for inputs in another dtype or device, the reference path: rebuild the dense weight
    from the bitmask, then `F.linear`.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        nnz: int,
        bias: bool = True,
        bits: int | None = None,
        group_size: int = 128,
        scale_dtype: torch.dtype = torch.float16,
        dtype: torch.dtype | None = None,
        device=None,
    ):
        super().__init__()
        if not 0 <= nnz <= in_features * out_features:
            raise ValueError(f"nnz={nnz} does not fit a {out_features}x{in_features} layer.")
        self.in_features, self.out_features, self.nnz = in_features, out_features, nnz
        self.bits, self.group_size = bits, group_size
        dtype = dtype or torch.float32
        self.weight_mask = nn.Parameter(
            torch.empty(bitmask_bytes(out_features, in_features), dtype=torch.uint8, device=device), requires_grad=False
        )
        if bits is None:
            self.weight = nn.Parameter(torch.empty(nnz, dtype=dtype, device=device), requires_grad=False)
        else:
            groups = qmath.num_groups(in_features, group_size)
            self.weight = nn.Parameter(
                torch.empty(packing.packed_row_bytes(nnz, bits), dtype=torch.uint8, device=device), requires_grad=False
            )
            self.weight_scale = nn.Parameter(
                torch.empty(out_features, groups, dtype=scale_dtype, device=device), requires_grad=False
            )
            self.weight_zero = nn.Parameter(
                torch.empty(out_features, groups, dtype=torch.uint8, device=device), requires_grad=False
            )
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device))
        else:
            self.register_parameter("bias", None)
        self.register_load_state_dict_post_hook(_recompute_after_loading)

    @classmethod
    def from_dense(cls, weight: torch.Tensor, kept: torch.Tensor, bias: torch.Tensor | None) -> "SparseLinear":
        """Float sparse layer from a dense `[out, in]` weight and its kept-position mask."""
        out_features, in_features = weight.shape
        kept = kept.to(weight.device)
        layer = cls(in_features, out_features, int(kept.sum()), bias is not None, dtype=weight.dtype, device=weight.device)
        layer.weight_mask.data = pack_bitmask(kept)
        layer.weight.data = weight.detach()[kept].contiguous()
        if bias is not None:
            layer.bias.data = bias.detach().clone()
        return layer

    @classmethod
    def from_codes(cls, codes, scales, zeros, kept, bias, bits: int, group_size: int) -> "SparseLinear":
        """Quantized sparse layer from dense codes `[out, in]` (pruned positions hold their group's zero point)."""
        out_features, in_features = codes.shape
        layer = cls(
            in_features, out_features, int(kept.sum()), bias is not None, bits, group_size, scales.dtype,
            None if bias is None else bias.dtype, codes.device,
        )
        layer.weight_mask.data = pack_bitmask(kept)
        layer.weight.data = packing.pack(codes[kept].view(1, -1), bits)
        layer.weight_scale.data = scales.contiguous()
        layer.weight_zero.data = zeros.to(torch.uint8).contiguous()
        if bias is not None:
            layer.bias.data = bias.detach().clone()
        return layer

    def kept(self) -> torch.Tensor:
        """Bool `[out, in]`: True where the weight was kept."""
        return unpack_bitmask(self.weight_mask, self.out_features, self.in_features)

    def check(self, name: str = "layer", n_m: tuple[int, int] | None = None) -> None:
        """Raise `SparseCheckpointError` when the bitmask does not match the stored values (or the N:M pattern)."""
        kept = self.kept()
        count = int(kept.sum())
        if count != self.nnz:
            raise SparseCheckpointError(
                f"{name}: the bitmask marks {count} kept weights but {self.nnz} values are stored; the checkpoint is "
                "corrupt. Re-download or re-save it."
            )
        if n_m is not None:
            n, m = n_m
            per_group = kept.view(self.out_features, -1, m).sum(dim=-1) if self.in_features % m == 0 else None
            if per_group is None or bool((per_group != n).any()):
                raise SparseCheckpointError(
                    f"{name}: the bitmask does not follow the recorded {n}:{m} pattern; the checkpoint is corrupt."
                )

    def dense_codes(self) -> torch.Tensor:
        """Quantized layers: the codes `[out, in]` of the dense weight, pruned positions at their group's zero point."""
        codes = qmath.expand_groups(self.weight_zero, self.in_features, self.group_size).clone()
        return codes.masked_scatter_(self.kept(), packing.unpack(self.weight, self.bits, 1, self.nnz)[0])

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense `[out, in]` weight, zeros where pruned."""
        if dtype is None:
            dtype = self.bias.dtype if self.bias is not None else (
                self.weight.dtype if self.bits is None else torch.float32
            )
        if self.bits is None:
            dense = torch.zeros(self.out_features, self.in_features, dtype=dtype, device=self.weight.device)
            return dense.masked_scatter_(self.kept(), self.weight.to(dtype))
        return qmath.dequantize_codes(self.dense_codes(), self.weight_scale, self.weight_zero, self.group_size, dtype)

    def materialize(self, dtype: torch.dtype) -> int:
        """Keep the dense weight in `dtype` for the forward (not saved); returns the bytes it takes."""
        self.register_buffer("dense_weight", self.dequantize(dtype), persistent=False)
        return self.dense_weight.numel() * self.dense_weight.element_size()

    def use_compute_layer(self, layer: nn.Module) -> None:
        """Compute through `layer` (a prepared `QuantLinear` of the dense codes, without bias; not a submodule, so
        it stays out of `state_dict` and module walks)."""
        self.__dict__["compute_layer"] = layer

    def release_dense(self) -> None:
        """Back to the reference path (drops the dense copy or compute layer)."""
        self._buffers.pop("dense_weight", None)
        self.__dict__.pop("compute_layer", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dense = self._buffers.get("dense_weight")
        if dense is not None and dense.dtype == x.dtype and dense.device == x.device:
            return nn.functional.linear(x, dense, self.bias)
        inner = self.__dict__.get("compute_layer")
        if inner is not None and x.device.type == "cpu":
            y = inner(x)
            return y if self.bias is None else y + self.bias.to(y.dtype)
        return nn.functional.linear(x, self.dequantize(x.dtype), self.bias)

    def extra_repr(self) -> str:
        sparsity = 1 - self.nnz / (self.in_features * self.out_features)
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"sparsity={sparsity:.3f}, bits={self.bits}"
        )


def _recompute_after_loading(module: SparseLinear, incompatible_keys) -> None:
    """New values loaded into a prepared layer: rebuild its dense copy or compute layer from them."""
    dense = module._buffers.get("dense_weight")
    if dense is not None:
        module.materialize(dense.dtype)
    inner = module.__dict__.get("compute_layer")
    if inner is not None:
        inner.load_codes(module.dense_codes(), module.weight_scale, module.weight_zero)
