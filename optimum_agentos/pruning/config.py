"""`PruningConfig`: what `Pruner` removes, as a dataclass that round-trips through JSON."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from ..config import DEFAULT_IGNORE, FIELD_KINDS, check_field_types, check_patterns
from .masks import check_sparsity, parse_pattern


PRUNING_METHODS = ("magnitude", "wanda", "sparsegpt", "column_magnitude")
CALIBRATED_METHODS = ("wanda", "sparsegpt")  # run block by block over the calibration set
THRESHOLD_METHODS = ("magnitude", "wanda", "column_magnitude")
GLOBAL_METHODS = ("magnitude", "column_magnitude")  # that rank by sparsity across layers
# The JSON type of every field (see `optimum_agentos.config.check_field_types`); `?` allows None.
FIELD_TYPES = {
    "method": "str?", "sparsity": "number?", "pattern": "str?", "layer_sparsity": "mapping?", "scope": "str",
    "target": "patterns?", "ignore": "patterns?", "damp_percent": "number", "block_size": "int",
    "mlp_neurons": "number", "attention_groups": "int", "layers": "int", "uniform": "bool",
    "threshold": "number?", "calibrated": "bool",
    "allocation": "str", "owl_threshold": "number", "owl_lambda": "number",
    "reconstruction_steps": "int", "reconstruction_lr": "number",
}
ALLOCATIONS = ("uniform", "owl")


@dataclass
class PruningConfig:
    """Settings for `Pruner`.

    Args:
        method (`str`, *optional*, defaults to `"sparsegpt"`):
            Weight pruning inside the layers: `"magnitude"` (|W|, no data), `"wanda"` (|W_ij| x RMS of input j over
            the calibration tokens, Sun et al. 2023), `"sparsegpt"` (OBS reconstruction, Frantar & Alistarh 2023) or
            `"column_magnitude"` (whole input features: importance of input j = sum over outputs of |W[:, j]|, see
            `pruning.columns`). `None` for structured removal only.
        sparsity (`float`, *optional*):
            Fraction of each target layer's weights (input features for `column_magnitude`) removed, in [0, 1).
            Defaults to 0.5 (unless `threshold` is set), or to `1 - N/M` with a pattern.
        threshold (`float`, *optional*):
            Instead of `sparsity` (magnitude, wanda, column_magnitude): remove what scores below it, `w' = 0 if
            I(w) < threshold`. With `scope="global"` the threshold is in the score's own units for every layer; with
            `scope="layer"` it is relative to each layer's mean score (0.5 removes what scores under half the layer's
            average). A threshold that removes nothing, or every weight of a layer, is an error.
        calibrated (`bool`, *optional*, defaults to `False`):
            `column_magnitude` only: multiply each input's importance by its RMS over the calibration tokens, as
            Wanda does (needs calibration data).
        pattern (`str`, *optional*):
            `"N:M"` (e.g. `"2:4"`): keep N of every M consecutive input weights. `None` is unstructured.
        layer_sparsity (`dict[str, float]`, *optional*):
            Per-layer sparsity by target pattern (`{"mlp": 0.6, "re:.*self_attn.*": 0.4}`); the first pattern that
            matches a layer wins, the others use `sparsity`.
        scope (`str`, *optional*, defaults to `"layer"`):
            `"layer"` removes `sparsity` of every layer (a `threshold` is relative to each layer's mean score);
            `"global"` ranks all target weights at once (a `threshold` is absolute). Global applies to magnitude,
            column_magnitude and thresholds, not to sparsity-based Wanda/SparseGPT.
        target (`list[str]`, *optional*):
            Layers to prune, same syntax as `AgentOSConfig.target` (`"q_proj"`, `"re:<regex>"`). `None` = every
            linear layer not ignored.
        ignore (`list[str]`, *optional*):
            Layers left dense; defaults to the output head and embeddings.
        damp_percent (`float`, *optional*, defaults to `0.01`):
            SparseGPT: Hessian dampening, as in GPTQ.
        block_size (`int`, *optional*, defaults to `128`):
            SparseGPT: columns whose mask is chosen together (adaptive mask selection).
        mlp_neurons (`float`, *optional*, defaults to `0.0`):
            Structured: fraction of MLP intermediate neurons removed (scored with calibration activations when
            given, else weight norms).
        attention_groups (`int`, *optional*, defaults to `0`):
            Structured: key/value head groups removed per layer, each with its query heads (keeps the GQA ratio).
        layers (`int`, *optional*, defaults to `0`):
            Structured: whole decoder layers removed, the most redundant by block influence (1 - cos(in, out)).
        uniform (`bool`, *optional*, defaults to `True`):
            Structured: remove the same number of neurons/heads in every layer (the config is rewritten, the
            checkpoint loads anywhere) or rank them across layers (per-layer shapes go into `module_shapes`).
        allocation (`str`, *optional*, defaults to `"uniform"`):
            Wanda/SparseGPT, unstructured: `"uniform"` (every layer loses `sparsity`) or `"owl"` (OWL, Yin et al.
            2024: decoder blocks whose Wanda scores hold more outliers keep more weights; the whole model still
            removes exactly `sparsity` of the target weights). Needs one more pass over the calibration data.
        owl_threshold (`float`, *optional*, defaults to `5.0`):
            OWL's M: a score is an outlier above M times its block's mean score.
        owl_lambda (`float`, *optional*, defaults to `0.08`):
            OWL's lambda: block sparsities spread over `sparsity +- lambda` (2 lambda from least to most outliers).
        reconstruction_steps (`int`, *optional*, defaults to `0`):
            Wanda/SparseGPT: after each decoder block is pruned, train its kept weights for this many steps (one
            calibration batch each) so the block's output matches the dense block's, masks fixed (see
            `pruning.reconstruct`). 0 turns it off. Costs one forward and backward pass of a block per step.
        reconstruction_lr (`float`, *optional*, defaults to `5e-4`):
            Adam's learning rate for the reconstruction, decayed to 0 by a cosine. Chosen by a one-off comparison
            on SmolLM2 (SparseGPT 50%, 32 steps, 16 WikiText-2 test windows): 62.96 at 1e-4, 58.69 at 5e-4.
    """

    method: str | None = "sparsegpt"
    sparsity: float | None = None
    pattern: str | None = None
    layer_sparsity: dict[str, float] | None = None
    scope: str = "layer"
    target: list[str] | None = None
    ignore: list[str] | None = None
    damp_percent: float = 0.01
    block_size: int = 128
    mlp_neurons: float = 0.0
    attention_groups: int = 0
    layers: int = 0
    uniform: bool = True
    threshold: float | None = None
    calibrated: bool = False
    allocation: str = "uniform"
    owl_threshold: float = 5.0
    owl_lambda: float = 0.08
    reconstruction_steps: int = 0
    reconstruction_lr: float = 5e-4

    def __post_init__(self):
        if self.ignore is None:
            self.ignore = list(DEFAULT_IGNORE)
        check_field_types(self, FIELD_TYPES, "PruningConfig")  # before the values are used
        self.target = list(self.target) if self.target is not None else None
        self.ignore = list(self.ignore)
        n_m = parse_pattern(self.pattern)
        if n_m is not None:
            implied = 1 - n_m[0] / n_m[1]
            if self.sparsity is not None and abs(self.sparsity - implied) > 1e-9:
                raise ValueError(
                    f"pattern={self.pattern!r} removes {implied:.2f} of the weights but sparsity={self.sparsity}; "
                    "drop sparsity (the pattern sets it) or pick a matching pattern."
                )
            self.sparsity = implied
        elif self.sparsity is None and self.threshold is None:
            self.sparsity = 0.5
        self.validate()

    @property
    def n_m(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern)

    @property
    def is_structured(self) -> bool:
        return bool(self.mlp_neurons or self.attention_groups or self.layers)

    @property
    def needs_calibration(self) -> bool:
        return self.method in CALIBRATED_METHODS or (self.method == "column_magnitude" and self.calibrated)

    def validate(self) -> None:
        """Raise a `ValueError` naming the bad field, its value and what is accepted."""
        check_field_types(self, FIELD_TYPES, "PruningConfig")
        if self.method is not None and self.method not in PRUNING_METHODS:
            raise ValueError(f"method={self.method!r} is not supported; use one of {PRUNING_METHODS} or None.")
        if self.method is None and not self.is_structured:
            raise ValueError(
                "Nothing to prune: set method (e.g. 'sparsegpt') or a structured removal (mlp_neurons, "
                "attention_groups, layers)."
            )
        self._check_threshold()
        if self.sparsity is not None:
            check_sparsity(self.sparsity)
        for pattern, value in (self.layer_sparsity or {}).items():
            if not FIELD_KINDS["number"][0](value):
                raise ValueError(f"layer_sparsity[{pattern!r}]={value!r} ({type(value).__name__}) must be a number "
                                 "in [0, 1), e.g. 0.5.")
            try:
                check_sparsity(value)
            except ValueError as err:
                raise ValueError(f"layer_sparsity[{pattern!r}]: {err}") from None
        if self.layer_sparsity and self.pattern:
            raise ValueError("layer_sparsity applies to unstructured pruning; an N:M pattern fixes every layer's sparsity.")
        self._validate_allocation()
        self._validate_reconstruction()
        if self.scope not in ("layer", "global"):
            raise ValueError(f"scope={self.scope!r} must be 'layer' or 'global'.")
        if self.scope == "global" and (self.pattern or (self.threshold is None and self.method not in GLOBAL_METHODS)):
            raise ValueError(f"scope='global' ranks weights across layers and applies to unstructured {GLOBAL_METHODS} "
                             "pruning, or to a threshold; use scope='layer'.")
        if not 0 <= self.damp_percent < 1:
            raise ValueError(f"damp_percent={self.damp_percent!r} must be in [0, 1), typically 0.01.")
        if self.block_size < 1:
            raise ValueError(f"block_size={self.block_size!r} must be a positive number of columns.")
        for name in ("target", "ignore"):
            check_patterns(name, getattr(self, name))
        check_patterns("layer_sparsity", list(self.layer_sparsity or {}))
        if not 0 <= self.mlp_neurons < 1:
            raise ValueError(f"mlp_neurons={self.mlp_neurons!r} is a fraction of neurons to remove, in [0, 1).")
        for name in ("attention_groups", "layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name}={value!r} must be a count >= 0.")

    def _check_threshold(self) -> None:
        if self.calibrated and self.method != "column_magnitude":
            raise ValueError(f"calibrated=True applies to method='column_magnitude' (got {self.method!r}); Wanda and "
                             "SparseGPT are calibrated already.")
        if self.method == "column_magnitude" and self.pattern:
            raise ValueError("method='column_magnitude' removes whole input features; an N:M pattern does not apply.")
        if self.threshold is None:
            return
        if self.method not in THRESHOLD_METHODS:
            raise ValueError(f"threshold applies to methods {THRESHOLD_METHODS}, not method={self.method!r}.")
        if self.sparsity is not None or self.pattern or self.layer_sparsity:
            raise ValueError(
                f"threshold={self.threshold} and sparsity={self.sparsity}"
                f"{', pattern' if self.pattern else ''}{', layer_sparsity' if self.layer_sparsity else ''} both set "
                "how much to prune; give exactly one of threshold and sparsity."
            )
        if self.threshold <= 0:
            raise ValueError(f"threshold={self.threshold!r} must be > 0 (scores are >= 0: nothing scores below it).")

    def _validate_allocation(self) -> None:
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"allocation={self.allocation!r} is not supported; use one of {ALLOCATIONS}.")
        if self.allocation == "uniform":
            return
        if self.method not in CALIBRATED_METHODS or self.pattern or self.layer_sparsity or self.sparsity is None:
            raise ValueError(
                "allocation='owl' sets each block's sparsity from activation outliers: it needs method='wanda' or "
                f"'sparsegpt', unstructured (no pattern), a sparsity (not a threshold) and no layer_sparsity; got "
                f"method={self.method!r}, pattern={self.pattern!r}, sparsity={self.sparsity!r}, "
                f"layer_sparsity={self.layer_sparsity!r}."
            )
        if self.owl_threshold <= 0:
            raise ValueError(f"owl_threshold={self.owl_threshold!r} must be > 0 (OWL's M, typically 5).")
        if not (0 <= self.owl_lambda <= self.sparsity and self.sparsity + self.owl_lambda < 1):
            raise ValueError(f"owl_lambda={self.owl_lambda!r} must be in [0, {self.sparsity:g}] with sparsity + lambda "
                             "< 1, so that every block's sparsity (sparsity +- lambda) stays in [0, 1); typically 0.08.")

    def _validate_reconstruction(self) -> None:
        if self.reconstruction_steps < 0:
            raise ValueError(f"reconstruction_steps={self.reconstruction_steps!r} must be >= 0 (0 turns it off).")
        if self.reconstruction_steps and self.method not in CALIBRATED_METHODS:
            raise ValueError(f"reconstruction_steps applies to the calibrated methods {CALIBRATED_METHODS}, which "
                             f"prune block by block; got method={self.method!r}. Use method='sparsegpt' or 'wanda'.")
        if not (self.reconstruction_lr > 0 and math.isfinite(self.reconstruction_lr)):
            raise ValueError(f"reconstruction_lr={self.reconstruction_lr!r} must be a positive number, e.g. 5e-4.")

    def layer_sparsity_of(self, name: str) -> float:
        from ..nn.targets import matches

        for pattern, value in (self.layer_sparsity or {}).items():
            if matches(name, pattern):
                return value
        return self.sparsity

    def to_dict(self) -> dict[str, Any]:
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self)}

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PruningConfig":
        """Build from a dict (e.g. the `pruning` provenance of a checkpoint's `quantization_config`), rejecting
        unknown keys: a typo (`sparsty`) must not prune with a default in its place. Nothing but this class writes
        these dicts, so there is no foreign key to tolerate."""
        if not isinstance(data, Mapping):
            raise ValueError(f"A PruningConfig must be a mapping (a JSON object), got {type(data).__name__}.")
        data = copy.deepcopy(dict(data))
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known, key=str)
        if unknown:
            raise ValueError(f"Unknown PruningConfig keys {unknown}; known keys are {sorted(known)}.")
        return cls(**data)
