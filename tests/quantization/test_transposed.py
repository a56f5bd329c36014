"""The transposed-codes path `dequant-t` (nn/transposed.py): its numbers, and a layout that exists only where a token
count chose it and follows the codes when they change. Which path is faster is never asserted."""

import json
import logging

import pytest
import torch

from optimum_agentos.nn import dequant, dispatch, transposed
from optimum_agentos.nn.kernels import Int4PackKernel, Int8PackKernel
from optimum_agentos.nn.prepare import prepare_kernels

from .test_dispatch import cache_dir, layer, reference  # noqa: F401  (cache_dir: an autouse fixture)


@pytest.mark.parametrize("bits, group_size, in_features, out_features, kernel", [
    (4, 128, 576, 192, Int4PackKernel),  # short last group (576 = 4 x 128 + 64)
    (4, 32, 256, 208, Int4PackKernel),
    (8, -1, 576, 192, Int8PackKernel),  # one group per row: scale and zero point applied to the output
    (3, 128, 576, 100, None),  # no packed kernel
    (2, 64, 128, 96, None),
    (4, 64, 128, 97, None),  # odd out_features: one code per byte
])
def test_matches_the_reference_to_float32_rounding(bits, group_size, in_features, out_features, kernel):
    module = layer(bits, group_size, in_features, out_features)
    if kernel is not None:
        kernel.prepare(module)
    module.kernel = kernel
    transposed.prepare(module)
    groups = module.weight_scale.shape[1]
    code_bytes = in_features * out_features // (2 if bits <= 4 and out_features % 2 == 0 else 1)  # nibble pairs
    assert transposed.layout_bytes(module) == code_bytes + 2 * groups * out_features * 4
    x = torch.randn(2, 37, in_features)
    with torch.no_grad():
        ref = reference(module, x)
        out = transposed.DequantTransposed.run(module, x)
    assert out.shape == ref.shape
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
    with torch.no_grad():  # bfloat16 activations: computed in float32, returned in bfloat16
        out16 = transposed.DequantTransposed.run(module, x.bfloat16())
    assert out16.dtype == torch.bfloat16
    assert (out16.float() - reference(module, x.bfloat16().float())).abs().max() <= 1e-2 * ref.abs().max()


def test_a_layer_larger_than_the_scratch_buffer_gets_no_layout(monkeypatch):
    module = layer()
    monkeypatch.setattr(dequant, "SCRATCH_ELEMENTS", 64 * 576)
    transposed.prepare(module)
    assert transposed.layout_bytes(module) == 0
    assert transposed.DequantTransposed.unsupported(module) == "larger than the scratch buffer"
    assert transposed.DequantTransposed not in dispatch.candidates(module, None)


def test_forced_path_keeps_the_layout_and_reports_its_memory(monkeypatch, caplog):
    monkeypatch.setenv("OPTIMUM_AGENTOS_KERNELS", "dequant-t")
    module = layer()
    with caplog.at_level(logging.INFO, logger="optimum_agentos"):
        prepare_kernels(torch.nn.Sequential(module))
    assert module.route_names == ((None, "dequant-t"),)
    size = transposed.layout_bytes(module)
    assert size == 576 * 192 // 2 + 2 * 5 * 192 * 4
    label = "transposed codes for dequant-t (OPTIMUM_AGENTOS_TRANSPOSED=0 saves them)"
    assert f"{label} {size / 2**20:.1f} MiB" in caplog.text
    x = torch.randn(1, 300, 576)
    with torch.no_grad():
        assert (module(x) - reference(module, x)).abs().max() <= 1e-5 * reference(module, x).abs().max()
    # new codes loaded into the prepared layer: the layout follows them
    other = layer(seed=5)
    module.load_state_dict(other.state_dict())
    with torch.no_grad():
        ref = reference(other, x)
        assert (module(x) - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert module.state_dict().keys() == other.state_dict().keys()  # the layout is never saved


def test_the_layout_is_dropped_where_no_token_count_chose_it(cache_dir, monkeypatch):
    first = layer()
    prepare_kernels(first)
    (path,) = cache_dir.glob("choices-*.json")
    data = json.loads(path.read_text())
    (key,) = data["choices"]
    assert "dequant-t" in data["choices"][key]["us"]["512"]  # it was measured with the others
    data["choices"][key]["routes"] = [[64, "int4pack-bf16"], [None, "dequant-exact"]]
    path.write_text(json.dumps(data))
    second = layer(seed=1)
    built = []
    with monkeypatch.context() as patch:
        patch.setattr(transposed, "prepare", built.append)
        prepare_kernels(second)
    assert built == [] and transposed.layout_bytes(second) == 0  # the cache said no: never built
    data["choices"][key]["routes"] = [[64, "int4pack-bf16"], [None, "dequant-t"]]
    path.write_text(json.dumps(data))
    third = layer(seed=2)
    prepare_kernels(third)
    assert transposed.layout_bytes(third) > 0
    x = torch.randn(1, 100, 576)
    with torch.no_grad():
        ref = reference(third, x)
        assert (third(x) - ref).abs().max() <= 1e-5 * ref.abs().max()
    prepare_kernels(third, policy="reference")  # no measured paths: no layout
    assert transposed.layout_bytes(third) == 0


def test_the_layout_can_be_turned_off(monkeypatch, cache_dir):
    monkeypatch.setenv("OPTIMUM_AGENTOS_TRANSPOSED", "0")
    module = layer()
    prepare_kernels(module)
    assert transposed.layout_bytes(module) == 0
    assert all(name != "dequant-t" for _, name in module.route_names)
    # a cached choice of dequant-t (measured while it was on): the fastest of the other measured paths instead
    (path,) = cache_dir.glob("choices-*.json")
    data = json.loads(path.read_text())
    (key,) = data["choices"]
    entry = data["choices"][key]
    entry["us"] = {tokens: {**row, "dequant-t": 0.1} for tokens, row in entry.get("us", {"512": {}}).items()}
    entry["routes"] = [[None, "dequant-t"]]
    path.write_text(json.dumps(data))
    other = layer(seed=3)
    prepare_kernels(other)
    assert transposed.layout_bytes(other) == 0
    expected = dispatch.routes_without(entry, {"dequant-t"})
    assert [list(r) for r in other.route_names] == expected and expected != [[None, "dequant-t"]]
    x = torch.randn(1, 100, 576)
    with torch.no_grad():
        ref = reference(other, x)
        assert (other(x) - ref).abs().max() <= 1e-2 * ref.abs().max()
