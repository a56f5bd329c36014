"""The native few-token paths (nn/native.py, nn/csrc/native_cpu.cpp): their numbers against the reference, the
layouts they read, their place in the measured dispatch, and what happens where they cannot be built. Which path is
faster is never asserted."""

import ast
import json
import platform
from pathlib import Path

import pytest
import torch

from optimum_agentos.nn import dequant, dispatch, native, transposed
from optimum_agentos.nn.embedding import QuantHead
from optimum_agentos.nn.kernels import Int4PackKernel, Int8PackKernel
from optimum_agentos.nn.prepare import prepare_kernels

from ..conftest import run_python
from .test_dispatch import cache_dir, layer, reference  # noqa: F401  (cache_dir: an autouse fixture)

pytestmark = pytest.mark.skipif(native.unavailable() is not None, reason=f"{native.unavailable()}")


@pytest.mark.parametrize("bits, group_size, in_features, out_features, sym", [
    (8, -1, 576, 192, False),  # asymmetric rows: the zero points' share is taken off per token
    (8, -1, 256, 320, True),
    (4, 128, 576, 192, False),  # short last group (576 = 4 x 128 + 64)
    (4, 32, 256, 128, False),
    (4, 64, 1536, 64, False),
])
@pytest.mark.parametrize("tokens", [1, 3, 4, 9])  # whole passes of 4 tokens and the rest
def test_matches_the_reference_to_float32_rounding(bits, group_size, in_features, out_features, sym, tokens):
    g = torch.Generator().manual_seed(tokens)
    module = layer(bits, group_size, in_features, out_features)
    if sym:
        module = type(module).from_float(torch.randn(out_features, in_features, generator=g) * 0.05, None, bits,
                                         group_size, sym=True)
    kernel = Int8PackKernel if bits == 8 else Int4PackKernel
    kernel.prepare(module)
    module.kernel = kernel
    path = native.NativeInt8Rows if bits == 8 else native.NativeInt4Blocks
    assert path.unsupported(module) is None
    x = torch.randn(2, tokens, in_features, generator=g) + 0.5  # a mean, so that the zero points' share matters
    with torch.no_grad():
        ref = reference(module, x)
        out = path.run(module, x)
        out16 = path.run(module, x.bfloat16())  # bfloat16 activations: computed in float32, returned in bfloat16
        strided = path.run(module, x.transpose(0, 1))  # a non-contiguous view: the op takes it as it is
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert strided.shape == (tokens, 2, out_features) and torch.equal(strided, out.transpose(0, 1))
    assert out16.dtype == torch.bfloat16
    assert (out16.float() - reference(module, x.bfloat16().float())).abs().max() <= 1e-2 * ref.abs().max()


@pytest.mark.parametrize("path, tokens", [(native.NativeInt8Rows, 5), (native.NativeInt8Activations, 70)])
def test_int8_output_head_rows(path, tokens):
    """The int8 head's symmetric rows (`QuantHead`): a few tokens in float32, long inputs through int8 activations."""
    torch.manual_seed(0)
    head = QuantHead.from_float(torch.nn.Linear(192, 1000, bias=False))
    assert path.unsupported(head) is None
    x = torch.randn(1, tokens, 192)
    with torch.no_grad():
        ref = torch.nn.functional.linear(x, head.dequantize())
        out = path.run(head, x)
    assert out.shape == ref.shape
    assert (out - ref).abs().max() <= path.tolerance * ref.abs().max()  # 1e-5 (float32 rows), 1e-4 (int8 act.)


def _int8_activation_layer(bits, sym, in_features, out_features, g):
    weight = torch.randn(out_features, in_features, generator=g) * 0.05
    module = type(layer()).from_float(weight, torch.randn(out_features, generator=g), bits, -1 if bits == 8 else 128,
                                      sym=sym)
    kernel = Int8PackKernel if bits == 8 else Int4PackKernel
    kernel.prepare(module)
    module.kernel = kernel
    return module


@pytest.mark.parametrize("path, bits, sym, in_features, out_features", [
    (native.NativeInt8Activations, 8, False, 576, 1536), (native.NativeInt8Activations, 8, True, 1536, 576),
    (native.NativeInt4Activations, 4, False, 576, 192), (native.NativeInt4Activations, 4, False, 1536, 128),
    (native.NativeInt4Vnni, 4, False, 576, 192), (native.NativeInt4Vnni, 4, False, 1536, 128)])
@pytest.mark.parametrize("tokens", [1, 2, 9, 300])  # VNNI: passes of 2 tokens and the rest
def test_int8_activation_paths_stay_within_their_rounding_bound(path, bits, sym, in_features, out_features, tokens):
    """Each output is off by at most what its roundings allow: the activations' residual grid (1/508 of the token's
    largest |x| outside the float32 channels) times sum_k |w[n, k]|, and for `native-int4-act` the weights' int8
    grid (half of 1/127 of the row's largest |w|) times sum_k |x_k|. The `FLOAT_CHANNELS` largest channels are
    multiplied in float32."""
    g = torch.Generator().manual_seed(tokens + bits)
    module = _int8_activation_layer(bits, sym, in_features, out_features, g)
    if path is native.NativeInt4Vnni and native._vnni_unbuilt():
        pytest.skip(native._vnni_unbuilt())
    assert path.unsupported(module) is None
    x = torch.randn(tokens, in_features, generator=g) + 0.5
    x[:, 7] *= 30  # an outlier channel: left out of the grids
    with torch.no_grad():
        ref = reference(module, x)
        out = path.run(module, x)
        out16 = path.run(module, x.bfloat16())
    weight = module.dequantize()
    inliers = torch.ones(in_features, dtype=torch.bool)
    inliers[x.abs().amax(dim=0).topk(native.FLOAT_CHANNELS).indices] = False
    assert not inliers[7]
    step = x[:, inliers].abs().amax(dim=1, keepdim=True) / 127
    bound = step / 508 * weight[:, inliers].abs().sum(dim=1)
    if path is native.NativeInt4Activations:
        row_step = weight.abs().amax(dim=1) / 127
        bound = bound + row_step / 2 * x.abs().sum(dim=1, keepdim=True)
    error = (out - ref).abs()
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert (error <= 1.01 * bound + 1e-5 * ref.abs().max()).all(), (error - bound).max()
    assert error.max() <= path.tolerance * ref.abs().max()
    assert out16.dtype == torch.bfloat16
    assert (out16.float() - reference(module, x.bfloat16().float())).abs().max() <= 1e-2 * ref.abs().max()
    if path is native.NativeInt4Vnni:  # a non-contiguous view: the op takes it as it is
        strided = path.run(module, x[None].transpose(0, 1))
        assert strided.shape == (tokens, 1, out_features) and torch.equal(strided[:, 0], out)


@pytest.mark.parametrize("bits, group_size, in_features, out_features", [
    (4, 128, 576, 192),  # short last group (576 = 4 x 128 + 64)
    (4, 32, 256, 128),
    (4, -1, 96, 64),  # one group per row
    (8, -1, 576, 192),  # the int8 kernel's rows (`q - 128`)
])
def test_dequant_paths_fill_their_buffer_with_the_references_numbers(bits, group_size, in_features, out_features,
                                                                     monkeypatch):
    """The native loops that fill the dequant paths' scratch buffer give `dequantize()`'s numbers bit for bit, whole
    and in chunks of rows (the output head's way), as the tensor operations they replace do."""
    module = layer(bits, group_size, in_features, out_features)
    prepare_kernels(module, policy="dequant-exact")
    # the layouts the native loops read (else `_fill` would take the tensor operations and this test prove nothing)
    assert dequant._int4_layout(module) if bits == 4 else module.kernel.name == "int8pack-bf16"
    assert dequant._native_fill(torch.empty(out_features, in_features))
    expected = module.dequantize(torch.float32)
    assert torch.equal(dequant.weight(module, torch.float32), expected)
    assert torch.equal(dequant.weight(module, torch.bfloat16), expected.to(torch.bfloat16))
    chunk = torch.empty(64, in_features)  # the last 64 rows (the int4 blocks' unit)
    dequant._fill(module, out_features - 64, out_features, chunk)
    assert torch.equal(chunk, expected[-64:])
    monkeypatch.setattr(dequant, "_native_fill", lambda out: False)
    assert torch.equal(dequant.weight(module, torch.float32), expected)


def test_int8_activation_grids_and_the_int4_weights_on_int8_grids():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 256, generator=g)
    x[2, 9] = 7.5  # channel 9 is left off the grids, with the next three largest
    codes, step, sums, channels = torch.ops.agentos_native.int8_tokens_quantize(x, 4, True)
    assert codes.shape == (10, 256) and codes.dtype == torch.int8
    assert channels.tolist() == x.abs().amax(dim=0).topk(4).indices.tolist() and channels[0] == 9
    assert (codes[:, channels] == 0).all() and codes.abs().max() <= 127
    inliers = x.clone()
    inliers[:, channels] = 0
    assert torch.allclose(step, inliers.abs().amax(dim=1) / 127)
    assert torch.allclose(sums, x.sum(dim=1), atol=1e-5)
    back = step[:, None] * (codes[:5].float() + codes[5:].float() / 254)
    assert ((back - inliers).abs() <= step[:, None] / 508 * 1.01).all()  # 1%: float32 rounding of x / step
    # int4 blocks onto one int8 grid per row: round(w / (max |w| / 127)), as [in, out]
    module = _int8_activation_layer(4, False, 576, 128, g)
    int8 = torch.ops.agentos_native.int4_blocks_to_int8(
        module.kernel_weight, module.kernel_group_scales, module.kernel_group_shifts, module.kernel_int8_scale, 576,
        module.kernel_stored_group)
    weight = module.dequantize()
    scaled = weight / (weight.abs().amax(dim=1, keepdim=True) / 127)
    assert int8.shape == (576, 128) and int8.dtype == torch.int8
    assert ((int8.t().float() - scaled).abs() <= 0.5 + 1e-4).all()


@pytest.mark.parametrize("bits", [8, 4])
def test_int8_activation_paths_trace_whole_for_torch_compile(bits):
    g = torch.Generator().manual_seed(1)
    module = _int8_activation_layer(bits, False, 256, 128, g)
    path = native.NativeInt8Activations if bits == 8 else native.NativeInt4Activations
    x = torch.randn(3, 40, 256, generator=g)
    torch._dynamo.reset()
    with torch.no_grad():
        compiled = torch.compile(lambda t: path.run(module, t), backend="aot_eager", fullgraph=True)
        assert torch.equal(compiled(x), path.run(module, x))  # static shapes (Meta implementations), no break
    torch._dynamo.reset()


def test_evicting_a_layer_from_the_caches_keeps_every_value():
    """The dispatch flushes a layer's tensors from the caches before each timed call (`dispatch.evict`): views at any
    offset, empty tensors and every buffer of a prepared layer come out with the same values."""
    t = torch.randn(1000)
    copy = t.clone()
    for view in (t, t[3:517], t[::7], t[:0], torch.empty(0)):
        torch.ops.agentos_native.evict(view)
    assert torch.equal(t, copy)
    module = _int8_activation_layer(8, False, 576, 192, torch.Generator().manual_seed(0))
    before = {name: b.clone() for name, b in module.named_buffers()}
    x = torch.randn(2, 576)
    with torch.no_grad():
        out = native.NativeInt8Rows.run(module, x)
        dispatch.evict(module)
        assert torch.equal(native.NativeInt8Rows.run(module, x), out)
    assert all(torch.equal(b, before[name]) for name, b in module.named_buffers())


def test_layers_without_the_layout_are_refused_with_the_reason():
    assert "int4pack" in native.NativeInt4Blocks.unsupported(layer(3, 128, 576, 192))
    module = layer(8, 128, 576, 192)  # grouped int8: no row layout
    assert "int8pack" in native.NativeInt8Rows.unsupported(module)
    assert native.NativeInt8Rows not in dispatch.candidates(module, None)


def test_measured_only_up_to_their_token_limit_and_chosen_by_the_dispatch(cache_dir):
    module = layer(4, 128, 576, 192)
    prepare_kernels(module)
    (path,) = cache_dir.glob("choices-*.json")
    (entry,) = json.loads(path.read_text())["choices"].values()
    for tokens, row in entry["us"].items():
        assert ("native-int4" in row) == (int(tokens) <= native.MAX_TOKENS), (tokens, row)
    # the float32 scales and shifts of the int4 path are kept only where a token count chose it
    chose = any(name in ("native-int4", "native-int4-act", "native-int4-vnni") for _, name in module.route_names)
    assert (getattr(module, "kernel_group_scales", None) is not None) == chose
    # wherever the measurement puts it, the layer computes within the native bound
    x = torch.randn(1, 2, 576)
    with torch.no_grad():
        ref = reference(module, x)
        assert (module(x) - ref).abs().max() <= 1e-2 * ref.abs().max()


def test_a_cached_native_choice_falls_back_when_the_library_is_unavailable(cache_dir, monkeypatch):
    first = layer(8, -1, 576, 192)
    prepare_kernels(first)
    (path,) = cache_dir.glob("choices-*.json")
    data = json.loads(path.read_text())
    (key,) = data["choices"]
    entry = data["choices"][key]
    entry["routes"] = [[4, "native-int8"], [None, "dequant-exact"]]
    # next fastest where native-int8 was fastest: dequant-t, whose layout the cached routes did not ask for
    entry["us"] = {tokens: {**row, "native-int8": 0.1, "dequant-t": 0.2} if "native-int8" in row else row
                   for tokens, row in entry["us"].items()}
    path.write_text(json.dumps(data))
    monkeypatch.setattr(native, "unavailable", lambda: "turned off for this test")
    second = layer(8, -1, 576, 192, seed=1)
    prepare_kernels(second)
    assert all(name != "native-int8" for _, name in second.route_names)
    expected = dispatch.routes_without(entry, {path.name for path in native.PATHS})
    assert [list(r) for r in second.route_names] == expected and expected[0][1] == "dequant-t"
    assert transposed.layout_bytes(second) > 0  # built for the fallback
    x = torch.randn(1, 1, 576)
    with torch.no_grad():
        ref = reference(second, x)
        assert (second(x) - ref).abs().max() <= 1e-2 * ref.abs().max()


def test_refused_int8_activations_fall_back_to_the_next_fastest_measured_path(cache_dir, monkeypatch):
    first = layer(8, -1, 576, 192)
    prepare_kernels(first)
    (path,) = cache_dir.glob("choices-*.json")
    data = json.loads(path.read_text())
    (entry,) = data["choices"].values()
    entry["us"] = {tokens: {**row, "native-int8-act": 0.1} for tokens, row in entry["us"].items()}
    entry["routes"] = [[None, "native-int8-act"]]  # as if measured fastest at every token count
    path.write_text(json.dumps(data))
    monkeypatch.setenv(native.INT8_ACTIVATIONS_ENV, "0")
    assert native.NativeInt8Activations.unsupported(first) == f"{native.INT8_ACTIVATIONS_ENV}=0"
    refused = {"native-int8-act", "native-int4-act", "native-int4-vnni"}  # every path rounding activations to int8
    assert native.unavailable_paths() == refused
    int4 = layer(4, 128, 576, 192)
    Int4PackKernel.prepare(int4)
    int4.kernel = Int4PackKernel
    # refused before the CPU is asked (where the int4 blocks themselves are unsupported, that reason comes first)
    assert native.NativeInt4Vnni.unsupported(int4) == (native.NativeInt4Blocks.unsupported(int4)
                                                       or f"{native.INT8_ACTIVATIONS_ENV}=0")
    second = layer(8, -1, 576, 192, seed=1)
    prepare_kernels(second)
    expected = dispatch.routes_without(entry, refused)
    assert [list(r) for r in second.route_names] == expected
    assert all(name != "native-int8-act" for _, name in second.route_names)
    monkeypatch.delenv(native.INT8_ACTIVATIONS_ENV)
    third = layer(8, -1, 576, 192, seed=2)
    prepare_kernels(third)
    assert [list(r) for r in third.route_names] == [[None, "native-int8-act"]]


def test_without_a_compiler_the_paths_are_unavailable_and_say_why(tmp_path):
    out = run_python("""
        import torch
        from optimum_agentos.nn import native, prepare
        ok, why = native.library()
        print("OK", ok)
        print("WHY", why)
        from optimum_agentos.nn.linear import QuantLinear
        module = QuantLinear.from_float(torch.randn(64, 128), None, 8, -1, sym=False)
        prepare.prepare_kernels(module)
        print("ROUTES", [name for _, name in module.route_names])
    """, env={native.DIR_ENV: str(tmp_path / "native"), "CXX": str(tmp_path / "no-such-compiler"),
              dispatch.CACHE_ENV: str(tmp_path / "kernels")})
    assert "OK False" in out and "WHY native kernels unavailable" in out
    routes = ast.literal_eval(out.split("ROUTES", 1)[1].strip())
    assert routes and set(routes) <= {"int8pack-bf16", "dequant-exact", "dequant-bf16", "dequant-t"}
    assert not list((tmp_path / "native").rglob("*.so"))
    # the next load on this machine does not try again (a failing build can take seconds), and says how to retry
    again = run_python("""
        from optimum_agentos.nn import native
        print(native.library())
    """, env={native.DIR_ENV: str(tmp_path / "native"), "CXX": str(tmp_path / "no-such-compiler")})
    assert "native kernels unavailable" in again and "build-failed.txt to try again" in again


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 targets")
@pytest.mark.parametrize("arch", ["x86-64-v3", "x86-64"])  # the AVX2 + FMA version, the portable one (SSE2)
def test_other_cpus_versions_compute_the_same_numbers(tmp_path, arch):
    """The versions other CPUs compile (chosen by the preprocessor from -march), built here with an older target."""
    flags = set(open("/proc/cpuinfo").read().split()) if Path("/proc/cpuinfo").exists() else set()
    if arch == "x86-64-v3" and not {"avx2", "fma", "bmi2", "movbe"} <= flags:
        pytest.skip("this CPU cannot run x86-64-v3 (AVX2, FMA) code")
    out = run_python("""
        import torch
        from optimum_agentos.nn import native
        from optimum_agentos.nn.kernels import Int4PackKernel, Int8PackKernel
        from optimum_agentos.nn.linear import QuantLinear
        assert native.library() == (True, None), native.library()
        g = torch.Generator().manual_seed(0)
        worst = 0.0
        for bits, group, k, n, kernel, path in [(8, -1, 584, 192, Int8PackKernel, native.NativeInt8Rows),
                                                (4, 128, 576, 128, Int4PackKernel, native.NativeInt4Blocks)]:
            layer = QuantLinear.from_float(torch.randn(n, k, generator=g) * 0.05, None, bits, group, sym=False)
            kernel.prepare(layer)
            layer.kernel = kernel
            for tokens in (1, 2, 5):
                x = torch.randn(tokens, k, generator=g) + 0.5
                ref = torch.nn.functional.linear(x.double(), layer.dequantize(torch.float64))
                worst = max(worst, ((path.run(layer, x).double() - ref).abs().max() / ref.abs().max()).item())
        print("WORST", worst)
    """, env={native.DIR_ENV: str(tmp_path / "native"), native.ARCH_ENV: arch})
    assert float(out.split("WORST")[1]) <= 1e-5


def test_a_lock_left_by_a_killed_build_is_reported_and_never_deleted(tmp_path):
    out = run_python("""
        import os, time
        from optimum_agentos.nn import native
        folder = native.build_dir()
        folder.mkdir(parents=True)
        lock = folder / "lock"
        lock.write_text("")
        old = time.time() - 2 * native.STALE_LOCK_S
        os.utime(lock, (old, old))
        print(native.library())
        print("LOCK", lock.exists())
    """, env={native.DIR_ENV: str(tmp_path / "native")})
    assert "a build was killed" in out and "LOCK True" in out
    assert not list((tmp_path / "native").rglob("*.so"))


def test_turned_off_by_the_environment(tmp_path):
    out = run_python("""
        from optimum_agentos.nn import native
        print(native.library())
    """, env={native.ENV: "0", native.DIR_ENV: str(tmp_path / "native")})
    assert "(False, 'OPTIMUM_AGENTOS_NATIVE=0')" in out
