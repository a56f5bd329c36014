"""compressed-tensors export (`pack-quantized`): a plain transformers checkpoint that `from_pretrained` loads with
the `compressed-tensors` package and no plugin of ours (and that vLLM reads).

What transformers loads compressed is symmetric int4/int8 whose group size divides `in_features` (or one group per
row): our codes map onto it exactly (`q = code - 2**(bits-1)`, zero point 0, the same scales). Asymmetric codes
need zero points, which transformers reads only with `CompressedTensorsConfig(dequantize=True)` (a dense model), so
they stop with an `ExportError` (quantize with `sym=True`, or `requantize=True` re-encodes them symmetric and reports
the added error); so does a group size that does not divide the layer. compressed-tensors dropped sparse formats:
sparse layers are written dense, float ones as floats, quantized ones as their dense codes. int8 embeddings and
heads have no compressed-tensors form transformers loads: they are written as float (their exact values).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from transformers.utils import logging

from ..nn import QuantLinear, SparseLinear, qmath
from ..nn.embedding import QuantEmbedding
from .layers import WEIGHT_MODULES, ExportError, Weight, weight_of

logger = logging.get_logger(__name__)

BITS = (4, 8)


def pack_int32(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed codes `[rows, cols]` (int, in [-2**(bits-1), 2**(bits-1))) -> int32 words `[rows, ceil(cols*bits/32)]`,
    element `i` of a row at bits `i*bits` of the row's little-endian bit stream (compressed-tensors' layout)."""
    per_word = 32 // bits
    rows, cols = values.shape
    unsigned = (values.to(torch.int64) + (1 << (bits - 1))) & ((1 << bits) - 1)
    padded = torch.nn.functional.pad(unsigned, (0, -cols % per_word)).view(rows, -1, per_word)
    words = (padded << (torch.arange(per_word) * bits)).sum(dim=-1)
    return (words - ((words >> 31) << 32)).to(torch.int32)  # wrap to the signed int32 range


def _dividing_group(in_features: int, group_size: int) -> int:
    while group_size > 1 and in_features % group_size:
        group_size //= 2
    return group_size


def _exact_problem(weight: Weight) -> str | None:
    if weight.bits not in BITS:
        return f"int{weight.bits} is not exported to compressed-tensors (supported: int4, int8); quantize with bits=4"
    if not weight.sym:
        return ("asymmetric codes need zero points, which transformers loads only dequantized "
                "(CompressedTensorsConfig(dequantize=True)); quantize with sym=True")
    if weight.group_size != -1 and weight.shape[1] % weight.group_size:
        fits = _dividing_group(weight.shape[1], weight.group_size)
        return (f"group_size={weight.group_size} does not divide in_features={weight.shape[1]}, which "
                f"compressed-tensors requires; quantize with group_size={fits}")
    return None


def _requantized(weight: Weight) -> tuple[Weight, float]:
    """Symmetric RTN re-encoding of `weight`'s float values (a dividing group size); returns it and the largest
    absolute change of a weight."""
    bits = weight.bits if weight.bits in BITS else 4
    group = -1 if weight.group_size == -1 else _dividing_group(weight.shape[1], weight.group_size)
    dense = weight.dequantize()
    codes, scales, zeros = qmath.quantize_rtn(dense, bits, group, sym=True, scale_dtype=weight.scales.dtype)
    new = Weight(weight.shape, codes=codes, scales=scales, zeros=zeros, bits=bits, group_size=group, sym=True)
    return new, float((new.dequantize() - dense).abs().max())


def _scheme(bits: int, group_size: int, targets: list[str]) -> dict:
    weights = {"num_bits": bits, "type": "int", "symmetric": True, "dynamic": False,
               "strategy": "channel" if group_size == -1 else "group",
               "group_size": None if group_size == -1 else group_size}
    return {"targets": targets, "weights": weights, "input_activations": None, "output_activations": None,
            "format": "pack-quantized"}


def _tensors(model, requantize: bool, dtype: torch.dtype):
    """The checkpoint's tensors, the quantized layers per (bits, group size), and what was re-encoded."""
    tensors, groups, requantized, dense_layers = {}, defaultdict(list), {}, []
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    head = model.get_output_embeddings()
    for name, module in model.named_modules():
        params = dict(module.named_parameters(recurse=False))
        if not isinstance(module, WEIGHT_MODULES):
            tensors.update({f"{name}.{p}": t.detach() for p, t in params.items()})
            continue
        if tied and module is head:
            continue
        weight = weight_of(module)
        bias = getattr(module, "bias", None)
        if bias is not None:
            tensors[f"{name}.bias"] = bias.detach()
        if not (weight.quantized and isinstance(module, (QuantLinear, SparseLinear))):
            tensors[f"{name}.weight"] = weight.dequantize().to(dtype) if weight.quantized else weight.dense
            if weight.quantized or weight.sparse:
                dense_layers.append(name)
            continue
        problem = _exact_problem(weight)
        if problem and not requantize:
            raise ExportError(f"{name}: {problem}; or pass requantize=True (CLI: --requantize) to re-encode it "
                              "symmetric and report the added error (or export to gguf, which holds these codes).")
        if problem:
            weight, requantized[name] = _requantized(weight)
        offset = 1 << (weight.bits - 1)
        tensors[f"{name}.weight_packed"] = pack_int32(weight.codes.to(torch.int16) - offset, weight.bits)
        tensors[f"{name}.weight_scale"] = weight.scales.to(dtype)
        tensors[f"{name}.weight_shape"] = torch.tensor(weight.shape, dtype=torch.int64)
        if not torch.equal(weight.scales.to(dtype).to(weight.scales.dtype), weight.scales):
            raise ExportError(f"{name}: its {weight.scales.dtype} scales do not fit the model's dtype {dtype}.")
        groups[(weight.bits, weight.group_size)].append(name)
    return tensors, groups, requantized, dense_layers


def _check_keys(model, tensors: dict) -> None:
    """The written tensors are exactly those transformers expects of this architecture (names and shapes), with
    the quantized layers' weights in their packed form."""
    shapes = {k: tuple(v.shape) for k, v in tensors.items()
              if not k.endswith(("weight_packed", "weight_scale", "weight_shape"))}
    shapes.update({k.rsplit(".", 1)[0] + ".weight": tuple(v.tolist()) for k, v in tensors.items()
                   if k.endswith("weight_shape")})
    with torch.device("meta"):
        skeleton = type(model)(model.config.__class__.from_dict(
            {k: v for k, v in model.config.to_dict().items() if k != "quantization_config"}))
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        expected.pop(next(n for n, m in skeleton.named_modules() if m is skeleton.get_output_embeddings()) + ".weight")
    if shapes != expected:
        wrong = sorted(k for k in set(shapes) | set(expected) if shapes.get(k) != expected.get(k))
        raise ExportError(f"compressed-tensors export cannot map this model's layers ({', '.join(wrong[:5])} differ "
                          "from what transformers expects); supported: transformers models built from nn.Linear.")


def write_compressed_tensors(model, tokenizer, out_dir: Path, *, requantize: bool = False) -> dict:
    """Write `model.safetensors` (pack-quantized), `config.json` and the tokenizer into `out_dir`."""
    dtype = next((p.dtype for p in model.parameters() if p.dtype.is_floating_point), torch.float32)
    tensors, groups, requantized, dense_layers = _tensors(model, requantize, dtype)
    if not groups:
        raise ExportError("No quantized layer to write: compressed-tensors export needs a quantized checkpoint "
                          "(symmetric int4/int8); a float model is already a plain transformers checkpoint.")
    _check_keys(model, tensors)
    linear_names = {n for n, m in model.named_modules() if isinstance(m, WEIGHT_MODULES)
                    and not isinstance(m, (nn.Embedding, QuantEmbedding))}
    quantized = {n for names in groups.values() for n in names}
    single = len(groups) == 1
    config_groups = {f"group_{i}": _scheme(bits, gs, ["Linear"] if single else sorted(names))
                     for i, ((bits, gs), names) in enumerate(sorted(groups.items()))}
    quant_config = {"quant_method": "compressed-tensors", "format": "pack-quantized",
                    "quantization_status": "compressed", "config_groups": config_groups,
                    "ignore": sorted(linear_names - quantized), "kv_cache_scheme": None,
                    "global_compression_ratio": None}
    config = {k: v for k, v in model.config.to_dict().items() if k != "quantization_config"}
    config.update(quantization_config=quant_config, dtype=str(dtype).replace("torch.", ""))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out_dir / "model.safetensors"),
              metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return {"format_name": "pack-quantized", "quantized_layers": len(quantized),
            "schemes": {f"int{b}-g{g}": len(n) for (b, g), n in sorted(groups.items())},
            "dense_layers": dense_layers, "requantized_tensors": sorted(requantized),
            "max_abs_weight_error": max(requantized.values(), default=0.0)}
