"""int8 weights with int8 activations quantized at each call, on CPU.

Our int8 codes are asymmetric per output row: `w = (q - z) s` with `q, z` in [0, 255]. Two backends multiply them:

- fbgemm's `quantized::linear_dynamic` (VNNI; the fastest at a few tokens) takes per-channel affine int8: `q - 128`
  with zero point `z - 128` and the same scale is the same weight, exactly (it unpacks to our codes bit for bit);
- oneDNN's `onednn::qlinear_pointwise` (AMX int8 tiles where the CPU has them) takes uint8
  activations we quantize ourselves and symmetric weights only: it gets `s (q - 128)`, and the zero points' share
  `-s (z - 128) sum_k x_k` is added back in float32.

Activations get one 256-level grid per token, between the token's min and max (`_run_per_token`; a single token
is left to fbgemm, whose per-tensor grid is then per token), and the few input channels with values above
`OUTLIER_THRESHOLD` run in float32 (LLM.int8()). The only change of numerics against the dequantize reference is
that activation rounding: each output is off by at most half a grid step times `sum_k |w_k|` (see
`activation_step` and tests/quantization/test_dynamic_int8.py).

CPUs without VNNI saturate the uint8 x int8 pair sums fbgemm uses; `engine_check` probes that once with an input
that would overflow, then asks for 7-bit activations (`reduce_range`), or reports why a backend is unusable.
"""

from __future__ import annotations

import functools
import warnings

import torch

from . import qmath
from .memory import keep_only_kernel_copy

# inputs whose magnitude exceeds this in some token are computed in float32 (LLM.int8()'s threshold)
OUTLIER_THRESHOLD = 6.0
# float32 weight columns of at most this many outlier channels stay cached per layer (cleared by `prepare`)
MAX_CACHED_OUTLIERS = 16
# calls of at least this many tokens use oneDNN where it works
ONEDNN_MIN_TOKENS = 32


def _per_channel_weight(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    """Our uint8 codes `[out, in]` as a per-channel qint8 tensor: `q - 128` with zero point `z - 128` (the same
    weight), or with zero point 0 when `zero` is None (the weight minus the zero points' share)."""
    zero_point = torch.zeros(len(scale), dtype=torch.int64) if zero is None else zero.to(torch.int64) - 128
    with warnings.catch_warnings():  # torch marks its quantized tensor types deprecated; the backends need them
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
        return torch._make_per_channel_quantized_tensor(
            (codes.to(torch.int16) - 128).to(torch.int8), scale.double(), zero_point, 0)


def fbgemm_prepack(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor):
    """fbgemm's packed weight for codes `[out, in]` with per-row `scale` and `zero`."""
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = "fbgemm"
    try:
        return torch.ops.quantized.linear_prepack(_per_channel_weight(codes, scale, zero), None)
    finally:
        torch.backends.quantized.engine = previous


def onednn_prepack(codes: torch.Tensor) -> torch.Tensor:
    """oneDNN's packed (opaque) int8 weight `q - 128` for codes `[out, in]`."""
    return torch.ops.onednn.qlinear_prepack((codes.to(torch.int16) - 128).to(torch.int8), None)


def onednn_matmul(tokens: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`(tokens - 128) @ (s (q - 128)).T` in float32, `tokens` uint8 `[n, in]`."""
    zero_points = torch.zeros(len(scale), dtype=torch.int64)
    return torch.ops.onednn.qlinear_pointwise(tokens, 1.0, 128, packed, scale, zero_points, None, 1.0, 0,
                                              torch.float32, "none", [], "")


@functools.cache
def engine_check(engine: str) -> tuple[bool | None, str | None]:
    """`(reduce_range, None)` when `engine` ("fbgemm" or "onednn") computes our weights right, else `(None, reason)`.
    Probed once with all-maximal codes and an all-ones input, whose uint8 x int8 pair sums (2 x 255 x 127) overflow
    int16 unless the CPU accumulates without saturation (oneDNN: exactness only; `reduce_range` is False)."""
    in_features, out_features = 64, 16
    codes = torch.full((out_features, in_features), 255, dtype=torch.uint8)
    scale = torch.full((out_features,), 0.5)
    zero = torch.arange(out_features, dtype=torch.uint8) * 16  # 0 to 240
    try:
        if engine == "onednn":
            if not hasattr(torch.ops.onednn, "qlinear_pointwise"):
                return None, "this torch build has no onednn::qlinear_pointwise"
            tokens = torch.arange(2 * in_features).remainder(256).to(torch.uint8).view(2, in_features)
            out = onednn_matmul(tokens, onednn_prepack(codes), scale)
            exact = (tokens.double() - 128).sum(dim=1, keepdim=True) * 127 * 0.5
            ok = torch.allclose(out.double(), exact.expand(2, out_features), rtol=1e-5)
            return (False, None) if ok else (None, "onednn gives wrong results for int8 weights")
        if "fbgemm" not in torch.backends.quantized.supported_engines:
            return None, "this torch build has no fbgemm backend"
        packed = fbgemm_prepack(codes, scale, zero)
        back, _ = torch.ops.quantized.linear_unpack(packed)
        if not torch.equal(back.int_repr().to(torch.int16) + 128, codes.to(torch.int16)):
            return None, "fbgemm does not keep per-channel int8 weights exactly"
        exact = (255 - zero.float()) * 0.5 * in_features
        for reduce_range in (False, True):
            out = torch.ops.quantized.linear_dynamic(torch.ones(2, in_features), packed, reduce_range)
            if torch.allclose(out[0], exact, rtol=1e-3, atol=1e-3):
                return reduce_range, None
    except RuntimeError as error:
        return None, f"{engine}: {str(error).splitlines()[0]}"
    return None, f"{engine} gives wrong results for per-channel int8 weights"


def activation_step(x: torch.Tensor, reduce_range: bool = False) -> torch.Tensor:
    """The rounding step of each token's int8 grid, `[tokens, 1]`: `(max(x_t, 0) - min(x_t, 0)) / 255`."""
    flat = x.reshape(-1, x.shape[-1]).float()
    levels = 127 if reduce_range else 255
    return (flat.amax(dim=-1, keepdim=True).clamp(min=0) - flat.amin(dim=-1, keepdim=True).clamp(max=0)) / levels


def per_row_int8_unsupported(layer) -> str | None:
    """Why an int8 kernel with one scale per output row cannot serve `layer` (None when it can)."""
    if layer.bits != 8:
        return f"{layer.bits}-bit"
    if qmath.num_groups(layer.in_features, layer.group_size) != 1:
        return f"group size {layer.group_size} (the kernel takes one scale per output row)"
    if layer.weight.device.type != "cpu":
        return f"device {layer.weight.device.type}"
    return None


class Int8DynamicKernel:
    """int8 with one scale per output row, int8 activations, any number of tokens: fbgemm's `linear_dynamic` below
    `ONEDNN_MIN_TOKENS` tokens, oneDNN's `qlinear_pointwise` from there (where it works on this CPU)."""

    name = "int8-dynamic"
    max_tokens = None  # serves every inference call: it rounds the activations, so numerics must not depend on length
    quantizes_activations = True  # so only used without autograd at all (inference), see kernels.forward

    @staticmethod
    def unsupported(layer) -> str | None:
        return per_row_int8_unsupported(layer) or engine_check("fbgemm")[1]

    @staticmethod
    def prepare(layer) -> None:
        codes, scale, zero = layer.codes(), layer.weight_scale[:, 0].float(), layer.weight_zero[:, 0].float()
        layer.kernel_packed = fbgemm_prepack(codes, scale, zero)
        layer.kernel_reduce_range = engine_check("fbgemm")[0]
        layer.kernel_packed_large = onednn_prepack(codes) if engine_check("onednn")[1] is None else None
        layer.kernel_scale = scale
        code_sum = codes.sum(dim=1, dtype=torch.int64).double()
        row_sum = (code_sum - layer.in_features * zero.double()) * scale.double()  # sum_k w[n, k]
        zero_term = (zero.double() - 128) * scale.double()  # w = s (q - 128) - zero_term
        layer.register_buffer("kernel_sums", torch.stack([row_sum, zero_term]).float(), persistent=False)
        layer.kernel_outlier_columns = None
        keep_only_kernel_copy(layer)  # fbgemm's copy is exact

    @staticmethod
    def codes(layer) -> torch.Tensor:
        """The layer's codes `[out, in]`, read back from fbgemm's copy."""
        weight, _ = torch.ops.quantized.linear_unpack(layer.kernel_packed)
        return (weight.int_repr().to(torch.int16) + 128).to(torch.uint8)

    @staticmethod
    def run(layer, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, layer.in_features)
        if flat.dtype != torch.float32:
            flat = flat.float()
        if len(flat) == 1:  # decode: the backend's per-tensor grid is per token
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
    """Each token rounded onto its own grid, `x^ = low + step j` with `j` in 0..255, then multiplied exactly.

    oneDNN takes `j` itself: with `y = W0 (j - 128)` for its weight `W0 = s (q - 128) = W + zero_term`,
    `W x^ = step y + (low + 128 step) sum_k w[:, k] + zero_term step (128 in_features - sum_k j_k)`. fbgemm
    quantizes its input itself with one grid: handed `(j - 128) 2 / 255`, which spans that grid exactly, it rounds
    nothing, and `W x^ = step 255 / 2 y + (low + 128 step) sum_k w[:, k]`.
    """
    step = ((high - low) / 255).clamp_(min=torch.finfo(torch.float32).tiny)
    scale = step.reciprocal()
    if layer.kernel_packed_large is not None and len(flat) >= ONEDNN_MIN_TOKENS:
        levels = torch.addcmul(low.mul(scale).neg_(), flat, scale).round_()  # j
        zero_share = levels.sum(dim=-1, keepdim=True).sub_(128 * layer.in_features).mul_(step).neg_()
        y = onednn_matmul(levels.to(torch.uint8), layer.kernel_packed_large, layer.kernel_scale)
        return y.mul_(step).addmm_(torch.cat([low + 128 * step, zero_share], dim=1), layer.kernel_sums)
    unit = torch.addcmul(low.mul(scale).add_(128).neg_(), flat, scale).round_().mul_(2 / 255)  # (j - 128) 2 / 255
    y = torch.ops.quantized.linear_dynamic(unit, layer.kernel_packed, layer.kernel_reduce_range)
    return y.mul_(step * 127.5).addr_((low + 128 * step).view(-1), layer.kernel_sums[0])


def _weight_columns(layer, channels: torch.Tensor) -> torch.Tensor:
    """Float32 columns `w[:, channels]`. fbgemm holding the only copy of the codes, a few columns come from the
    kernel itself (one-hot inputs sit exactly on its grid, so `W e_k` is column k to float32 rounding) rather than
    from unpacking the whole matrix."""
    if layer.weight_in_kernel and len(channels) <= MAX_CACHED_OUTLIERS:
        basis = torch.zeros(len(channels), layer.in_features)
        basis[torch.arange(len(channels)), channels] = 1.0
        return torch.ops.quantized.linear_dynamic(basis, layer.kernel_packed, layer.kernel_reduce_range).t()
    codes = layer.codes()[:, channels].float()
    return (codes - layer.weight_zero[:, :1].float()) * layer.weight_scale[:, :1].float()


def _run_with_outliers(layer, flat: torch.Tensor, peaks: torch.Tensor) -> torch.Tensor:
    """LLM.int8()'s split: the few input channels whose `peaks` (max |x|) pass the threshold in float32, the rest
    through int8."""
    outliers = (peaks > OUTLIER_THRESHOLD).nonzero().flatten()
    cached = layer.__dict__.get("kernel_outlier_columns")  # decode meets the same few channels token after token
    if cached is not None and cached[0].shape == outliers.shape and torch.equal(cached[0], outliers):
        columns = cached[1]
    else:
        columns = _weight_columns(layer, outliers)
        if len(outliers) <= MAX_CACHED_OUTLIERS:
            layer.kernel_outlier_columns = (outliers, columns)
    inliers = flat.index_fill(1, outliers, 0.0)
    if len(flat) == 1:
        y = torch.ops.quantized.linear_dynamic(inliers, layer.kernel_packed, layer.kernel_reduce_range)
    else:
        y = _run_per_token(layer, inliers, inliers.amax(dim=-1, keepdim=True), inliers.amin(dim=-1, keepdim=True))
    return y.addmm_(flat[:, outliers], columns.t())
