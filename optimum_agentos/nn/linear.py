"""`QuantLinear`: a linear layer whose weight is stored as packed integer codes plus per-group scales and zeros."""

from __future__ import annotations

import torch
from torch import nn

from . import kernels, packing, qmath, transposed


SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class QuantLinear(nn.Module):
    """Weight-only quantized replacement for `nn.Linear` and GPT-2's `Conv1D`.

    Tensors (all plain, saved as they are in safetensors):
    - `weight`: uint8, flat, the packed codes of the `[out_features, in_features]` weight (see `packing`);
    - `weight_scale`: `[out_features, groups]` float scales;
    - `weight_zero`: `[out_features, groups]` uint8 zero points;
    - `bias`: optional, in the model's dtype.

    Forward: after `prepare.prepare_kernels` (run at load), each call takes the path measured fastest on this machine
    for its number of tokens (a packed CPU kernel, or the weight dequantized into a reused buffer, see `dequant`);
    calls with autograd on (training), and `policy="reference"`, take the reference path: dequantize, then `F.linear`.
    """

    kernel = None  # set per layer by prepare.prepare_kernels
    routes = None  # likewise: ((max_tokens, run), ...), the measured fastest path per token count (None: reference)
    weight_in_kernel = False  # True when the kernel's layout holds the only copy of the codes (`weight` is empty)
    fused = None  # set by fusion.fuse_siblings: the q/k/v or gate/up group this layer computes with at decode

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        bits: int = 4,
        group_size: int = 128,
        scale_dtype: torch.dtype = torch.float16,
        dtype: torch.dtype | None = None,
        device=None,
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.group_size = group_size
        groups = qmath.num_groups(in_features, group_size)
        nbytes = out_features * packing.packed_row_bytes(in_features, bits)
        self.weight = nn.Parameter(torch.empty(nbytes, dtype=torch.uint8, device=device), requires_grad=False)
        self.weight_scale = nn.Parameter(
            torch.empty(out_features, groups, dtype=scale_dtype, device=device), requires_grad=False
        )
        self.weight_zero = nn.Parameter(
            torch.empty(out_features, groups, dtype=torch.uint8, device=device), requires_grad=False
        )
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype or torch.float32, device=device))
        else:
            self.register_parameter("bias", None)
        self.register_state_dict_post_hook(_weight_from_kernel)
        self.register_load_state_dict_pre_hook(_weight_back_for_loading)
        self.register_load_state_dict_post_hook(_repack_after_loading)

    @classmethod
    def from_float(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        bits: int,
        group_size: int,
        sym: bool,
        scale_dtype: torch.dtype = torch.float16,
        mse_grid: int = 0,
    ) -> "QuantLinear":
        """Round-to-nearest quantize a float weight `[out, in]` into a new layer."""
        codes, scales, zeros = qmath.quantize_rtn(weight.detach(), bits, group_size, sym, scale_dtype, mse_grid)
        return cls.from_codes(codes, scales, zeros, bias, bits, group_size)

    @classmethod
    def from_codes(cls, codes, scales, zeros, bias, bits, group_size) -> "QuantLinear":
        """Build a layer from integer codes `[out, in]` and group parameters (e.g. GPTQ's output)."""
        out_features, in_features = codes.shape
        layer = cls(
            in_features,
            out_features,
            bias=bias is not None,
            bits=bits,
            group_size=group_size,
            scale_dtype=scales.dtype,
            dtype=None if bias is None else bias.dtype,
            device=codes.device,
        )
        layer.load_codes(codes, scales, zeros)
        if bias is not None:
            layer.bias.data.copy_(bias.detach())
        return layer

    def load_codes(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> None:
        """Replace the stored weight by new codes and group parameters (shapes must match the layer)."""
        if codes.shape != (self.out_features, self.in_features):
            raise ValueError(f"codes of shape {tuple(codes.shape)} do not fit a {self.out_features}x{self.in_features} layer")
        self.unfuse()
        self.weight.data = packing.pack(codes, self.bits)
        self.weight_in_kernel = False
        self.weight_scale.data = scales.to(self.weight_scale.dtype).contiguous()
        self.weight_zero.data = zeros.to(torch.uint8).contiguous()
        if self.kernel is not None:  # keep the kernel's own layout in step with the new codes
            self.kernel.prepare(self)
        transposed.refresh(self)

    def unfuse(self) -> None:
        """Leave the sibling group (`fusion`): every member computes alone again, from its own view of the codes."""
        if self.fused is not None:
            for member in self.fused.members:
                member.fused = None

    def codes(self) -> torch.Tensor:
        """Unpacked integer codes `[out, in]`."""
        if self.weight_in_kernel:
            return self.kernel.codes(self)
        return packing.unpack(self.weight, self.bits, self.out_features, self.in_features)

    def restore_weight(self) -> None:
        """Give `weight` its packed codes back when a kernel held the only copy."""
        if self.weight_in_kernel:
            self.weight.data = packing.pack(self.codes(), self.bits)
            self.weight_in_kernel = False

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float weight `[out, in]` this layer computes with."""
        if dtype is None:
            dtype = self.bias.dtype if self.bias is not None else torch.float32
        return qmath.dequantize_codes(self.codes(), self.weight_scale, self.weight_zero, self.group_size, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.forward(self, x)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"bits={self.bits}, group_size={self.group_size}"
        )


def _weight_from_kernel(module: QuantLinear, state_dict, prefix, local_metadata) -> None:
    """`state_dict` holds the packed codes even while only the kernel's layout keeps them."""
    if module.weight_in_kernel:
        state_dict[prefix + "weight"] = packing.pack(module.codes(), module.bits)


def _weight_back_for_loading(module: QuantLinear, *args) -> None:
    module.unfuse()
    module.restore_weight()


def _repack_after_loading(module: QuantLinear, incompatible_keys) -> None:
    if module.kernel is not None:  # the kernel's layout follows the loaded codes
        module.kernel.prepare(module)
    transposed.refresh(module)


def float_weight(module: nn.Module) -> torch.Tensor:
    """A supported layer's weight in `[out, in]` orientation (`Conv1D` stores it transposed)."""
    if is_conv1d(module):
        return module.weight.t()
    return module.weight


def is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """`(in_features, out_features)` of an `nn.Linear` or `Conv1D`."""
    if is_conv1d(module):
        return module.weight.shape[0], module.weight.shape[1]
    return module.in_features, module.out_features
