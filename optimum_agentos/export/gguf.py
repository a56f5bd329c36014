"""GGUF export (llama.cpp) of Llama-family decoders: Llama/SmolLM2, Mistral, Qwen2.

Quantized layers keep their integer codes (see `gguf_tensors`: symmetric int2-4 -> Q4_0, asymmetric int2-4 ->
Q4_1, symmetric int8 -> Q8_0, int8 embeddings -> Q8_0); float layers keep their dtype (F32, F16, BF16), norms and
biases are F32; sparse layers are written dense; a tied head is not written twice (llama.cpp reads the embedding).
For the `llama` architecture the rows of q/k are reordered as llama.cpp's converter does (its rotary embedding pairs
adjacent rows). The tokenizer goes in as well (`gguf_vocab`), so the file runs on its own.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import gguf
from torch import nn
from tqdm.auto import tqdm
from transformers.utils import logging

from ..nn.embedding import QuantEmbedding, QuantHead
from . import gguf_tensors as gt
from .gguf_vocab import add_vocab
from .layers import WEIGHT_MODULES, ExportError, weight_of

logger = logging.get_logger(__name__)

# model_type -> (GGUF architecture, q/k rows permuted for llama.cpp's rotary layout)
ARCHITECTURES = {"llama": (gguf.MODEL_ARCH.LLAMA, True), "mistral": (gguf.MODEL_ARCH.LLAMA, True),
                 "qwen2": (gguf.MODEL_ARCH.QWEN2, False)}
FILE_TYPES = {gguf.GGMLQuantizationType.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0,
              gguf.GGMLQuantizationType.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1,
              gguf.GGMLQuantizationType.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
              gguf.GGMLQuantizationType.F16: gguf.LlamaFileType.MOSTLY_F16,
              gguf.GGMLQuantizationType.BF16: gguf.LlamaFileType.MOSTLY_BF16,
              gguf.GGMLQuantizationType.F32: gguf.LlamaFileType.ALL_F32}


def check_architecture(config) -> tuple[gguf.MODEL_ARCH, bool]:
    """GGUF architecture of a transformers config; `ExportError` naming the supported ones otherwise."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ExportError(f"GGUF export supports the model types {', '.join(ARCHITECTURES)} (Llama/SmolLM2, Mistral, "
                          f"Qwen2); this model is {model_type!r}.")
    rope = getattr(config, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", "default") if isinstance(rope, dict) else "default"
    if rope_type != "default":
        raise ExportError(f"rope scaling {rope_type!r} is not written by the GGUF exporter yet; supported: the default "
                          "rotary embedding.")
    return ARCHITECTURES[model_type]


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def layer_shapes(model) -> dict[str, list[int]]:
    """Per decoder layer: MLP width and query / key-value head counts, read from the layers themselves (structured
    pruning with `uniform=False` leaves them different from the config's, and from layer to layer)."""
    head_dim, shapes = head_dim_of(model.config), {"ffn": [], "q_proj": [], "k_proj": []}
    for layer in model.model.layers:
        shapes["ffn"].append(layer.mlp.up_proj.out_features)
        shapes["q_proj"].append(layer.self_attn.q_proj.out_features // head_dim)
        shapes["k_proj"].append(layer.self_attn.k_proj.out_features // head_dim)
    return shapes


def check_uniform(shapes: dict[str, list[int]]) -> None:
    """llama.cpp's llama/qwen2 graphs take one MLP width and one head count for every layer."""
    uneven = [kind for kind, values in shapes.items() if len(set(values)) > 1]
    if uneven:
        widths = "; ".join(f"{k}: {shapes[k]}" for k in uneven)
        raise ExportError(f"The layers differ in width ({widths}), which llama.cpp cannot load: prune with "
                          "uniform=True (the same width in every layer).")


def _add_hparams(writer: gguf.GGUFWriter, config, shapes: dict[str, list[int]]) -> None:
    head_dim = head_dim_of(config)
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_name("model")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(shapes["ffn"][0])
    writer.add_head_count(shapes["q_proj"][0])
    writer.add_head_count_kv(shapes["k_proj"][0])
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    if head_dim * shapes["q_proj"][0] != config.hidden_size:  # e.g. attention groups pruned
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


def _encode(name: str, module: nn.Module, permute_heads: int | None, requantize: bool) -> gt.Encoded:
    weight = weight_of(module)
    if permute_heads:
        weight = gt.permute_weight(weight, permute_heads)
    if not weight.quantized:
        return gt.encode_float(weight.dense)
    if isinstance(module, (QuantEmbedding, QuantHead)):  # int8 rows, float32 row scale rounded to fp16
        if weight.shape[1] % gt.BLOCK:
            raise ExportError(f"{name}: {weight.shape[1]} columns is not a multiple of 32 (GGUF's Q8_0 block).")
        return gt.encode_codes(weight, gguf.GGMLQuantizationType.Q8_0)
    return gt.encode_weight(weight, requantize, name)


def gguf_tensors(model, requantize: bool) -> list[tuple[str, gt.Encoded]]:
    """`(gguf name, encoded tensor)` for every parameter of a supported decoder; `ExportError` for anything else."""
    config = model.config
    arch, permute = check_architecture(config)
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    shapes = layer_shapes(model)
    check_uniform(shapes)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    out, handled = [], set()
    modules = list(model.named_modules())
    for name, module in tqdm(modules, desc="GGUF tensors", leave=False):
        is_weight = isinstance(module, WEIGHT_MODULES)
        if not is_weight and not (name.endswith("norm") and isinstance(getattr(module, "weight", None), nn.Parameter)):
            continue
        handled.add(name)
        if tied and is_weight and module is model.get_output_embeddings():
            continue
        target = names.get_name(name + ".weight", try_suffixes=(".weight",))
        if target is None:
            raise ExportError(f"{name} ({type(module).__name__}) has no place in a GGUF {arch.name.lower()} model.")
        kind = name.rsplit(".", 1)[-1]
        n_head = shapes[kind][int(target.split(".")[1])] if permute and kind in ("q_proj", "k_proj") else None
        out.append((target, _encode(name, module, n_head, requantize) if is_weight
                    else gt.encode_float(module.weight, force_f32=True)))
        bias = getattr(module, "bias", None)
        if is_weight and bias is not None:
            bias = gt.permute_rows(bias.detach(), n_head) if n_head else bias
            out.append((target[: -len("weight")] + "bias", gt.encode_float(bias, force_f32=True)))
    unknown = sorted({p.rsplit(".", 1)[0] for p, _ in model.named_parameters()} - handled)
    if unknown:
        raise ExportError(f"GGUF export does not know the layers {', '.join(unknown[:5])}; supported: Llama-family "
                          "decoder layers (attention, MLP, RMSNorm, embeddings, head).")
    return out


def write_gguf(model, tokenizer, out_dir: Path, *, requantize: bool = False) -> dict:
    """Write `model-<TYPE>.gguf` (TYPE: the type of most decoder linears) into `out_dir`; returns the summary:
    tensor types, the largest weight difference from ours, what was re-quantized, the tokenizer written."""
    arch, _ = check_architecture(model.config)  # named before any work
    tensors = gguf_tensors(model, requantize)
    types = Counter(enc.qtype.name for _, enc in tensors)
    linear = Counter(enc.qtype for name, enc in tensors if name.startswith("blk.") and enc.data.ndim == 2)
    main_type = linear.most_common(1)[0][0] if linear else gguf.GGMLQuantizationType.F32
    path = out_dir / f"model-{main_type.name}.gguf"
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[arch])
    _add_hparams(writer, model.config, layer_shapes(model))
    writer.add_file_type(FILE_TYPES.get(main_type, gguf.LlamaFileType.GUESSED))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    vocab = add_vocab(writer, tokenizer, model.config.vocab_size)
    for name, enc in tensors:
        writer.add_tensor(name, enc.data, raw_dtype=enc.qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=True)
    writer.close()
    requantized = sorted(name for name, enc in tensors if enc.requantized)
    return {"gguf_file": path.name, "architecture": gguf.MODEL_ARCH_NAMES[arch], "tensor_types": dict(types),
            "max_abs_weight_error": max((enc.max_abs_error for _, enc in tensors), default=0.0),
            "requantized_tensors": requantized, **vocab}
