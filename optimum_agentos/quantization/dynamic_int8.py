"""int8 weights with dynamically quantized int8 activations on CPU: torch's fbgemm `quantized::linear_dynamic`.

Our int8 codes are asymmetric per output row: `w = (q - z) s` with `q, z` in [0, 255]. fbgemm takes per-channel
affine int8 weights, so `q - 128` with zero point `z - 128` and the same scale is the same weight, exactly (the
packed weight unpacks to our codes bit for bit). At each call fbgemm quantizes the activations to uint8 with one
scale and zero point for the whole input (min/max of the tensor, 256 levels), multiplies in int32 and rescales to
float32. The only change of numerics against the dequantize reference is that activation rounding: every output
element is off by at most `s_x / 2 * sum_k |w_k|` with `s_x = (max(x, 0) - min(x, 0)) / 255` (see
`activation_step` and tests/quantization/test_dynamic_int8.py).

Some CPUs (no VNNI) saturate the uint8 x int8 pair sums fbgemm uses; `engine_check` probes that once with an
input that would overflow and then asks fbgemm for 7-bit activations (`reduce_range`), or reports why the kernel
is unusable.
"""

from __future__ import annotations

import functools
import warnings

import torch
from transformers.utils import logging

from . import rtn


logger = logging.get_logger(__name__)

# inputs whose magnitude exceeds this in some token are computed in float32 (LLM.int8()'s threshold)
OUTLIER_THRESHOLD = 6.0


def _per_channel_weight(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Our uint8 codes `[out, in]` as a per-channel affine qint8 tensor with the same dequantized values."""
    with warnings.catch_warnings():  # torch marks its quantized tensor types deprecated; fbgemm still needs them
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
        return torch._make_per_channel_quantized_tensor(
            (codes.to(torch.int16) - 128).to(torch.int8), scale.double(), zero.to(torch.int64) - 128, 0)


@functools.cache
def engine_check(engine: str) -> tuple[bool | None, str | None]:
    """`(reduce_range, None)` when `quantized::linear_dynamic` computes our asymmetric weights right, else
    `(None, reason)`. Probed once per quantized engine with a weight of all-maximal codes and an all-ones input,
    whose uint8 x int8 pair sums (2 x 255 x 127) overflow int16 unless the CPU accumulates without saturation."""
    if not hasattr(torch.ops.quantized, "linear_dynamic") or not hasattr(torch.ops.quantized, "linear_prepack"):
        return None, "this torch build has no quantized::linear_dynamic"
    in_features, out_features = 64, 16
    codes = torch.full((out_features, in_features), 255, dtype=torch.uint8)
    scale = torch.full((out_features,), 0.5, dtype=torch.float16)
    zero = torch.arange(out_features, dtype=torch.uint8) * 16  # zero points from 0 to 240
    exact = (255 - zero.float()) * 0.5 * in_features
    try:
        packed = torch.ops.quantized.linear_prepack(_per_channel_weight(codes, scale, zero), None)
        back, _ = torch.ops.quantized.linear_unpack(packed)
        if not torch.equal(back.int_repr().to(torch.int16) + 128, codes.to(torch.int16)):
            return None, f"engine {engine} does not keep per-channel int8 weights exactly"
        ones = torch.ones(2, in_features)
        for reduce_range in (False, True):
            out = torch.ops.quantized.linear_dynamic(ones, packed, reduce_range)
            if torch.allclose(out[0], exact, rtol=1e-3, atol=1e-3):
                return reduce_range, None
    except RuntimeError as error:
        return None, f"engine {engine}: {str(error).splitlines()[0]}"
    return None, f"engine {engine} gives wrong results for asymmetric per-channel int8 weights"


def activation_step(x: torch.Tensor, reduce_range: bool = False) -> torch.Tensor:
    """The rounding step of each token's int8 grid, `[tokens, 1]`: `(max(x_t, 0) - min(x_t, 0)) / 255`."""
    flat = x.reshape(-1, x.shape[-1]).float()
    levels = 127 if reduce_range else 255
    return (flat.amax(dim=-1, keepdim=True).clamp(min=0) - flat.amin(dim=-1, keepdim=True).clamp(max=0)) / levels


class Int8DynamicKernel:
    """int8 with one scale per output row: `quantized::linear_dynamic` (int8 activations, any number of tokens)."""

    name = "fbgemm-int8-dynamic"
    max_tokens = None  # faster than fp32 and the bf16 packed kernel at 1 to 512 tokens (see README)
    quantizes_activations = True  # so only used without autograd at all (inference), see kernels.forward

    @staticmethod
    def unsupported(layer) -> str | None:
        if layer.bits != 8:
            return f"{layer.bits}-bit"
        if rtn.num_groups(layer.in_features, layer.group_size) != 1:
            return f"group size {layer.group_size} (fbgemm takes one scale per output row)"
        if layer.weight.device.type != "cpu":
            return f"device {layer.weight.device.type}"
        return engine_check(torch.backends.quantized.engine)[1]

    @staticmethod
    def prepare(layer) -> None:
        codes, scale, zero = layer.codes(), layer.weight_scale[:, 0].float(), layer.weight_zero[:, 0].float()
        layer.kernel_packed = torch.ops.quantized.linear_prepack(_per_channel_weight(codes, scale, zero), None)
        layer.kernel_reduce_range = engine_check(torch.backends.quantized.engine)[0]
        row_sum = (codes.double().sum(dim=1) - layer.in_features * zero.double()) * scale.double()
        layer.register_buffer("kernel_row_sum", row_sum.float(), persistent=False)  # sum_k w[n, k]

    @staticmethod
    def run(layer, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, layer.in_features)
        if flat.dtype != torch.float32:
            flat = flat.float()
        if len(flat) == 1:  # decode: fbgemm's per-tensor rounding is per token
            low, high = torch.aminmax(flat)
            if max(high.item(), -low.item()) <= OUTLIER_THRESHOLD:
                y = torch.ops.quantized.linear_dynamic(flat, layer.kernel_packed, layer.kernel_reduce_range)
            else:
                y = _run_with_outliers(layer, flat, flat[0].abs())
        else:
            high, low = flat.amax(dim=-1, keepdim=True), flat.amin(dim=-1, keepdim=True)
            if max(high.max().item(), -low.min().item()) <= OUTLIER_THRESHOLD:
                y = _run_per_token(layer, flat, high, low)
            else:  # max |x| of each input channel (amax and amin are much faster than abs().amax() here)
                y = _run_with_outliers(layer, flat, torch.maximum(flat.amax(dim=0), flat.amin(dim=0).neg_()))
        if layer.bias is not None:
            y = y + layer.bias.float()
        return y.to(x.dtype).reshape(*x.shape[:-1], layer.out_features)


def _run_per_token(layer, flat: torch.Tensor, high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """Per-token rounding from fbgemm's per-tensor one: map each token's [min, max] (0 included) onto [-1, 1], so
    `x = center + half * unit` and `W x = half * W unit + center * sum_k w[:, k]`."""
    high, low = high.clamp(min=0), low.clamp(max=0)
    half = (high - low).mul_(0.5).clamp_(min=torch.finfo(torch.float32).tiny)
    center = low + half
    scale = half.reciprocal()
    unit = torch.addcmul(center.mul(scale).neg_(), flat, scale)
    y = torch.ops.quantized.linear_dynamic(unit, layer.kernel_packed, layer.kernel_reduce_range) * half
    return y.addr_(center.view(-1), layer.kernel_row_sum)


def _run_with_outliers(layer, flat: torch.Tensor, peaks: torch.Tensor) -> torch.Tensor:
    """LLM.int8()'s split: the few input channels whose `peaks` (max |x|) pass the threshold in float32, the rest
    through int8."""
    outliers = (peaks > OUTLIER_THRESHOLD).nonzero().flatten()
    codes = layer.weight.view(layer.out_features, layer.in_features)[:, outliers].float()
    columns = (codes - layer.weight_zero[:, :1].float()) * layer.weight_scale[:, :1].float()
    inliers = flat.index_fill(1, outliers, 0.0)
    if len(flat) == 1:
        y = torch.ops.quantized.linear_dynamic(inliers, layer.kernel_packed, layer.kernel_reduce_range)
    else:
        y = _run_per_token(layer, inliers, inliers.amax(dim=-1, keepdim=True), inliers.amin(dim=-1, keepdim=True))
    return y.addmm_(flat[:, outliers], columns.t())
