"""AWQ (Lin et al. 2024): activation-aware per-input-channel scales, searched per group of layers sharing an input.

Input channels that carry large activations matter most to a layer's output; scaling their weight columns up by
`s_j` (and the input down by the same `s_j`, folded into the norm or linear layer producing it) gives them a finer
share of the rounding grid. Per group (q/k/v after `input_layernorm`, gate/up after `post_attention_layernorm`,
o_proj after v_proj when the shapes allow, down_proj after up_proj) AWQ tries `s = a^alpha` on a grid of alpha,
`a_j` the channel's activation magnitude, and keeps the alpha whose rounded layers reproduce their float outputs
best on the calibration data. The model stays an ordinary architecture computing the same float function.

Here the output error of a layer `W` rounded to `Q` is measured on all calibration tokens at once through the input
Hessian `H = 2/n X^T X`: `||(W - Q) X^T||^2 ~ tr((W - Q) H (W - Q)^T)`, and `a_j` is the RMS of input channel `j`
(`sqrt(H_jj / 2)`) in place of the paper's mean absolute value. AWQ's range (clip) search, for round to nearest,
picks each group's range by the same output error restricted to the group's own columns.
"""

from __future__ import annotations

import torch
from torch import nn

from ..calibration.runner import find_blocks
from ..nn.qmath import compute_qparams, effective_group_size
from .smoothquant import LLAMA_GROUPS, apply_scales, find_groups


GRID = 20  # alphas 0, 1/20, ..., 19/20 as in AWQ
CLIP_GRID, CLIP_MAX_SHRINK = 20, 0.5  # ranges shrunk by up to 50% in 20 steps, as AWQ's clip search
MAX_RELATIVE_CHANGE = 1e-4  # float outputs after folding random scales, relative to their maximum


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """`w` `[out, in]` as `[out, groups, group_size]` in float32, a short last group padded with zeros (which leave
    min/max ranges, anchored at 0, unchanged)."""
    out_features, in_features = w.shape
    gs = effective_group_size(in_features, group_size)
    groups = -(-in_features // gs)
    return nn.functional.pad(w.float(), (0, groups * gs - in_features)).view(out_features, groups, gs)


def _rounded(w: torch.Tensor, wmin: torch.Tensor, wmax: torch.Tensor, bits: int, sym: bool,
             scale_dtype: torch.dtype | None = None):
    """Quantize-dequantize grouped `w` `[out, groups, gs]` on the ranges `[wmin, wmax]` `[out, groups]`; also returns
    `(scale, zero)`. `scale_dtype` rounds the scale as the checkpoint stores it."""
    scale, zero = compute_qparams(torch.stack([wmin, wmax], dim=-1).reshape(-1, 2), bits, sym)
    scale, zero = scale.view_as(wmin), zero.view_as(wmin)
    if scale_dtype is not None:
        scale = scale.to(scale_dtype).float()
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    s, z = scale.unsqueeze(-1), zero.unsqueeze(-1)
    return (torch.clamp(torch.round(w / s) + z, 0, (1 << bits) - 1) - z) * s, scale, zero


def fake_quantize(w: torch.Tensor, bits: int, group_size: int, sym: bool) -> torch.Tensor:
    """Round-to-nearest (min/max) quantize-dequantize of `w` `[out, in]` per group, in float32."""
    grouped = _grouped(w, group_size)
    rounded, _, _ = _rounded(grouped, grouped.amin(-1), grouped.amax(-1), bits, sym)
    return rounded.view(w.shape[0], -1)[:, : w.shape[1]]


def output_error(delta: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """`tr(delta H delta^T)`: the squared output change, summed over calibration tokens (up to a constant), of a
    weight change `delta` `[out, in]`."""
    return ((delta @ hessian) * delta).sum()


@torch.no_grad()
def search_scales(weights: list[torch.Tensor], hessian: torch.Tensor, bits: int, group_size: int, sym: bool,
                  grid: int = GRID) -> torch.Tensor:
    """AWQ's per-input-channel scales `s` for layers reading one input (weights `[out_i, in]`, input Hessian `H`).

    `s = a^alpha / sqrt(max(a^alpha) min(a^alpha))` for the alpha in `0, 1/grid, ...` whose rounded `W diag(s)`,
    divided back by `s`, has the least output error; alpha = 0 (`s = 1`) is among the candidates.
    """
    w = torch.cat([x.detach().float() for x in weights])
    h = hessian.float()
    act = torch.diag(h).clamp(min=0).div(2).sqrt()
    live = act > 0
    act = torch.where(live, act, act[live].min() if live.any() else torch.ones_like(act))
    best, best_scales = None, torch.ones_like(act)
    for step in range(grid):
        scales = act.pow(step / grid)
        scales = (scales / (scales.max() * scales.min()).sqrt()).clamp(min=1e-4)
        error = output_error(fake_quantize(w * scales, bits, group_size, sym) / scales - w, h)
        if best is None or error < best:
            best, best_scales = error, scales
    return best_scales


@torch.no_grad()
def clip_qparams(w: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int, sym: bool,
                 scale_dtype: torch.dtype, grid: int = CLIP_GRID, max_shrink: float = CLIP_MAX_SHRINK):
    """AWQ's range search: each group's min/max range shrunk by the factor (of `grid` steps down to `1 -
    max_shrink`) whose rounding error has the least output error on the group's own inputs, `d^T H_gg d`. Returns
    `(scales [out, groups] in scale_dtype, zeros [out, groups] uint8)`, as `nn.qmath.group_qparams`."""
    grouped = _grouped(w, group_size)
    groups, gs = grouped.shape[1:]
    padded = nn.functional.pad(hessian.float(), (0, groups * gs - w.shape[1]) * 2)
    index = torch.arange(groups)
    blocks = padded.view(groups, gs, groups, gs)[index, :, index, :]  # the diagonal blocks H_gg: [groups, gs, gs]
    wmin, wmax = grouped.amin(-1).clamp(max=0), grouped.amax(-1).clamp(min=0)
    best = best_scale = best_zero = None
    for step in range(grid + 1):
        shrink = 1 - max_shrink * step / grid
        rounded, scale, zero = _rounded(grouped, wmin * shrink, wmax * shrink, bits, sym, scale_dtype)
        delta = rounded - grouped
        error = (torch.einsum("ogi,gij->ogj", delta, blocks) * delta).sum(-1)
        if best is None:
            best, best_scale, best_zero = error, scale, zero
        else:
            better = error < best
            best = torch.minimum(error, best)
            best_scale, best_zero = torch.where(better, scale, best_scale), torch.where(better, zero, best_zero)
    return best_scale.to(scale_dtype), best_zero.to(torch.uint8)


def awq_groups(model: nn.Module, names: list[str]) -> list[tuple[str, list[str]]]:
    """The `(producer, consumers)` groups AWQ scales, checked to fold exactly; a clear error when there are none or
    when folding scales would change the model's float function (naming the mapping that does)."""
    groups = find_groups(model, names)
    if not groups:
        raise ValueError(
            f"AWQ knows no layout of {type(model).__name__} to fold its scales into (it needs Llama-style blocks: "
            "input_layernorm -> self_attn.q/k/v_proj, post_attention_layernorm -> mlp.gate/up_proj, up_proj -> "
            "down_proj, among the target layers). Use method='gptq' or 'autoround' without awq."
        )
    check_folding(model, names, groups)
    return groups


@torch.no_grad()
def check_folding(model: nn.Module, names: list[str], groups: list[tuple[str, list[str]]]) -> None:
    """Fold random scales into every group and check the float outputs did not change, then undo. Raises a
    `ValueError` naming the first mapping (e.g. `post_attention_layernorm -> mlp.gate_proj, mlp.up_proj`) whose
    folding changes them (a norm computing `x * (1 + w)`, a layer reading another tensor than assumed)."""
    blocks_name, blocks = find_blocks(model, names)
    first = next(iter(blocks[0].parameters()))
    vocab = getattr(getattr(model, "config", None), "vocab_size", 2) or 2
    probe = torch.arange(16, device=first.device).remainder(vocab).unsqueeze(0)
    reference = _output(model, probe)
    modules = dict(model.named_modules())
    generator = torch.Generator().manual_seed(0)
    tolerance = max(MAX_RELATIVE_CHANGE, 8 * torch.finfo(first.dtype).eps)
    for producer_suffix, _ in LLAMA_GROUPS:
        kind = [(p, c) for p, c in groups if p.endswith("." + producer_suffix)]
        if not kind:
            continue
        applied = []
        for producer, consumers in kind:
            channels = modules[consumers[0]].in_features
            scales = torch.rand(channels, generator=generator).mul(1.5).add(0.5).to(first.device)
            apply_scales(modules[producer], [modules[c] for c in consumers], scales)
            applied.append((producer, consumers, scales))
        change = ((_output(model, probe) - reference).abs().max() / reference.abs().max().clamp(min=1e-12)).item()
        for producer, consumers, scales in reversed(applied):
            apply_scales(modules[producer], [modules[c] for c in consumers], scales.reciprocal())
        if change > tolerance:
            consumers = ", ".join(c.removeprefix(f"{blocks_name}.0.") for c in kind[0][1])
            raise ValueError(
                f"AWQ cannot fold scales into {type(model).__name__}: scaling {producer_suffix} -> {consumers} changed "
                f"the float outputs by {change:.2g} (relative), so its blocks do not compute what the Llama layout "
                "assumes (e.g. a norm multiplying by 1 + weight). Use method='gptq' or 'autoround' without awq."
            )


def _output(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids)[0].float()


@torch.no_grad()
def fold_block_scales(modules: dict[str, nn.Module], groups: list[tuple[str, list[str]]], hessians: dict,
                      bits: int, group_size: int, sym: bool) -> dict[str, torch.Tensor]:
    """Search and fold AWQ's scales for the groups of one block, in AWQ's order (q/k/v, o, gate/up, down); returns
    every target layer's input Hessian rescaled to the scaled inputs (`H / (s s^T)`), by layer name.

    `hessians` are the block's input accumulators by layer name (layers reading one tensor share one)."""
    rescaled = {}
    for producer, consumers in groups:
        present = [c for c in consumers if c in hessians]
        if not present:
            continue
        hessian = hessians[present[0]].hessian()
        scales = search_scales([modules[c].weight for c in consumers], hessian, bits, group_size, sym)
        apply_scales(modules[producer], [modules[c] for c in consumers], scales)
        for name in present:
            rescaled[name] = hessian / scales.unsqueeze(0) / scales.unsqueeze(1)
    return {name: rescaled.get(name) if name in rescaled else acc.hessian() for name, acc in hessians.items()}
