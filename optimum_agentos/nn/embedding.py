"""int8 token embeddings and output head (`AgentOSConfig(embedding_bits=8)`).

A small model's vocabulary matrix is a large share of it (SmolLM2-135M: 28M of 135M weights) and it is the largest
single matmul of each decoded token. Both get one int8 code per weight and one float32 scale per vocabulary row
(symmetric: `w = q s`, `q` in [-127, 127]). When the head is tied to the embedding, both modules hold the same two
tensors (tied like the float weights, through the model's tied-weight keys), so the file and the memory hold one
int8 matrix. The head decodes with `torch._weight_int8pack_mm` on these codes as they are (no second copy,
`kernels.Int8RowsKernel`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels

EMBEDDING_BITS = (8,)


def quantize_rows_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes `[rows, cols]` and float32 scales `[rows, 1]` (max |w| of the row / 127)."""
    weight = weight.detach().float()
    scale = (weight.abs().amax(dim=1, keepdim=True) / 127).clamp_(min=torch.finfo(torch.float32).tiny)
    codes = torch.round(weight / scale).clamp_(-127, 127).to(torch.int8)
    return codes, scale


def _int8_parameters(rows: int, cols: int, device) -> tuple[nn.Parameter, nn.Parameter]:
    weight = nn.Parameter(torch.empty(rows, cols, dtype=torch.int8, device=device), requires_grad=False)
    scale = nn.Parameter(torch.empty(rows, 1, dtype=torch.float32, device=device), requires_grad=False)
    return weight, scale


class QuantEmbedding(nn.Module):
    """`nn.Embedding` with int8 rows: `weight` int8 `[num_embeddings, embedding_dim]`, `weight_scale` float32
    `[num_embeddings, 1]`; looks rows up, then scales them into `dtype` (the float model's dtype)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None,
                 dtype: torch.dtype | None = None, device=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.dtype = dtype or torch.get_default_dtype()
        self.weight, self.weight_scale = _int8_parameters(num_embeddings, embedding_dim, device)

    @classmethod
    def from_float(cls, embedding: nn.Embedding) -> "QuantEmbedding":
        new = cls(embedding.num_embeddings, embedding.embedding_dim, embedding.padding_idx, embedding.weight.dtype,
                  embedding.weight.device)
        new.weight.data, new.weight_scale.data = quantize_rows_int8(embedding.weight)
        return new

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or self.dtype
        return self.weight.to(dtype) * self.weight_scale.to(dtype)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(input_ids, self.weight).to(self.dtype)
        return rows * F.embedding(input_ids, self.weight_scale).to(self.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bits=8"


class QuantHead(nn.Module):
    """Bias-free output head with int8 rows, the same tensors as `QuantEmbedding` (shared with it when tied).

    Computes through `kernels.forward`, like `QuantLinear`: once `prepare.prepare_kernels` has run, each call takes
    the path measured fastest for its number of tokens (`kernels.Int8RowsKernel` or a dequant path); autograd, and
    everything before `prepare_kernels`, take the exact float path. Tolerance of the int8 kernel
    against it: the bf16 rounding of activations and outputs (~1%)."""

    kernel = None  # set by prepare.prepare_kernels
    routes = None  # likewise (see `QuantLinear`)
    bias = None  # bias-free by construction (`from_float` refuses a head with one)
    fused = None  # never fused (see `fusion`)

    def __init__(self, in_features: int, out_features: int, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight, self.weight_scale = _int8_parameters(out_features, in_features, device)

    @classmethod
    def from_float(cls, head: nn.Linear) -> "QuantHead":
        if getattr(head, "bias", None) is not None:
            raise ValueError("embedding_bits quantizes bias-free output heads only; this head has a bias. Leave "
                             "embedding_bits=None for this model.")
        new = cls(head.in_features, head.out_features, head.weight.device)
        new.weight.data, new.weight_scale.data = quantize_rows_int8(head.weight)
        return new

    @classmethod
    def tied_to(cls, embedding: QuantEmbedding) -> "QuantHead":
        """A head computing with the embedding's own int8 tensors (tied weights)."""
        new = cls(embedding.embedding_dim, embedding.num_embeddings, device="meta")
        new.weight, new.weight_scale = embedding.weight, embedding.weight_scale
        return new

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.weight.to(dtype) * self.weight_scale.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.forward(self, x)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits=8"
