"""The float32 output head of a compressed model, with a bfloat16 copy of its weight for the calls it is faster on.

A compressed checkpoint without `embedding_bits` keeps its output head (tied to the embedding in small models) in
float32: for SmolLM2-135M that is 49152 x 576 weights, 113 MB read per decoded token, more than all its int4 layers
together. `FloatHead` replaces the `nn.Linear` head at load, computing with the same `weight` and `bias` parameters (so
ties, `state_dict` keys and the saved checkpoint do not change), and `prepare.prepare_kernels` measures, per token
count, the exact float32 matmul against a bfloat16 copy of the weight (`bf16-copy`: half the bytes, bf16 activations,
the same ~1% bound as the packed kernels' bf16 activations; `native-bf16-copy`: the copy times float32 activations in a
native loop, for few tokens). The copy costs 2 bytes per weight (SmolLM2: 54 MiB); it is dropped when no token count
uses it, and rebuilt when the float weight changes (a fine-tune, a re-tie).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels, native


class FloatPath:
    """The head's own float matmul (the reference numbers)."""

    name = "float"
    tolerance = 1e-5

    @staticmethod
    def run(head, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, head.weight, head.bias)


class BF16CopyPath:
    """bf16 activations times the bf16 copy of the weight; the output back in the activations' dtype."""

    name = "bf16-copy"
    tolerance = 1e-2  # of the output's magnitude: bf16 rounding of activations and weights

    @staticmethod
    def run(head, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(kernels.bf16_input(x, head.in_features), head.bf16_weight()).to(x.dtype)
        if head.bias is not None:
            y = y + head.bias.to(x.dtype)
        return y.reshape(*x.shape[:-1], head.out_features)


PATHS = (FloatPath, BF16CopyPath, native.NativeBF16Copy)
COPY_PATHS = {BF16CopyPath.name, native.NativeBF16Copy.name}  # the paths reading the bf16 copy


class FloatHead(nn.Linear):
    """An `nn.Linear` output head whose calls take the path `prepare_kernels` measured fastest for their number of
    tokens (`kernels.forward`); with autograd on, or before `prepare_kernels`, the plain float matmul."""

    kernel = None
    routes = None
    fused = None  # never fused (see `fusion`)
    candidate_paths = PATHS  # read by `dispatch.candidates`
    bits, group_size = 32, -1  # for `dispatch.signature`

    @classmethod
    def wrapping(cls, linear: nn.Linear) -> "FloatHead":
        """A head computing with `linear`'s own parameters (not copies)."""
        head = cls(linear.in_features, linear.out_features, bias=False, device="meta")
        head.weight, head.bias = linear.weight, linear.bias
        return head

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.weight.to(dtype or self.weight.dtype)

    def make_copy(self) -> None:
        self.register_buffer("kernel_bf16_weight", self.weight.detach().to(torch.bfloat16), persistent=False)
        self._copy_of = (self.weight, self.weight._version)

    def drop_copy(self) -> None:
        self.register_buffer("kernel_bf16_weight", None, persistent=False)
        self._copy_of = None

    def bf16_weight(self) -> torch.Tensor:
        """The bf16 copy, rebuilt first if the float weight was replaced or changed in place since it was made."""
        if not torch.compiler.is_compiling():
            source, version = getattr(self, "_copy_of", None) or (None, -1)
            if source is not self.weight or version != self.weight._version:
                self.make_copy()
        return self.kernel_bf16_weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.forward(self, x)


def float_head(model) -> FloatHead | None:
    """The model's output head as a `FloatHead` (put in place of a plain float32 `nn.Linear` head), or None when
    the head is something else (quantized, bfloat16, absent)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if get is not None else None
    if isinstance(head, FloatHead):
        return head
    if type(head) is not nn.Linear or head.weight.dtype != torch.float32 or head.weight.device.type != "cpu":
        return None
    new = FloatHead.wrapping(head)
    model.set_output_embeddings(new)
    return new


def plain_head(model) -> None:
    """Put a plain `nn.Linear` (the same parameters) back in place of a `FloatHead` (a dequantized model)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, FloatHead):
        linear = nn.Linear(head.in_features, head.out_features, bias=False, device="meta")
        linear.weight, linear.bias = head.weight, head.bias
        model.set_output_embeddings(linear)
