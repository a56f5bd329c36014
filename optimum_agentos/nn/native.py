"""Native CPU paths that read the int8 / int4 codes where the packed kernels keep them (`csrc/native_cpu.cpp`).

- Few-token calls (`NativeInt8Rows`, `NativeInt4Blocks`): torch's packed kernels take bfloat16 activations, which
  CPUs without AVX512-BF16 or AMX (AVX2 laptops and desktops, many AVX-512 servers) convert in software. These loops
  convert the codes to float32 in registers and multiply them with the float32 activations: the reference path's
  numbers up to the order of the sums (tolerance 1e-5 of max |y|, as `dequant-t`), reading one byte (int8) or half a
  byte (int4) per weight. AVX-512 and AVX2 (+FMA) versions, and a portable one the compiler vectorises for anything
  else (NEON, SSE).
- Few tokens of int4 on CPUs with AVX512-VNNI and AVX512-VBMI (`NativeInt4Vnni`): the activations rounded as for long
  inputs (below), the int4 codes multiplied with them four inputs per instruction.
- Long inputs (`NativeInt8Activations`, `NativeInt4Activations`): float32 matmuls are bound by arithmetic there, and
  int8 x int8 products (`torch._int_mm`, oneDNN: VNNI, AMX) do several times more per instruction. The activations
  are rounded to int8 per token together with their rounding error on a finer grid (about 16 bits), the few largest
  channels stay in float32; the rounding and the conversion back to float32 are native loops.

The extension is compiled once per machine with the C++ compiler torch.utils.cpp_extension finds (`-O3
-march=native`, or `OPTIMUM_AGENTOS_NATIVE_ARCH`), into `OPTIMUM_AGENTOS_NATIVE_DIR` (default
`~/.cache/optimum_agentos/native`), under a name that hashes the source, the compiler flags, the torch and Python
versions and the CPU's model and flags (a library built for one CPU is never loaded on another); later loads only
load it. Without a compiler (or with `OPTIMUM_AGENTOS_NATIVE=0`) the paths are unavailable, the load log says why,
and the measured dispatch (`dispatch`) picks among the others. Which calls they serve is measured like every other
path.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch
from transformers.utils import logging


logger = logging.get_logger(__name__)

ENV = "OPTIMUM_AGENTOS_NATIVE"  # "0" turns the native paths off
DIR_ENV = "OPTIMUM_AGENTOS_NATIVE_DIR"  # where the compiled library is kept
INT8_ACTIVATIONS_ENV = "OPTIMUM_AGENTOS_INT8_ACTIVATIONS"  # "0" refuses the paths rounding activations to int8
SOURCE = Path(__file__).parent / "csrc" / "native_cpu.cpp"
ARCH_ENV = "OPTIMUM_AGENTOS_NATIVE_ARCH"  # the -march target (default "native"; tests build x86-64-v3 = AVX2 too)
LDFLAGS = ("-fopenmp",)  # at::parallel_for runs on torch's OpenMP threads
FLOAT_CHANNELS = 8  # input channels the int8-activation paths multiply in float32: those with the largest |x|
MAX_TOKENS = 64  # timed (and chosen) up to this many tokens: they read each weight once per 4 tokens, no blocking
STALE_LOCK_S = 600  # a build lock older than this was left by a build that died
FAILED = "build-failed.txt"  # written where a build failed, with the reason


def _cpu_signature() -> str:
    """The CPU's model and feature flags (a library built with -march=native must not run on another CPU)."""
    try:
        with open("/proc/cpuinfo") as info:
            lines = [line for line in info if line.startswith(("model name", "flags", "Features", "CPU part"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() + platform.machine()


def cflags() -> list[str]:
    return ["-O3", f"-march={os.environ.get(ARCH_ENV) or 'native'}", "-fopenmp"]


def build_dir() -> Path:
    folder = os.environ.get(DIR_ENV) or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / \
        "optimum_agentos" / "native"
    key = "\n".join([SOURCE.read_text(), " ".join(cflags() + list(LDFLAGS)), torch.__version__, sys.version,
                     _cpu_signature()])
    return Path(folder) / hashlib.sha256(key.encode()).hexdigest()[:16]


def _path_with_ninja() -> str:
    """PATH for the build: torch builds with ninja, and the `ninja` wheel's binary is not on PATH unless its
    environment is activated."""
    path = os.environ.get("PATH", "")
    if shutil.which("ninja"):
        return path
    try:
        import ninja
    except ImportError:
        return path
    return ninja.BIN_DIR + os.pathsep + path


@functools.cache
def library() -> tuple[bool, str | None]:
    """`(True, None)` once the library is loaded in this process, else `(False, why)`. Builds it on first use."""
    if os.environ.get(ENV, "1") == "0":
        return False, f"{ENV}=0"
    if not torch.backends.cpu.get_cpu_capability() or sys.platform == "win32":
        return False, "not supported on this platform"
    folder = build_dir()
    name = f"agentos_native_{folder.name}"
    built, failed = folder / f"{name}.so", folder / FAILED
    if not built.exists() and failed.exists():  # tried on this machine before: loads do not pay a failing build
        return False, f"{failed.read_text().strip()} (delete {failed} to try again)"
    try:
        if not built.exists():
            from torch.utils import cpp_extension

            folder.mkdir(parents=True, exist_ok=True)
            lock = folder / "lock"  # torch's build lock: another process is building, or a build was killed
            if lock.exists() and time.time() - lock.stat().st_mtime > STALE_LOCK_S:
                # never deleted here (we cannot tell who wrote it): waiting on it would hang every load
                return False, (f"native kernels unavailable (a build lock older than {STALE_LOCK_S} s is in "
                               f"{folder}: a build was killed; delete {lock} to build again)")
            logger.warning(f"Compiling optimum-agentos' native CPU kernels for this machine into {folder} (once; "
                           f"about 20 s; {ENV}=0 skips them).")
            start, path = time.perf_counter(), os.environ.get("PATH")
            os.environ["PATH"] = _path_with_ninja()  # for the build only
            try:
                cpp_extension.load(name, [str(SOURCE)], extra_cflags=cflags(), extra_ldflags=list(LDFLAGS),
                                   build_directory=str(folder), is_python_module=False, verbose=False)
            finally:
                if path is None:
                    os.environ.pop("PATH", None)
                else:
                    os.environ["PATH"] = path
            logger.info(f"Native CPU kernels compiled in {time.perf_counter() - start:.1f} s.")
        else:
            torch.ops.load_library(str(built))
    except Exception as error:  # no compiler, no ninja, a compile error: the other paths serve every call
        lines = str(error).strip().splitlines()
        why = next((line for line in lines if "error:" in line), lines[-1] if lines else "")  # the compiler's first
        reason = f"native kernels unavailable ({type(error).__name__}: {why.strip()})"
        logger.warning(f"{reason}; the packed and dequant paths serve every call. {ENV}=0 skips the attempt.")
        try:
            folder.mkdir(parents=True, exist_ok=True)
            failed.write_text(reason + "\n")
        except OSError:
            pass
        return False, reason
    return True, None


def unavailable() -> str | None:
    return library()[1]


class _Ops:
    """The library's operators as resolved overloads (`.default`), looked up once: calling
    `torch.ops.agentos_native.<name>(...)` resolves the overload at every call, microseconds that count at one
    token."""

    def __getattr__(self, name: str):
        op = getattr(torch.ops.agentos_native, name).default
        setattr(self, name, op)
        return op


OPS = _Ops()


def _tensors(layer) -> dict:
    """A layer's buffers by name without `nn.Module.__getattr__` (a `FusedGroup` keeps them as plain attributes)."""
    attributes = layer.__dict__
    return attributes.get("_buffers", attributes)


def _bias(layer) -> torch.Tensor | None:
    """The layer's bias (any dtype: the ops convert it) without `nn.Module.__getattr__`."""
    return layer.__dict__.get("_parameters", layer.__dict__).get("bias")


def _int8_rows(layer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """`(codes [N, K] int8, float32 row scales, zero-point share or None)` of an int8 row layout (`NativeInt8Rows`)."""
    tensors = _tensors(layer)
    if "kernel_row_scales" in tensors:
        return tensors["kernel_weight"], tensors["kernel_row_scales"], tensors.get("kernel_zero_term")
    return layer.weight, layer.weight_scale.reshape(-1).float(), None


class NativeInt8Rows:
    """int8 with one scale per output row: the int8 kernel's `q - 128` rows (`QuantLinear`) or a `QuantHead`'s
    symmetric rows, times float32 activations."""

    name = "native-int8"
    tolerance = 1e-5  # float32 throughout: only the rounding order differs from the reference
    max_tokens = MAX_TOKENS

    @staticmethod
    def unsupported(layer) -> str | None:
        if layer.weight.device.type != "cpu":
            return f"device {layer.weight.device.type}"
        if hasattr(layer, "weight_zero"):  # QuantLinear
            if getattr(layer.kernel, "name", None) != "int8pack-bf16":
                return "no int8 row layout (int8pack kernel)"
        elif layer.weight.dtype != torch.int8:
            return "not int8 rows"
        return unavailable()

    @staticmethod
    def run(layer, x: torch.Tensor) -> torch.Tensor:
        return OPS.int8_rows_matmul(x, *_int8_rows(layer), _bias(layer))


class NativeInt4Blocks:
    """int4 in the int4 kernel's 64-row blocks of nibble pairs, with the stored groups' float32 scales and shifts."""

    name = "native-int4"
    tolerance = 1e-5
    max_tokens = MAX_TOKENS

    @staticmethod
    def unsupported(layer) -> str | None:
        if getattr(layer.kernel, "name", None) != "int4pack-bf16" or not getattr(layer, "int4_layout_known", False):
            return "no int4 block layout (int4pack kernel with a known layout)"
        return unavailable()

    @staticmethod
    def run(layer, x: torch.Tensor) -> torch.Tensor:
        tensors = _tensors(layer)
        return OPS.int4_blocks_matmul(x, tensors["kernel_weight"], tensors["kernel_group_scales"],
                                      tensors["kernel_group_shifts"], layer.kernel_stored_group, _bias(layer))


def _int8_activations_refused() -> str | None:
    return f"{INT8_ACTIVATIONS_ENV}=0" if os.environ.get(INT8_ACTIVATIONS_ENV, "1") == "0" else None


def _int_mm_unsupported() -> str | None:
    return _int8_activations_refused() or (None if hasattr(torch, "_int_mm") else
                                           "this torch build has no torch._int_mm")


def _vnni_refused() -> str | None:
    """Why `NativeInt4Vnni` cannot run in this process, whatever the layer (None when it can)."""
    return _int8_activations_refused() or _vnni_unbuilt()


@functools.cache
def _vnni_unbuilt() -> str | None:
    """Why the library has no VNNI int4 loop (built for a CPU without AVX512-VNNI and AVX512-VBMI), or None."""
    if unavailable():
        return unavailable()
    return None if OPS.vnni_int4() else "the CPU has no AVX512-VNNI with AVX512-VBMI"


class NativeInt8Activations:
    """int8 rows times the activations rounded to int8 per token, for long inputs: float32 matmuls are bound by
    arithmetic there, and int8 x int8 (`torch._int_mm`: oneDNN's VNNI / AMX kernels) multiplies several times faster
    per instruction. Reads the rows `NativeInt8Rows` reads (no new copy).

    Each token gets one symmetric grid plus a second, 254 times finer one for its rounding error
    (`int8_rows_act_matmul` in `csrc/native_cpu.cpp`): the activations are kept to about 16 bits (within 1/508 of
    the token's largest |x|), so the outputs are the weight-only model's to about 1e-4 of max |y| (bfloat16
    activations are off by about 1e-3), at the price of a matmul over twice the tokens."""

    name = "native-int8-act"
    tolerance = 1e-4

    @staticmethod
    def unsupported(layer) -> str | None:
        return _int_mm_unsupported() or NativeInt8Rows.unsupported(layer)

    @staticmethod
    def run(layer, x: torch.Tensor) -> torch.Tensor:
        return OPS.int8_rows_act_matmul(x, *_int8_rows(layer), _bias(layer), FLOAT_CHANNELS)


class NativeInt4Activations:
    """int4 for long inputs: the layer's weights rounded onto one int8 grid per row at each call
    (`int4_blocks_act_matmul`, from the int4 kernel's blocks into scratch memory: no second copy kept), then
    `NativeInt8Activations`' int8 x int8 matmul. That rounding moves each weight by at most half of 1/127 of its
    row's largest |w| (a seventeenth of an int4 step or less), about 1e-2 of max |y| on random layers: its bound is
    2e-2 (on SmolLM2 int4 g128, WikiText-2 perplexity 50.87 -> 51.06)."""

    name = "native-int4-act"
    tolerance = 2e-2

    @staticmethod
    def unsupported(layer) -> str | None:
        return _int_mm_unsupported() or NativeInt4Blocks.unsupported(layer)

    @staticmethod
    def run(layer, x: torch.Tensor) -> torch.Tensor:
        tensors = _tensors(layer)
        return OPS.int4_blocks_act_matmul(x, tensors["kernel_weight"], tensors["kernel_group_scales"],
                                          tensors["kernel_group_shifts"], tensors["kernel_int8_scale"],
                                          layer.kernel_stored_group, _bias(layer), FLOAT_CHANNELS)


class NativeInt4Vnni:
    """int4 for few tokens through int8 activations: the blocks `NativeInt4Blocks` reads, times the activations on
    `NativeInt8Activations`' grids (codes and residual, the `FLOAT_CHANNELS` largest channels in float32), with
    AVX512-VNNI's int8 dot products (`int4_blocks_vnni_matmul`), four inputs per instruction where the float32 loop
    converts and multiplies one. The weights are exact, so the error is the activations' rounding alone: within
    1/508 of the token's largest |x| per input, times sum_k |w[n, k]| per output. Against max |y| that depends on
    the weights: on the dispatch's random input, three of SmolLM2's four int4 g128 layer shapes came out at 1.3e-4
    to 2.0e-4, so its bound is 1e-3 (bfloat16 activations: about 1e-2). Built where the CPU has AVX512-VNNI and
    AVX512-VBMI (Ice Lake, Sapphire Rapids, Zen 4 and later); the measured dispatch decides where it serves."""

    name = "native-int4-vnni"
    tolerance = 1e-3
    max_tokens = MAX_TOKENS

    @staticmethod
    def unsupported(layer) -> str | None:
        return NativeInt4Blocks.unsupported(layer) or _vnni_refused()

    @staticmethod
    def run(layer, x: torch.Tensor) -> torch.Tensor:
        tensors = _tensors(layer)
        return OPS.int4_blocks_vnni_matmul(x, tensors["kernel_weight"], tensors["kernel_group_scales"],
                                           tensors["kernel_group_shifts"], layer.kernel_stored_group, _bias(layer),
                                           FLOAT_CHANNELS)


class NativeBF16Copy:
    """A float output head's bfloat16 copy (`float_head.FloatHead`) times float32 activations, for few tokens: half
    the float32 weight's bytes, and, unlike `bf16-copy`, no rounding of the activations nor software bf16 matmul on
    CPUs without AVX512-BF16."""

    name = "native-bf16-copy"
    tolerance = 1e-2  # of max |y|, as `bf16-copy`: the weights rounded to bfloat16
    max_tokens = MAX_TOKENS

    @staticmethod
    def unsupported(head) -> str | None:
        return unavailable()

    @staticmethod
    def run(head, x: torch.Tensor) -> torch.Tensor:
        return OPS.bf16_rows_matmul(x, head.bf16_weight(), head.bias)


# float32 activations, or int8 ones for few tokens: what a fused sibling group can run
FEW_TOKEN_PATHS = (NativeInt8Rows, NativeInt4Blocks, NativeInt4Vnni)
ACTIVATION_PATHS = (NativeInt8Activations, NativeInt4Activations)
PATHS = (*FEW_TOKEN_PATHS, *ACTIVATION_PATHS)


def unavailable_paths() -> set[str]:
    """The native paths this process cannot take: all without the library (the float head's `NativeBF16Copy` too,
    which is not a layer candidate), those rounding activations to int8 when refused, the VNNI one where the library
    was built without it."""
    if unavailable():
        return {path.name for path in (*PATHS, NativeBF16Copy)}
    refused = {path.name for path in ACTIVATION_PATHS} if _int_mm_unsupported() else set()
    if _vnni_refused():
        refused.add(NativeInt4Vnni.name)
    return refused


# float32, built by `kernels.Int4PackKernel.prepare` for the native int4 paths
INT4_BUFFERS = ("kernel_group_scales", "kernel_group_shifts", "kernel_int8_scale")


def drop_unused(module) -> None:
    """Free the native int4 paths' float32 scales, shifts and int8 row scales where no token count chose them (8
    bytes per group and row, 4 per row)."""
    int4_paths = {NativeInt4Blocks.name, NativeInt4Activations.name, NativeInt4Vnni.name}
    if not any(name in int4_paths for _, name in getattr(module, "route_names", None) or ()):
        for buffer in INT4_BUFFERS:
            module._buffers.pop(buffer, None)
