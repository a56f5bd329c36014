"""Measured kernel choice (nn/dispatch.py): the cache per machine, forced paths, the dequant paths' numerics, and
sparse layers computing dense. Only the mechanism is asserted, never which path is faster."""

import json
import logging
import threading
import time

import pytest
import torch
import torch.nn.functional as F

from optimum_agentos import QuantLinear, SparseLinear
from optimum_agentos.nn import dequant, dispatch, qmath
from optimum_agentos.nn.embedding import QuantHead
from optimum_agentos.nn.kernels import Int4PackKernel, Int8PackKernel
from optimum_agentos.nn.prepare import prepare_kernels

TOLERANCE = 1e-2  # bf16 paths, of the output's magnitude


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(dispatch.CACHE_ENV, str(tmp_path / "kernels"))
    monkeypatch.delenv("OPTIMUM_AGENTOS_KERNELS", raising=False)
    return tmp_path / "kernels"


def layer(bits=4, group_size=128, in_features=576, out_features=192, seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=g) * 0.05
    return QuantLinear.from_float(weight, torch.randn(out_features, generator=g), bits, group_size, sym=False)


def reference(module, x):
    return F.linear(x, module.dequantize(x.dtype), module.bias)


def test_two_loads_pick_the_same_paths_and_the_second_reads_the_cache(cache_dir):
    first = layer()
    prepare_kernels(first)
    files = list(cache_dir.glob("choices-*.json"))
    assert len(files) == 1
    data = json.loads(files[0].read_text())
    assert data["machine"] == dispatch.machine()
    (key,) = data["choices"]
    assert key.startswith("QuantLinear:192x576:b4:g128:weight-only:float32:int4pack-bf16")
    assert [list(r) for r in first.route_names] == data["choices"][key]["routes"]
    assert set(data["choices"][key]["us"]) == {str(b) for b in dispatch.BUCKETS}
    second = layer(seed=1)
    prepare_kernels(second)
    assert second.route_names == first.route_names
    # the cache is what decides: an edited choice is used as it is, without measuring again
    data["choices"][key]["routes"] = [[None, "dequant-exact"]]
    files[0].write_text(json.dumps(data))
    third = layer(seed=2)
    prepare_kernels(third)
    assert third.route_names == ((None, "dequant-exact"),)
    x = torch.randn(1, 3, 576)
    with torch.no_grad():
        assert torch.equal(third(x), reference(third, x))


def test_a_corrupt_cache_file_is_ignored_with_a_warning_and_rewritten(cache_dir, caplog):
    path = dispatch.cache_path()
    path.parent.mkdir(parents=True)
    for content in ("{not json", json.dumps({"format": 1, "choices": {"k": {"routes": [[None, "no-such-path"]]}}})):
        path.write_text(content)
        with caplog.at_level(logging.WARNING, logger="optimum_agentos"):
            prepare_kernels(layer())
        assert "Ignoring the kernel choice cache" in caplog.text
        caplog.clear()
        data = json.loads(path.read_text())
        assert dispatch._valid(data, {"int4pack-bf16", *(p.name for p in dispatch.OTHER_PATHS)})
        assert len(data["choices"]) == 1


def test_a_forced_path_is_honoured_where_it_fits(monkeypatch, cache_dir):
    monkeypatch.setenv("OPTIMUM_AGENTOS_KERNELS", "dequant-bf16")
    int4, int3 = layer(), layer(bits=3)
    assert prepare_kernels(int4) == {"": "int4pack-bf16"}
    prepare_kernels(int3)
    assert int4.route_names == int3.route_names == ((None, "dequant-bf16"),)
    monkeypatch.setenv("OPTIMUM_AGENTOS_KERNELS", "int8pack-bf16")  # does not fit int4: the exact reference
    prepare_kernels(int4)
    assert int4.route_names == ((None, "reference"),) and int4.routes is None
    x = torch.randn(1, 40, 576)
    with torch.no_grad():
        assert torch.equal(int4(x), reference(int4, x))
    assert not cache_dir.exists()  # forced paths measure nothing
    with pytest.raises(ValueError, match="Unknown kernel policy 'fastest'"):
        prepare_kernels(int4, policy="fastest")


class SleepingPath:
    """A path that takes `seconds` per call and counts its calls: timing policy without kernel noise."""

    def __init__(self, name: str, seconds: float):
        self.name, self.seconds, self.calls = name, seconds, 0

    def run(self, module, x):
        self.calls += 1
        time.sleep(self.seconds)


def test_long_paths_are_timed_once_and_close_calls_again(monkeypatch):
    """A slow path (the head's dequant paths) must not cut the quick ones' rounds to one: a single disturbed round
    once chose the int8 head's slower kernel. Paths within `CLOSE` of the fastest get `CONFIRM_REPEATS` more rounds."""
    monkeypatch.setattr(dispatch, "BUCKETS", (1,))
    long_path = SleepingPath("long", dispatch.LONG_CALL_S + 0.01)
    best, close, far = SleepingPath("best", 0.02), SleepingPath("close", 0.021), SleepingPath("far", 0.03)
    timings = dispatch.time_paths(layer(), [long_path, best, close, far], torch.float32)
    assert long_path.calls == 2  # warm-up, one timed call
    assert far.calls == 1 + dispatch.REPEATS
    assert best.calls == close.calls == 1 + dispatch.REPEATS + dispatch.CONFIRM_REPEATS
    assert min(timings[1], key=timings[1].get) == "best" and timings[1]["long"] >= 1e6 * dispatch.LONG_CALL_S


def test_scratch_made_in_inference_mode_serves_calls_outside_it(monkeypatch):
    """Perplexity runs in `inference_mode`, lm-eval and `generate` in `no_grad`: a scratch buffer first made in the
    former must serve the latter (an inference tensor refuses in-place writes outside inference mode)."""
    monkeypatch.setenv("OPTIMUM_AGENTOS_KERNELS", "dequant-exact")
    monkeypatch.setattr(dequant, "_local", threading.local())  # no buffer yet in this thread
    int4 = layer()
    prepare_kernels(int4)
    assert int4.route_names == ((None, "dequant-exact"),)
    x = torch.randn(1, 40, 576)
    with torch.inference_mode():
        first = int4(x)
    with torch.no_grad():
        assert torch.equal(int4(x), first)
        assert torch.equal(first, reference(int4, x))


@pytest.mark.parametrize("bits, group_size, in_features, out_features, kernel", [
    (4, 128, 576, 192, Int4PackKernel),  # the kernel's 64-row blocks, short last group (576 = 4 x 128 + 64)
    (4, 32, 256, 208, Int4PackKernel),  # 208 rows: a layout not unpacked, codes from `weight`
    (8, -1, 576, 192, Int8PackKernel),  # q - 128 rows
    (3, 128, 576, 100, None),  # no kernel: codes unpacked from `weight`
])
def test_dequant_paths_exact_and_within_tolerance(bits, group_size, in_features, out_features, kernel, monkeypatch):
    module = layer(bits, group_size, in_features, out_features)
    if kernel is not None:
        kernel.prepare(module)
    module.kernel = kernel
    expected = qmath.dequantize_codes(module.codes(), module.weight_scale, module.weight_zero, group_size)
    assert torch.equal(dequant.weight(module, torch.float32), expected)
    assert torch.equal(dequant.weight(module, torch.bfloat16), expected.bfloat16())
    monkeypatch.setattr(dequant, "SCRATCH_ELEMENTS", 64 * in_features)  # blocks of 64 rows, as for a large head
    x = torch.randn(2, 5, in_features)
    with torch.no_grad():
        ref = reference(module, x)
        assert torch.allclose(dequant.DequantExact.run(module, x), ref, rtol=1e-5, atol=1e-5)
        fast = dequant.DequantBF16.run(module, x)
        assert (fast - ref).abs().max() <= TOLERANCE * ref.abs().max()


def test_head_dequant_paths_in_blocks_of_rows(monkeypatch):
    torch.manual_seed(0)
    head = QuantHead.from_float(torch.nn.Linear(192, 320, bias=False))
    monkeypatch.setattr(dequant, "SCRATCH_ELEMENTS", 64 * 192)  # 5 blocks of 64 rows
    x = torch.randn(1, 7, 192)
    with torch.no_grad():
        exact = F.linear(x, head.dequantize())
        # float32 math like the whole-matrix product; BLAS may pick another kernel (another summation order) for a
        # block of 64 rows than for 320, so equal up to float32 rounding (bitwise on some CPUs, not on every one)
        assert torch.allclose(dequant.DequantExact.run(head, x), exact, rtol=1e-5, atol=1e-5)
        assert (dequant.DequantBF16.run(head, x) - exact).abs().max() <= TOLERANCE * exact.abs().max()
    assert dequant.scratch_elements(head) == 64 * 192


def _sparse(bits=None):
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(192, 576, generator=g)
    kept = torch.rand(192, 576, generator=g) > 0.5
    bias = torch.randn(192, generator=g)
    if bits is None:
        return SparseLinear.from_dense(weight * kept, kept, bias)
    codes, scales, zeros = qmath.quantize_rtn(weight * kept, bits, 128, False)
    return SparseLinear.from_codes(codes, scales, zeros, kept, bias, bits, 128)


@pytest.mark.parametrize("bits", [None, 4])
def test_sparse_layers_compute_dense_and_save_compressed(bits):
    module = _sparse(bits)
    state = {k: v.clone() for k, v in module.state_dict().items()}
    x = torch.randn(1, 9, 576)
    with torch.no_grad():
        ref = reference(module, x)
        assert prepare_kernels(module) == {"": "dense" if bits is None else "dense codes (int4pack-bf16)"}
        out = module(x)
    if bits is None:  # the dense copy in the model's dtype: the same numbers
        assert module.dense_weight.dtype == torch.float32 and torch.equal(out, ref)
    else:
        assert (out - ref).abs().max() <= TOLERANCE * ref.abs().max()
    assert module.state_dict().keys() == state.keys()
    assert all(torch.equal(module.state_dict()[k], v) for k, v in state.items())  # the format is unchanged
    other = _sparse(bits)
    other.weight_mask.data = other.weight_mask.data.flip(0)  # different values loaded into the prepared layer
    other.bias.data = other.bias.data + 1
    module.load_state_dict(other.state_dict())
    with torch.no_grad():
        ref = reference(module, x)
        out = module(x)
    assert (out - ref).abs().max() <= (0 if bits is None else TOLERANCE) * ref.abs().max()
    prepare_kernels(module, policy="reference")
    with torch.no_grad():
        assert torch.equal(module(x), ref)


def test_the_load_log_names_the_choices_their_source_and_the_memory(caplog):
    model = torch.nn.Sequential(layer(), _sparse())
    with caplog.at_level(logging.INFO, logger="optimum_agentos"):
        assert prepare_kernels(model) == {"0": "int4pack-bf16", "1": "dense"}
    text = caplog.text
    assert "Kernel choices (measured 1 layer signature(s) now" in text and "QuantLinear:192x576:b4:g128" in text
    dense_mib = 192 * 576 * 4 / 2**20
    assert f"sparse layers computing dense {dense_mib:.1f} MiB" in text and "kernel layouts" in text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="optimum_agentos"):
        prepare_kernels(torch.nn.Sequential(layer(seed=4)))
    assert "Kernel choices (read from the cache" in caplog.text
