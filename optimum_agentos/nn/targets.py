"""One target/ignore syntax for choosing modules: plain names match trailing name components, `re:` is a regex."""

from __future__ import annotations

import re

from torch import nn


def is_supported_layer(module: nn.Module) -> bool:
    """Layers the quantizer can replace: `nn.Linear` and GPT-2's `Conv1D`."""
    from .linear import is_conv1d

    return isinstance(module, nn.Linear) or is_conv1d(module)


def matches(name: str, pattern: str) -> bool:
    """`"q_proj"` matches `a.b.q_proj`; `"self_attn.q_proj"` matches `x.self_attn.q_proj`; `"re:..."` full-matches."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern)


def resolve_targets(model: nn.Module, target: list[str] | None, ignore: list[str] | None) -> list[str]:
    """Names of the modules to quantize; raises when a target pattern matches nothing or nothing is left.

    With `target=None` every supported linear layer is a candidate; `ignore` then removes modules. The tied output
    head and embeddings are covered by the default ignore list of `AgentOSConfig`.
    """
    modules = dict(model.named_modules())
    from .sparse_linear import SparseLinear
    from .linear import QuantLinear

    if any(isinstance(m, (QuantLinear, SparseLinear)) for m in modules.values()):
        raise ValueError(f"{type(model).__name__} is already agentos-quantized; quantize the float model instead.")
    if target is None:
        candidates = [n for n, m in modules.items() if n and is_supported_layer(m)]
    else:
        candidates = []
        for pattern in target:
            hits = [n for n in modules if n and matches(n, pattern)]
            if not hits:
                raise ValueError(
                    f"Target pattern {pattern!r} matches no module of {type(model).__name__}. Module names look like "
                    f"{_examples(modules)}; use a trailing name such as 'q_proj' or a regex 're:.*mlp.*'."
                )
            unsupported = sorted({type(modules[n]).__name__ for n in hits if not is_supported_layer(modules[n])})
            hits = [n for n in hits if is_supported_layer(modules[n])]
            if not hits:
                raise ValueError(
                    f"Target pattern {pattern!r} matches only unsupported layer types {unsupported}; "
                    "optimum-agentos quantizes nn.Linear and transformers' Conv1D."
                )
            candidates.extend(h for h in hits if h not in candidates)
    selected = [n for n in candidates if not any(matches(n, p) for p in ignore or [])]
    if not selected:
        raise ValueError(
            f"No quantizable layer left in {type(model).__name__} (target={target}, ignore={ignore}): it has no "
            "nn.Linear/Conv1D layers outside the ignore list."
        )
    return selected


def _examples(modules: dict, k: int = 3) -> list[str]:
    leaves = [n for n, m in modules.items() if n and not list(m.children())]
    return leaves[:k]
