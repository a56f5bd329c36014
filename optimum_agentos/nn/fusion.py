"""One kernel call for sibling layers that read the same input: q/k/v of an attention block, gate/up of an MLP.

At one decoded token a packed kernel call costs tens of microseconds whatever its size (Python, dispatch, waking
the threads), more than the bytes it reads for SmolLM2's layers; a Llama-style block makes seven such calls. At load
(`prepare.prepare_kernels`) the packed codes of each sibling group are concatenated along the output rows into one
buffer, and each layer's own kernel buffer becomes a view of its rows in it (no second copy of the codes; the int4
scales, a few KiB per layer, are copied). The first sibling called with an input runs the group's path (the packed
kernel, or the native path reading its layout, whichever the siblings' measured routes give their shortest calls)
once and keeps the others' outputs for that same input tensor (same object, same version); they return them. Any
other call (another input, an in-place change, `inference_mode` tensors without a version, autograd on, graphs
compiled other than by `compile_for_generation`, token counts beyond the group's path) computes the layer alone,
exactly as without fusion. The paths compute each output row from its own weight row, so the outputs are the same
numbers.

Siblings whose shortest calls chose different paths (SmolLM2 on an AVX-512 machine: q_proj the VNNI loop, the
narrower k_proj and v_proj the float32 one) are timed at one token at load, the group on each of their paths against
the members called alone (`dispatch.time_group`, cached with the layers' choices); the group is formed only where
one call wins, and then serves one-token calls.

Compiled graphs (`generation.compile_for_generation`, which marks the groups `in_graphs`) cannot keep outputs
between calls: each member calls the group's path on the same input and takes its rows, and the compile's graph pass
(`generation.SharedCalls`) merges those identical calls into one.
"""

from __future__ import annotations

import torch

from . import native
from .kernels import ALIGNMENT

SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
SEPARATE = "separate"  # a group's measured choice: its members compute alone


class FusedGroup:
    """The concatenated layout of sibling `QuantLinear` layers, shaped like one layer for the kernel's `run`."""

    def __init__(self, members: list, kernel):
        self.members, self.kernel = members, kernel
        self.run = members[0].routes[0][1]  # the path serving the shortest calls: the packed kernel or a native one
        self.in_features = members[0].in_features
        self.out_features = sum(m.out_features for m in members)
        self.sizes = [m.out_features for m in members]
        self.kernel_group = getattr(members[0], "kernel_group", None)
        weight = torch.cat([m.kernel_weight for m in members])
        self.kernel_weight = weight
        starts = [sum(self.sizes[:i]) for i in range(len(members))]
        views = [weight[start:start + m.out_features] for start, m in zip(starts, members)]
        # each layer's buffer becomes a view of its rows, unless the int8 kernel would read a view that does not
        # start on an aligned address (see `kernels.ALIGNMENT`); those layers keep their own copy of the codes
        if kernel.name == "int4pack-bf16" or all(v.data_ptr() % ALIGNMENT == 0 for v in views):
            for m, view in zip(members, views):
                m.register_buffer("kernel_weight", view, persistent=False)
        if kernel.name == "int4pack-bf16":
            self.kernel_scales = torch.cat([m.kernel_scales for m in members], dim=1)
            if getattr(members[0], "kernel_group_scales", None) is not None:  # `native-int4`
                self.kernel_group_scales = torch.cat([m.kernel_group_scales for m in members], dim=1)
                self.kernel_group_shifts = torch.cat([m.kernel_group_shifts for m in members], dim=1)
                self.kernel_stored_group = members[0].kernel_stored_group
        else:
            self.kernel_row_scales = torch.cat([m.kernel_row_scales for m in members])  # `native-int8`
            scales = torch.cat([m.kernel_scales for m in members])
            self.kernel_scales, start = scales, 0
            for m in members:
                m.register_buffer("kernel_scales", scales[start:start + m.out_features], persistent=False)
                start += m.out_features
            terms = [m.kernel_zero_term for m in members]
            self.kernel_zero_term = None if all(t is None for t in terms) else torch.cat(
                [torch.zeros(m.out_features) if t is None else t for m, t in zip(members, terms)])
        biases = [m.bias for m in members]
        self.bias = None if all(b is None for b in biases) else torch.cat(
            [torch.zeros(m.out_features, dtype=next(b for b in biases if b is not None).dtype) if b is None
             else b.detach() for m, b in zip(members, biases)])
        self.max_tokens = min(m.routes[0][0] for m in members)  # all siblings on the group's path up to here
        self.starts = dict(zip(members, starts))
        self.in_graphs = False  # set by `compile_for_generation`, whose graph pass merges the members' calls
        self._kept = (None, -1, {})

    def serve_one_token(self, path) -> None:
        """Compute one-token calls on `path` (measured for siblings whose shortest calls chose different paths)."""
        self.run, self.max_tokens = path.run, 1

    def traced_output(self, layer, x: torch.Tensor) -> torch.Tensor:
        """`layer`'s rows of the group's call on `x`, in a compiled graph: every member makes the same call, which the
        graph pass merges (`generation.SharedCalls`)."""
        start = self.starts[layer]
        return self.run(self, x)[..., start:start + layer.out_features]

    def output(self, layer, x: torch.Tensor) -> torch.Tensor | None:
        """`layer`'s output for `x`: kept from the group's call on this same input, or from a new group call that
        keeps the siblings' outputs; None where the layer must compute alone."""
        if x.is_inference():  # no version counter: an in-place change could not be seen
            return None
        source, version, outputs = self._kept
        if source is x and version == x._version and layer in outputs:
            return outputs.pop(layer)
        parts = self.run(self, x).split_with_sizes(self.sizes, dim=-1)  # (`Tensor.split` is Python)
        outputs = dict(zip(self.members, parts))
        mine = outputs.pop(layer)
        self._kept = (x, x._version, outputs)
        return mine

    def layout_bytes(self) -> int:
        """Bytes the group adds beside its members' views (int4 scales, zero-point terms, biases)."""
        extra = [getattr(self, n, None) for n in ("kernel_scales", "kernel_group_scales", "kernel_group_shifts")] \
            if self.kernel.name == "int4pack-bf16" else [getattr(self, n, None) for n in ("kernel_zero_term",
                                                                                         "kernel_row_scales")]
        return sum(t.numel() * t.element_size() for t in extra + [self.bias] if t is not None)


def _path(run):
    """The native few-token path (`native.FEW_TOKEN_PATHS`) whose `run` this is."""
    return next(path for path in native.FEW_TOKEN_PATHS if path.run is run)


def _fusable(members: list) -> bool:
    """Whether the siblings' codes can be concatenated: one packed kernel, the same inputs, each member's shortest
    calls on the packed kernel or a native path reading its layout, int4 groups alike."""
    first = members[0]
    kernel = first.kernel
    if getattr(kernel, "name", None) not in ("int4pack-bf16", "int8pack-bf16"):
        return False
    few_token_paths = (kernel.run, *(path.run for path in native.FEW_TOKEN_PATHS))
    for m in members:
        if m.kernel is not kernel or m.routes is None or m.in_features != first.in_features:
            return False
        if m.routes[0][1] not in few_token_paths:
            return False
        if kernel.name == "int4pack-bf16" and not (getattr(m, "int4_layout_known", False)
                                                     and m.kernel_group == first.kernel_group
                                                     and m.group_size == first.group_size):
            return False  # rows concatenate only in the known 64-row block layout, groups alike
    return True


def one_token_paths(members: list, accurate: list[set[str]]) -> list:
    """The native paths that may serve a group whose members' shortest calls chose different ones: those chosen by
    a member that every member passed the accuracy check with at one token (`accurate`) and whose tensors every
    member kept (`native.drop_unused`)."""
    chosen = {m.routes[0][1] for m in members if m.routes[0][1] is not m.kernel.run}
    paths = [_path(run) for run in chosen]
    # the native int4 paths read these float32 scales and shifts, freed where none of a layer's routes used them
    kept = all(getattr(m, buffer, None) is not None for m in members
               for buffer in ("kernel_group_scales", "kernel_group_shifts"))
    return [p for p in sorted(paths, key=lambda p: p.name) if all(p.name in names for names in accurate)
            and (kept or members[0].kernel.name != "int4pack-bf16")]


def fuse_siblings(model, choose=None) -> list[FusedGroup]:
    """Fuse every sibling group of `QuantLinear` layers on the same packed kernel (see the module docstring).
    `choose(group)`: the measured one-token choice (a path's name or `SEPARATE`) for siblings whose shortest calls
    chose different paths; without it they stay apart."""
    from .linear import QuantLinear

    groups = []
    for parent in model.modules():
        for names in SIBLINGS:
            members = [getattr(parent, n, None) for n in names]
            if not (all(isinstance(m, QuantLinear) for m in members) and _fusable(members)):
                continue
            group = FusedGroup(members, members[0].kernel)
            if any(m.routes[0][1] is not members[0].routes[0][1] for m in members):
                name = choose(group) if choose is not None else SEPARATE
                if name == SEPARATE:  # the members keep their views of the group's codes: the same bytes
                    continue
                group.serve_one_token(next(p for p in native.FEW_TOKEN_PATHS if p.name == name))
            for m in members:
                m.fused = group
            groups.append(group)
    return groups


def unfuse(model) -> None:
    """Forget every group (before the layers are prepared again); the layers' views keep their codes."""
    from .linear import QuantLinear

    for module in model.modules():
        if isinstance(module, QuantLinear) and module.fused is not None:
            for m in module.fused.members:
                m.fused = None
