"""torch's `_weight_int8pack_mm` crashes the process (SIGSEGV) on an int8 weight or a bf16 activation that does
not start on a 16-byte boundary. A weight mapped from the checkpoint file, a slice of a larger activation and a
fused group's rows can all start anywhere: the kernels must be handed aligned memory. Each case runs in a fresh
process, so a crash fails the test instead of killing the test run."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytestmark = pytest.mark.skipif(not hasattr(torch.ops.aten, "_weight_int8pack_mm"),
                                reason="this torch build has no _weight_int8pack_mm")

PRELUDE = """
import torch, torch.nn.functional as F
from optimum_agentos import QuantLinear
from optimum_agentos.nn.embedding import QuantHead
from optimum_agentos.nn.prepare import prepare_kernels

def unaligned(t, offset=8):
    # a copy of `t` whose data starts `offset` bytes past a 64-byte boundary
    flat = t.reshape(-1).view(torch.uint8)
    base = torch.empty(flat.numel() + 128, dtype=torch.uint8)
    start = (-base.data_ptr()) % 64 + offset
    out = base[start:start + flat.numel()]
    out.copy_(flat)
    out = out.view(t.dtype).view(t.shape)
    assert out.data_ptr() % 16 == offset % 16
    return out
"""


def run_fresh(body: str, tmp_path) -> str:
    code = PRELUDE + textwrap.dedent(body)
    env = dict(os.environ, OPTIMUM_AGENTOS_KERNEL_CACHE=str(tmp_path / "kernels"))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                            check=False)
    assert result.returncode == 0, f"exit {result.returncode} (-11: SIGSEGV)\n{result.stderr[-2000:]}"
    return result.stdout


def test_head_weight_at_an_unaligned_address_is_measured_and_runs(tmp_path):
    """The int8 head of an `embedding_bits=8` checkpoint is read as it is: at load it views the file, at any offset
    (the cold-cache load of SmolLM2 int4 e8 crashed here, in the accuracy check of the kernel measurement)."""
    out = run_fresh("""
        torch.manual_seed(0)
        head = QuantHead.from_float(torch.nn.Linear(192, 320, bias=False))
        head.weight.data = unaligned(head.weight.data)
        prepare_kernels(head)
        assert head.weight.data_ptr() % 64 == 0
        x = torch.randn(1, 7, 192)
        with torch.no_grad():
            exact = F.linear(x, head.dequantize())
            error = (head(x) - exact).abs().max() / exact.abs().max()
        assert head.kernel.name == "int8rows-bf16" and error < 1e-2, (head.kernel, error)
        print("ok")
    """, tmp_path)
    assert out.strip() == "ok"


def test_bf16_activation_slice_at_an_unaligned_address(tmp_path):
    """A bf16 model's activation can be a slice starting anywhere (e.g. the last position of a sequence)."""
    out = run_fresh("""
        from optimum_agentos.nn.kernels import Int8PackKernel
        g = torch.Generator().manual_seed(0)
        layer = QuantLinear.from_float(torch.randn(64, 32, generator=g), None, 8, -1, sym=True)
        Int8PackKernel.prepare(layer)
        layer.kernel = Int8PackKernel
        x = unaligned(torch.randn(3, 32, generator=g).to(torch.bfloat16), offset=2)
        with torch.no_grad():
            y = Int8PackKernel.run(layer, x).float()
            exact = F.linear(x.float(), layer.dequantize(torch.float32))
        assert (y - exact).abs().max() <= 1e-2 * exact.abs().max()
        print("ok")
    """, tmp_path)
    assert out.strip() == "ok"


def test_fused_int8_rows_at_unaligned_offsets_keep_their_own_codes(tmp_path):
    """q/k/v rows of 48 int8 inputs: k's rows start 480 bytes into the concatenated buffer (not a multiple of 64),
    so each layer keeps its own codes; alone or as a group, the same numbers."""
    out = run_fresh("""
        from optimum_agentos.nn.fusion import FusedGroup
        from optimum_agentos.nn.kernels import Int8PackKernel
        g = torch.Generator().manual_seed(0)
        layers = [QuantLinear.from_float(torch.randn(n, 48, generator=g), None, 8, -1, sym=True) for n in (10, 6, 6)]
        for layer in layers:
            Int8PackKernel.prepare(layer)
            layer.kernel, layer.routes = Int8PackKernel, ((16, Int8PackKernel.run), (float("inf"), None))
        group = FusedGroup(layers, Int8PackKernel)
        assert all(layer.kernel_weight.data_ptr() % 64 == 0 for layer in layers)
        x = torch.randn(2, 48, generator=g)
        with torch.no_grad():
            alone = [Int8PackKernel.run(layer, x) for layer in layers]
            together = Int8PackKernel.run(group, x)
        assert torch.equal(torch.cat(alone, dim=-1), together)
        print("ok")
    """, tmp_path)
    assert out.strip() == "ok"


@pytest.mark.parametrize("in_features", [20, 24, 40])
def test_int8_widths_the_kernel_gets_wrong_take_another_path(tmp_path, in_features):
    """`_weight_int8pack_mm` is wrong (or crashes) for input widths that are not a multiple of 16: such int8 layers
    and heads are not given it, and still compute their reference numbers."""
    out = run_fresh(f"""
        g = torch.Generator().manual_seed(0)
        layer = QuantLinear.from_float(torch.randn(64, {in_features}, generator=g), None, 8, -1, sym=True)
        head = QuantHead.from_float(torch.nn.Linear({in_features}, 96, bias=False))
        prepare_kernels(layer)
        prepare_kernels(head)
        assert layer.kernel is None or layer.kernel.name != "int8pack-bf16", layer.kernel
        assert head.kernel is None, head.kernel
        x = torch.randn(3, {in_features}, generator=g)
        with torch.no_grad():
            for module in (layer, head):
                exact = F.linear(x, module.dequantize(torch.float32))
                assert (module(x) - exact).abs().max() <= 1e-2 * exact.abs().max()
        print("ok")
    """, tmp_path)
    assert out.strip() == "ok"
