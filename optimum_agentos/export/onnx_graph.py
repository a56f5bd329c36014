"""Swap the float `MatMul` nodes of an onnxruntime-genai model-builder graph for `MatMulNBits` built from our codes.

The builder names a linear layer's weight `<module path>.MatMul.weight` (`[in, out]`, float), with `attn` for the
attention module and one fused `attn.qkv_proj` for q, k and v. Each node is matched back to our layers by that
name, and the float weight the builder wrote (our dequantized weight) is compared bit for bit with the codes about
to replace it: a wrong match cannot pass silently.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from .onnx_nbits import LayerCodes, matmul_nbits

DATA_FILE = "model.onnx.data"
_LAYER = re.compile(r"^(model\.layers\.\d+)\.(attn|mlp)\.(\w+)$")


def builder_targets(initializer: str) -> list[str] | None:
    """Our module names behind a builder weight name (`model.layers.0.attn.qkv_proj.MatMul.weight` -> the q, k, v
    projections of layer 0); None for a name that is no linear weight."""
    if not initializer.endswith(".MatMul.weight"):
        return None
    base = initializer[: -len(".MatMul.weight")]
    match = _LAYER.match(base)
    if match is None:
        return [base]
    layer, part, proj = match.groups()
    if part == "attn":
        part = "self_attn"
        if proj == "qkv_proj":
            return [f"{layer}.{part}.{p}_proj" for p in ("q", "k", "v")]
    return [f"{layer}.{part}.{proj}"]


def fuse_rows(layers: list[LayerCodes], blocks: list[int]) -> tuple[LayerCodes, int]:
    """Layers sharing inputs (q, k, v) stacked along the output rows: rows are independent in `MatMulNBits`, so
    the stack is exact when they share bits, group size and block."""
    if len(layers) == 1:
        return layers[0], blocks[0]
    keys = {(max(4, layer.bits), layer.group_size, block) for layer, block in zip(layers, blocks)}
    if len(keys) != 1:
        raise ValueError("fused layers need the same bits, group size and block; export them unfused")
    cat = lambda attr: torch.cat([getattr(layer, attr) for layer in layers], dim=0)
    first = layers[0]
    bits = max(layer.bits for layer in layers)
    return LayerCodes(cat("codes"), cat("scales").float(), cat("zeros"), bits, first.group_size), blocks[0]


def swap_matmuls(model, plans: dict, accuracy_level: int = 0) -> dict:
    """Replace, in the loaded ONNX `model` (an `onnx.ModelProto` with its weights), every `MatMul` whose weight
    belongs to a planned layer by a `MatMulNBits` node. `plans`: module name -> `(exported LayerCodes, block,
    original LayerCodes)`. Returns `{module name: node name}`; raises when a planned layer has no node."""
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    done: dict[str, str] = {}
    new_nodes = []
    for node in graph.node:
        targets = builder_targets(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if not targets or not any(t in plans for t in targets):
            new_nodes.append(node)
            continue
        missing = [t for t in targets if t not in plans]
        if missing:
            raise ValueError(f"{node.name} fuses quantized and float layers ({missing} are float)")
        layer, block = fuse_rows([plans[t][0] for t in targets], [plans[t][1] for t in targets])
        _check_same_weight(inits[node.input[1]], [plans[t][2] for t in targets], node.name)
        spec = matmul_nbits(layer, block)
        prefix = node.input[1][: -len(".weight")] + "NBits"
        inputs = [node.input[0]]
        for key in ("B", "scales", "zero_points"):
            if key in spec["tensors"]:
                graph.initializer.append(numpy_helper.from_array(spec["tensors"][key], f"{prefix}.{key}"))
                inputs.append(f"{prefix}.{key}")
        name = f"{node.name}NBits"
        new_nodes.append(helper.make_node("MatMulNBits", inputs, list(node.output), name=name, domain="com.microsoft",
                                          accuracy_level=accuracy_level, **spec["attrs"]))
        done.update({t: name for t in targets})
    unplaced = sorted(set(plans) - set(done))
    if unplaced:
        raise ValueError(f"the ONNX graph has no MatMul for the quantized layers {unplaced}")
    del graph.node[:]
    graph.node.extend(new_nodes)
    _drop_unused_initializers(graph)
    return done


def gather_from_quantized_head(model, head_weight: str = "lm_head.MatMul.weight") -> bool:
    """Tied embeddings: the builder gathers token rows from the transposed float head weight. When the head became
    an 8-bit `MatMulNBits`, gather them from its codes instead (`GatherBlockQuantized`, the same `(q - zero) *
    scale` per block), so the float copy leaves the file. Returns whether it did."""
    from onnx import helper, numpy_helper

    graph = model.graph
    nodes = list(graph.node)
    transpose = next((n for n in nodes if n.op_type == "Transpose" and n.input[0] == head_weight), None)
    gather = transpose and next((n for n in nodes if n.op_type == "Gather" and n.input[0] == transpose.output[0]), None)
    head = next((n for n in nodes if n.op_type == "MatMulNBits" and n.input[1].startswith("lm_head.")), None)
    if not (gather and head):
        return False
    attrs = {a.name: a.i for a in head.attribute if a.name in ("K", "N", "bits", "block_size")}
    if attrs["bits"] != 8:
        return False
    rows, blocks = attrs["N"], -(-attrs["K"] // attrs["block_size"])
    shapes = {"data": [rows, blocks * attrs["block_size"]], "blocks": [rows, blocks]}
    for key, shape in shapes.items():
        graph.initializer.append(numpy_helper.from_array(np.array(shape, dtype=np.int64), f"lm_head.gather.{key}"))
    new = []
    inputs = []
    for source, shape in zip(head.input[1:], ("data", "blocks", "blocks")):
        new.append(helper.make_node("Reshape", [source, f"lm_head.gather.{shape}"], [f"{source}.rows"]))
        inputs.append(f"{source}.rows")
    padded = shapes["data"][1] != attrs["K"]
    out = f"{gather.output[0]}.padded" if padded else gather.output[0]
    new.append(helper.make_node("GatherBlockQuantized", [inputs[0], gather.input[1], *inputs[1:]], [out],
                                name="/model/embed_tokens/GatherBlockQuantized", domain="com.microsoft", bits=8,
                                block_size=attrs["block_size"], gather_axis=0, quantize_axis=1))
    if padded:  # the codes of a padded last block: cut the rows back to K
        for key, value in (("starts", 0), ("ends", attrs["K"]), ("axes", -1)):
            graph.initializer.append(numpy_helper.from_array(np.array([value], dtype=np.int64), f"lm_head.gather.{key}"))
        new.append(helper.make_node("Slice", [out, "lm_head.gather.starts", "lm_head.gather.ends", "lm_head.gather.axes"],
                                    [gather.output[0]]))
    index = nodes.index(transpose)
    kept = [n for n in nodes if n is not transpose and n is not gather]
    del graph.node[:]
    graph.node.extend(kept[:index] + new + kept[index:])
    _drop_unused_initializers(graph)
    return True


def _check_same_weight(init, originals: list[LayerCodes], node: str) -> None:
    from onnx import numpy_helper

    expected = torch.cat([layer.dequantize() for layer in originals], dim=0).T.numpy()
    found = numpy_helper.to_array(init)
    if found.shape != expected.shape or not np.array_equal(found, expected):
        raise ValueError(f"{node}: the builder's weight is not the dequantized weight of the layers it was matched to")


def _drop_unused_initializers(graph) -> None:
    used = {name for node in graph.node for name in node.input} | {out.name for out in graph.output}
    keep = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def graph_summary(model) -> dict:
    """Op counts, the bits and block sizes of the `MatMulNBits` nodes and the number of stored tensors."""
    ops = Counter(node.op_type for node in model.graph.node)
    nbits = [node for node in model.graph.node if node.op_type == "MatMulNBits"]
    attr = lambda node, key: next(a.i for a in node.attribute if a.name == key)
    return {
        "ops": dict(sorted(ops.items())),
        "matmul_nbits": len(nbits),
        "float_matmuls": ops.get("MatMul", 0),
        "bits": sorted({attr(node, "bits") for node in nbits}),
        "block_sizes": sorted({attr(node, "block_size") for node in nbits}),
        "tensors": len(model.graph.initializer),
    }


def save(model, path: Path) -> None:
    """Save with every weight in one external data file next to the graph (the 2 GB protobuf limit)."""
    import onnx

    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=DATA_FILE,
                    size_threshold=1024)
    umask = os.umask(0)
    os.umask(umask)
    (path.parent / DATA_FILE).chmod(0o666 & ~umask)  # onnx creates it private; give it the usual file mode
