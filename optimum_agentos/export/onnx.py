"""ONNX export: a graph ONNX Runtime runs on CPU and onnxruntime-genai's generation loop drives, every quantized
linear a `MatMulNBits` node holding our codes as they are (no re-quantization).

Route: the model is written once as a float transformers folder (our weights dequantized, exactly), the model
builder of onnxruntime-genai turns it into its graph (GroupQueryAttention with a KV cache, fused q/k/v, the
`genai_config.json` its runtime reads, the tokenizer files), and `onnx_graph` swaps each float `MatMul` of a
quantized layer for `MatMulNBits` from our codes (checked against the weight it replaces). Float layers stay
`MatMul`; int8 embeddings are gathered from their dequantized rows.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers.utils import logging

from ..formats.folder import scratch_directory
from ..nn import QuantEmbedding, QuantHead, QuantLinear, SparseLinear
from . import onnx_graph, onnx_nbits
from .onnx_nbits import NotExportableError, exact_block, layer_codes, not_exportable_message

logger = logging.get_logger(__name__)

# Decoder families the model builder exports and whose weight names `onnx_graph.builder_targets` maps back.
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
COMPRESSED = (QuantLinear, SparseLinear, QuantEmbedding, QuantHead)
BUILDER_PARTS = {"builder", "builder_config", "builders", "loaders", "quantization", "kv_cache_variant"}
# The build folder beside the output: named with our pid and holding the marker, so a later export removes those
# of killed runs (and nothing else).
BUILD_TAG, BUILD_MARKER = ".agentos-onnx-build-", ".agentos-onnx-build"
INSTALL_HINT = "pip install 'optimum-agentos[onnx]' (onnxruntime, onnxruntime-genai, onnx, onnx-ir)"


@torch.no_grad()
def write_onnx(model, tokenizer, out_dir: Path, *, requantize: bool = False, accuracy_level: int = 0) -> dict:
    """Write `model.onnx` (+ `model.onnx.data`), `genai_config.json` and the tokenizer files into `out_dir`.

    Args:
        model: a transformers causal LM (Llama, Mistral, Qwen2), loaded from an agentos checkpoint or float.
        tokenizer: its tokenizer (onnxruntime-genai tokenizes with the files written from it).
        out_dir (`pathlib.Path`): an existing, empty folder.
        requantize (`bool`, *optional*, defaults to `False`): re-encode, with round to nearest, the layers whose
            groups no `MatMulNBits` block holds exactly (group sizes below 16) instead of refusing them; the
            added relative weight error of each is reported.
        accuracy_level (`int`, *optional*, defaults to `0`): `MatMulNBits`' compute type; 0 multiplies in float32
            (matches our logits), 4 quantizes activations to int8 in ONNX Runtime (faster, not exact).

    It builds in a folder beside `out_dir`, removed when done; those of killed runs go at the next export.

    Returns a JSON-able summary: ops, `MatMulNBits` count, bits, block sizes, tensor count, re-encoded layers.
    """
    _require_packages()
    arch = type(model).__name__
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"ONNX export supports {', '.join(SUPPORTED_ARCHITECTURES)}; this model is {arch}.")
    if tokenizer is None:
        raise ValueError("ONNX export needs the model's tokenizer (onnxruntime-genai reads its files): save the "
                         "checkpoint with its tokenizer or pass one.")
    config = model.config
    head_size = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head_size % 16:
        raise ValueError(f"ONNX Runtime's GroupQueryAttention (CPU) needs a head size that is a multiple of 16; this "
                         f"model's is {head_size}.")
    plans, errors = plan_layers(model, requantize)
    out_dir = Path(out_dir)
    with scratch_directory(out_dir.parent, BUILD_TAG, BUILD_MARKER) as work:
        write_float_folder(model, tokenizer, work / "float")
        run_builder(work / "float", work / "built", work / "cache", fuse_qkv=_qkv_fusable(plans, model))
        graph = _load(work / "built" / "model.onnx")
        onnx_graph.swap_matmuls(graph, plans, accuracy_level)
        if isinstance(model.get_input_embeddings(), QuantEmbedding):  # tied int8 rows: gathered from the head's codes
            onnx_graph.gather_from_quantized_head(graph)
        onnx_graph.save(graph, out_dir / "model.onnx")
        for path in sorted((work / "built").iterdir()):
            if path.is_file() and path.name not in ("model.onnx", onnx_graph.DATA_FILE):
                shutil.copy2(path, out_dir / path.name)
    summary = {"format": "onnx", "architecture": arch, **onnx_graph.graph_summary(graph),
               "accuracy_level": accuracy_level, "requantized": errors,
               "added_error": max(errors.values()) if errors else None,
               "files": sorted(p.name for p in out_dir.iterdir()), "runtime": _versions()}
    activations = _config_value(model, "activations")
    if activations:
        summary["activations"] = "float"
        logger.warning(f"activations={activations!r} is not exported: ONNX Runtime multiplies the exact int8 weights "
                       "with float activations (accuracy_level=4 quantizes them to int8 its own way).")
    return summary


def plan_layers(model, requantize: bool) -> tuple[dict, dict]:
    """For every quantized linear layer: `(exported codes, MatMulNBits block, original codes)`; plus the added
    relative weight error of each re-encoded layer. Raises `NotExportableError` naming the first layer that has
    no exact form when `requantize` is False."""
    plans, errors = {}, {}
    for name, module in model.named_modules():
        if isinstance(module, QuantEmbedding):
            continue  # gathered from its dequantized rows
        layer = layer_codes(module)
        if layer is None:
            continue
        block = exact_block(layer.shape[1], layer.group_size)
        if block is not None:
            plans[name] = (layer, block, layer)
            continue
        if not requantize:
            raise NotExportableError(not_exportable_message(name, layer))
        new, errors[name] = onnx_nbits.requantize(layer)
        plans[name] = (new, exact_block(new.shape[1], new.group_size), layer)
    if errors:
        logger.warning(f"re-encoded {len(errors)} layers for ONNX, largest relative weight error "
                       f"{max(errors.values()):.3g}")
    return plans, errors


def write_float_folder(model, tokenizer, folder: Path) -> None:
    """A plain float32 transformers folder of `model`: compressed layers dequantized, no quantization_config."""
    folder.mkdir(parents=True)
    state = {}
    compressed = {}
    for name, module in model.named_modules():
        if isinstance(module, COMPRESSED):
            compressed[name] = module
    for key, tensor in model.state_dict().items():
        owner = key.rpartition(".")[0]
        if owner not in compressed and tensor.dtype.is_floating_point:
            state[key] = tensor.detach().float().clone().contiguous()
    for name, module in tqdm(compressed.items(), desc="dequantizing for ONNX", leave=False):
        state[f"{name}.weight"] = module.dequantize(torch.float32).contiguous()
        if getattr(module, "bias", None) is not None:
            state[f"{name}.bias"] = module.bias.detach().float().clone()
    from safetensors.torch import save_file

    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["dtype"] = "float32"
    config["architectures"] = [type(model).__name__]
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def run_builder(source: Path, output: Path, cache: Path, fuse_qkv: bool = True) -> None:
    """onnxruntime-genai's model builder on a float folder: fp32 graph for the CPU (its prints go to the debug log)."""
    args = ("agentos-export", str(source), str(output), "fp32", "cpu", str(cache))
    printed = io.StringIO()
    with _builder_imports(), contextlib.redirect_stdout(printed):
        from onnxruntime_genai.models.builder import create_model, parse_extra_options

        options = parse_extra_options(*args, [f"fuse_qkv={str(fuse_qkv).lower()}"])
        create_model(*args, **options)
    logger.debug(printed.getvalue())


@contextlib.contextmanager
def _builder_imports():
    """The builder imports its parts as top-level modules (`quantization`, `builders`, ...) from its own folder,
    which it appends to `sys.path`: a module of the same name earlier on the path (a script's folder, a test
    package) would win. Put its folder first while it runs, then give the caller's modules back."""
    import onnxruntime_genai.models as package

    root = os.path.dirname(package.__file__)
    own = lambda module: (getattr(module, "__file__", None) or "").startswith(root)
    saved = {name: module for name, module in sys.modules.items()
             if name.split(".")[0] in BUILDER_PARTS and not own(module)}
    for name in saved:
        del sys.modules[name]
    sys.path.insert(0, root)
    try:
        yield
    finally:
        sys.path.remove(root)
        sys.modules.update(saved)


def _qkv_fusable(plans: dict, model) -> bool:
    """The builder fuses q/k/v into one MatMul; fine when the three are all float or all quantized alike."""
    for name, module in model.named_modules():
        if name.endswith("self_attn") and hasattr(module, "q_proj"):
            kinds = {_kind(plans.get(f"{name}.{p}_proj")) for p in ("q", "k", "v")}
            if len(kinds) > 1:
                return False
    return True


def _kind(plan) -> tuple | None:
    if plan is None:
        return None
    layer, block, _ = plan
    return (4 if layer.bits <= 4 else 8, layer.group_size, block)


def _load(path: Path):
    import onnx

    return onnx.load(str(path), load_external_data=True)


def _config_value(model, key: str):
    config = getattr(model.config, "quantization_config", None)
    if config is None:
        return None
    return config.get(key) if isinstance(config, dict) else getattr(config, key, None)


def _require_packages() -> None:
    missing = []
    for module in ("onnx", "onnxruntime", "onnxruntime_genai", "onnx_ir"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise ImportError(f"ONNX export needs {', '.join(missing)}: {INSTALL_HINT}")


def _versions() -> dict:
    from importlib.metadata import version

    return {name: version(name) for name in ("onnxruntime", "onnxruntime-genai", "onnx")}
