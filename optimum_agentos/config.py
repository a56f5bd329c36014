"""The serialized compression config: `quantization_config` with `quant_method: "agentos"` in `config.json`."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from .validation import (  # noqa: F401  (re-exported: configs and checks import them from here)
    FIELD_KINDS, CheckpointVersionError, check_field_types, check_format_version, check_group_size_value, check_patterns,
    parse_pattern,
)
from .version import FORMAT_VERSION, __version__


QUANT_METHOD = "agentos"
SUPPORTED_BITS = (2, 3, 4, 8)
SUPPORTED_METHODS = ("rtn", "gptq", "awq", "autoround")
SUPPORTED_OBSERVERS = ("minmax", "mse")
SUPPORTED_ACTIVATIONS = (None, "int8-dynamic")
SUPPORTED_EMBEDDING_BITS = (None, 8)
SCALE_DTYPES = ("float16", "bfloat16", "float32")
# Kept in full precision unless the user targets them explicitly: output head and embeddings.
DEFAULT_IGNORE = ("lm_head", "re:.*embed.*", "re:.*wte$", "re:.*wpe$")
# Fields added by format version 2 (pruned checkpoints); omitted from config.json when unset.
PRUNING_KEYS = ("sparse_layers", "sparsity_pattern", "module_shapes", "pruning")
# Fields added by format version 3 (int8 embeddings); likewise omitted when unset.
VERSION_3_KEYS = ("embedding_bits",)
# Added by format version 4 (provenance only: the smoothing is folded into the weights); likewise omitted when unset.
VERSION_4_KEYS = ("smoothquant_alpha",)
# Added by format version 5 (mixed precision: per-layer bits and group size; AWQ scaling and learned rounding,
# provenance only, the tensors unchanged); likewise omitted when unset.
VERSION_5_KEYS = ("layer_overrides", "awq", "rounding_steps", "rounding_lr")
OPTIONAL_KEYS_SINCE = {2: PRUNING_KEYS, 3: VERSION_3_KEYS, 4: VERSION_4_KEYS, 5: VERSION_5_KEYS}
LAYER_OVERRIDE_KEYS = ("bits", "group_size")
# Methods an older release does not know: a checkpoint made with one is stamped with this format version.
METHODS_SINCE = {"awq": 5, "autoround": 5}
# The JSON type of every field (see `check_field_types`); `?` allows None.
FIELD_TYPES = {
    "bits": "int?", "group_size": "int", "sym": "bool", "method": "str", "damp_percent": "number", "act_order": "bool",
    "observer": "str?", "activations": "str?", "embedding_bits": "int?", "smoothquant_alpha": "number?",
    "awq": "bool?", "rounding_steps": "int?", "rounding_lr": "number?",
    "block_size": "int", "target": "patterns?", "ignore": "patterns?", "scale_dtype": "str", "float_dtype": "str?",
    "sparse_layers": "mapping?", "layer_overrides": "mapping?", "sparsity_pattern": "str?", "module_shapes": "mapping?",
    "pruning": "mapping?",
    "format_version": "int", "library_version": "str", "quant_method": "str",
}


@dataclass
class AgentOSConfig(QuantizationConfigMixin):
    """Weight-only quantization settings, also the `quantization_config` stored in `config.json`.

    Args:
        bits (`int`, *optional*, defaults to `4`):
            Bits per weight, one of 2, 3, 4, 8; `None` for a pruned checkpoint whose weights stay in floating point.
        group_size (`int`, *optional*, defaults to `128`):
            Input columns sharing one scale and zero point; `-1` means one group per output channel. A power of two.
            When it does not divide a layer's input features the last group of that layer is shorter.
        sym (`bool`, *optional*, defaults to `False`):
            Symmetric quantization (zero point fixed at the middle of the range) instead of min/max asymmetric.
        method (`str`, *optional*, defaults to `"rtn"`):
            `"rtn"` (round to nearest, no data), `"gptq"` (calibrated, Frantar et al. 2022), `"awq"` (AWQ, Lin et
            al. 2024: activation-aware per-input-channel scales folded into the layer before, then round to nearest
            with AWQ's range (clip) search) or `"autoround"` (learned rounding, Cheng et al. 2023: per block, the
            rounding offsets and range factors are trained with signed gradient descent so that the block, fed the
            quantized model's inputs, reproduces the float model's output there). The calibrated ones need
            calibration data; all store the same codes, scales and zero points.
        awq (`bool`, *optional*):
            `True`: apply AWQ's activation-aware scales before `method="gptq"` or `"autoround"` rounds the weights
            (AWQ + GPTQ, AWQ + learned rounding). `method="awq"` is AWQ with round to nearest, so it takes no flag.
            Llama-style blocks only (the scales fold into `input_layernorm`, `post_attention_layernorm`, `v_proj`
            and `up_proj`); the quantizer refuses, naming the mapping, a model where folding changes the function.
        rounding_steps (`int`, *optional*):
            `method="autoround"`: signed-gradient steps per block, one calibration batch each (default 200).
        rounding_lr (`float`, *optional*):
            `method="autoround"`: step size of the rounding offsets and range factors, decayed linearly to 0
            (default `1 / rounding_steps`, as in the paper).
        damp_percent (`float`, *optional*, defaults to `0.01`):
            GPTQ: fraction of the mean Hessian diagonal added to the diagonal before inversion.
        act_order (`bool`, *optional*, defaults to `True`):
            GPTQ: quantize columns by decreasing Hessian diagonal. Group parameters are fixed before the pass so the
            stored format (contiguous groups) does not change. On SmolLM2-135M int4 g128 (minmax observer) it lowers
            WikiText-2 perplexity from 41.27 to 38.49 (8 windows of 512, fp32 30.64, 16 calibration windows;
            `benchmarks/gptq_ablation.py`).
        observer (`str`, *optional*):
            How a group's range is chosen: `"minmax"` or `"mse"` (shrink the range up to 20% when that lowers the
            group's squared rounding error). `None` picks `"mse"` for GPTQ (38.49 -> 36.69 above) and `"minmax"` for
            RTN, where the weight-space error is a poor guide (42.06 -> 45.94 above). With `method="awq"`, `None`
            is AWQ's range search (each group's range shrunk by up to 50% where that lowers its output error on the
            calibration inputs); `method="autoround"` learns the ranges and takes no observer.
        activations (`str`, *optional*):
            `None` (weight-only: activations stay in float) or `"int8-dynamic"` (W8A8: int8 x int8 matmuls with each
            token's activations rounded onto its own 256-level grid at run time; int8 with one scale per row only).
            Faster prefill on CPU (see BENCHMARKS.md's speed table), at the cost of the activation rounding
            (SmolLM2 WikiText-2 ppl +0.8% to +0.9%, +1.3% with `embedding_bits=8`; `benchmarks/smoothquant.py`,
            `benchmarks/speed.py`).
        embedding_bits (`int`, *optional*):
            `8`: the input token embedding and the output head (one int8 matrix when they are tied) get one int8
            code per weight and a float32 scale per row; `None` (default): kept in `float_dtype`. For small models
            whose vocabulary matrix is a large share of the weights (SmolLM2-135M: 21%).
        smoothquant_alpha (`float`, *optional*):
            W8A8 only: migrate activation outliers into the weights before quantizing (SmoothQuant, Xiao et al.
            2023) with this strength in (0, 1), typically 0.5. Each input channel of the layers reading a normalized
            input is divided by `max|X_j|^alpha / max|W_j|^(1-alpha)` in the norm before them and multiplied into
            their weight columns, so the float model is unchanged. Needs calibration data (the activations'
            maxima). Recorded for provenance only: the checkpoint loads like any W8A8 one. SmolLM2-135M W8A8 RTN
            WikiText-2 ppl (16 windows of 512, fp32 36.63; `benchmarks/smoothquant.py`): 36.94 -> 36.95 with alpha
            0.5, 37.09 with 0.8 (the float32 outlier split already handles the outliers); with the split off
            37.69 -> 37.09 (0.5), 37.06 (0.8).
        block_size (`int`, *optional*, defaults to `128`):
            GPTQ: columns updated together (lazy batch updates).
        target (`list[str]`, *optional*):
            Modules to quantize. Plain strings match a module name or its last components (`"q_proj"` matches
            `model.layers.0.self_attn.q_proj`); `"re:<regex>"` matches the full name. `None` means every supported
            linear layer not ignored.
        ignore (`list[str]`, *optional*):
            Modules kept in full precision, same syntax. Defaults to the output head and embeddings.
        scale_dtype (`str`, *optional*, defaults to `"float16"`):
            dtype of the stored scales.
        sparse_layers (`dict[str, int]`, *optional*):
            Pruned layers stored sparse: module name -> number of kept weights. Their tensors are a bitmask of the
            kept positions plus only the kept values (float, or integer codes when the layer is also quantized).
            Written by `Pruner`; the count lets the loader size the value tensor before the weights arrive.
        sparsity_pattern (`str`, *optional*):
            `"N:M"` when every sparse layer keeps exactly N of each M consecutive inputs; checked on load.
        module_shapes (`dict[str, list[int]]`, *optional*):
            Linear layers whose `[out, in]` shape a structured prune made differ from what `config.json` implies
            (non-uniform per-layer widths); they are resized before the weights load.
        pruning (`dict`, *optional*):
            The `PruningConfig` that produced the checkpoint (provenance only).
        layer_overrides (`dict[str, dict]`, *optional*):
            Mixed precision: full module name -> `{"bits": b, "group_size": g}` (either key may be left out; the
            top-level `bits`/`group_size` fill in). Each named layer must be one that `target`/`ignore` select.
            Written by `plan_mixed_precision` / `Quantizer(max_size_mb=...)`; honoured on load, by the checks of
            the stored tensors' shapes and by the kernels (chosen per layer).
        float_dtype (`str`, *optional*, defaults to `"float16"`):
            dtype in which the checkpoint stores the weights kept unquantized (embeddings, an untied output head):
            for SmolLM2 the fp32 embedding alone is 113 MB. The in-memory weights are rounded to it once, so a
            reload is bit-exact. `None` keeps the model's dtype.
    """

    bits: int | None = 4
    group_size: int = 128
    sym: bool = False
    method: str = "rtn"
    damp_percent: float = 0.01
    act_order: bool = True
    observer: str | None = None
    activations: str | None = None
    embedding_bits: int | None = None
    smoothquant_alpha: float | None = None
    awq: bool | None = None
    rounding_steps: int | None = None
    rounding_lr: float | None = None
    block_size: int = 128
    target: list[str] | None = None
    ignore: list[str] | None = None
    scale_dtype: str = "float16"
    float_dtype: str | None = "float16"
    sparse_layers: dict[str, int] | None = None
    layer_overrides: dict[str, dict[str, int]] | None = None
    sparsity_pattern: str | None = None
    module_shapes: dict[str, list[int]] | None = None
    pruning: dict[str, Any] | None = None
    format_version: int = FORMAT_VERSION
    library_version: str = __version__
    quant_method: str = field(default=QUANT_METHOD)

    def __post_init__(self):
        self.quant_method = QUANT_METHOD
        if self.awq is False:  # off, like None: keeps the key out of config.json
            self.awq = None
        if self.ignore is None:
            self.ignore = list(DEFAULT_IGNORE)
        check_field_types(self, FIELD_TYPES, "AgentOSConfig")  # before list(): a string target is not a list
        self.target = list(self.target) if self.target is not None else None
        self.ignore = list(self.ignore)
        if self.layer_overrides is not None:
            self.layer_overrides = {k: dict(v) if isinstance(v, Mapping) else v
                                    for k, v in self.layer_overrides.items()}
        if self.module_shapes is not None:
            self.module_shapes = {k: list(v) if isinstance(v, tuple) else v for k, v in self.module_shapes.items()}
        self.validate()

    def validate(self) -> None:
        """Raise a `ValueError` naming the bad field, its value and the accepted values."""
        check_field_types(self, FIELD_TYPES, "AgentOSConfig")
        check_format_version(self.format_version, self.library_version)
        if not self.library_version:
            raise ValueError("library_version='' must name the optimum-agentos release that wrote the checkpoint.")
        if self.bits is None:
            if not (self.sparse_layers or self.module_shapes):
                raise ValueError(
                    "bits=None (no quantization) only describes a pruned checkpoint (sparse_layers or module_shapes); "
                    f"to quantize pick bits from {SUPPORTED_BITS}."
                )
        elif self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits={self.bits!r} is not supported; use one of {SUPPORTED_BITS}.")
        check_group_size_value(self.group_size, "group_size")
        self._validate_layer_overrides()
        if self.method not in SUPPORTED_METHODS:
            raise ValueError(f"method={self.method!r} is not supported; use one of {SUPPORTED_METHODS}.")
        if not 0 <= self.damp_percent < 1:
            raise ValueError(f"damp_percent={self.damp_percent!r} must be in [0, 1), typically 0.01.")
        if self.observer is not None and self.observer not in SUPPORTED_OBSERVERS:
            raise ValueError(f"observer={self.observer!r} is not supported; use one of {SUPPORTED_OBSERVERS} or None.")
        if self.activations not in SUPPORTED_ACTIVATIONS:
            raise ValueError(f"activations={self.activations!r} is not supported; use one of {SUPPORTED_ACTIVATIONS}.")
        if self.activations == "int8-dynamic" and (self.bits != 8 or self.group_size != -1):
            raise ValueError("activations='int8-dynamic' (W8A8) needs bits=8 and group_size=-1 (one scale per row), "
                             f"got bits={self.bits}, group_size={self.group_size}.")
        if self.embedding_bits not in SUPPORTED_EMBEDDING_BITS:
            raise ValueError(f"embedding_bits={self.embedding_bits!r} is not supported; use 8 (int8 token embeddings "
                             "and output head) or None (kept in float).")
        if self.smoothquant_alpha is not None:
            if self.activations != "int8-dynamic":
                raise ValueError("smoothquant_alpha eases activation quantization: it needs activations='int8-dynamic' "
                                 f"(W8A8), got activations={self.activations!r}; set it or drop smoothquant_alpha.")
            alpha = self.smoothquant_alpha
            if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < 1:
                raise ValueError(f"smoothquant_alpha={alpha!r} must be a number in (0, 1), typically 0.5.")
        self._validate_calibrated_methods()
        if self.block_size < 1:
            raise ValueError(f"block_size={self.block_size!r} must be a positive number of columns.")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"scale_dtype={self.scale_dtype!r} must be one of {SCALE_DTYPES}.")
        if self.float_dtype is not None and self.float_dtype not in SCALE_DTYPES:
            raise ValueError(f"float_dtype={self.float_dtype!r} must be one of {SCALE_DTYPES} or None.")
        for name in ("target", "ignore"):
            check_patterns(name, getattr(self, name))
        for name, kept in (self.sparse_layers or {}).items():
            if not FIELD_KINDS["int"][0](kept) or kept < 0:
                raise ValueError(f"sparse_layers[{name!r}]={kept!r} must be a count of kept weights (int >= 0).")
        for name, shape in (self.module_shapes or {}).items():
            if not (isinstance(shape, (list, tuple)) and len(shape) == 2
                    and all(FIELD_KINDS["int"][0](d) and d > 0 for d in shape)):
                raise ValueError(f"module_shapes[{name!r}]={shape!r} must be [out_features, in_features] "
                                 "(two ints > 0).")
        if self.sparsity_pattern is not None:
            parse_pattern(self.sparsity_pattern)

    def _validate_layer_overrides(self) -> None:
        if not self.layer_overrides:
            return
        if self.bits is None:
            raise ValueError("layer_overrides sets per-layer bits of quantized layers; it needs bits (not None).")
        if self.method not in ("rtn", "gptq") or self.awq:
            raise ValueError(f"layer_overrides (mixed precision) runs with method='rtn' or 'gptq' without awq, got "
                             f"method={self.method!r}, awq={self.awq!r}.")
        if self.activations is not None:
            raise ValueError(f"layer_overrides (mixed precision) is weight-only; activations={self.activations!r} "
                             "needs one int8 per-row format for every layer. Drop one of the two.")
        for name, override in self.layer_overrides.items():
            if not isinstance(override, Mapping) or not override or set(override) - set(LAYER_OVERRIDE_KEYS):
                raise ValueError(f"layer_overrides[{name!r}]={override!r} must be a non-empty mapping with keys from "
                                 f"{LAYER_OVERRIDE_KEYS}, e.g. {{'bits': 8, 'group_size': -1}}.")
            bits = override.get("bits", self.bits)
            if not FIELD_KINDS["int"][0](bits) or bits not in SUPPORTED_BITS:
                raise ValueError(f"layer_overrides[{name!r}] bits={bits!r} is not supported; use one of "
                                 f"{SUPPORTED_BITS}.")
            check_group_size_value(override.get("group_size", self.group_size), f"layer_overrides[{name!r}] group_size")

    def layer_qparams(self, name: str) -> tuple[int, int]:
        """`(bits, group_size)` of the quantized layer `name`: its `layer_overrides` entry, else the defaults."""
        override = (self.layer_overrides or {}).get(name, {})
        return override.get("bits", self.bits), override.get("group_size", self.group_size)

    def _validate_calibrated_methods(self) -> None:
        """AWQ and learned-rounding options: each with the method it belongs to."""
        if self.awq and self.method not in ("gptq", "autoround"):
            fix = ("method='awq' already is AWQ (scales + round to nearest); drop awq=True" if self.method == "awq"
                   else "for AWQ with round to nearest use method='awq'")
            raise ValueError(f"awq=True composes AWQ's scales with method='gptq' or 'autoround', got "
                             f"method={self.method!r}: {fix}.")
        if (self.awq or self.method == "awq") and self.activations is not None:
            raise ValueError(f"AWQ is for weight-only quantization; with activations={self.activations!r} use "
                             "smoothquant_alpha to ease the activations instead.")
        for name in ("rounding_steps", "rounding_lr"):
            if getattr(self, name) is not None and self.method != "autoround":
                raise ValueError(f"{name} sets learned rounding: it needs method='autoround', got "
                                 f"method={self.method!r}; drop {name} or set method='autoround'.")
        if self.rounding_steps is not None and self.rounding_steps < 1:
            raise ValueError(f"rounding_steps={self.rounding_steps!r} must be a positive number of steps, e.g. 200.")
        if self.rounding_lr is not None and not 0 < self.rounding_lr <= 1:
            raise ValueError(f"rounding_lr={self.rounding_lr!r} must be in (0, 1], e.g. 1 / rounding_steps.")
        if self.method == "autoround" and self.observer is not None:
            raise ValueError(f"method='autoround' learns each group's range itself (from min/max); drop "
                             f"observer={self.observer!r}.")

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs):
        """Build from a `quantization_config` dict (what transformers calls when loading a checkpoint).

        The format version is checked first, so a checkpoint from a newer release asks for an upgrade rather than
        reporting its new keys as unknown. Unknown keys are then rejected: a typo (`grup_size`) must not load a
        model with a default in its place. transformers writes this dict with our `to_dict` and adds no key of its
        own, and the keys it reads back (`quant_method`) are fields, so nothing legitimate is refused.
        """
        if not isinstance(config_dict, Mapping):
            raise ValueError("quantization_config must be a mapping (a JSON object), got "
                             f"{type(config_dict).__name__}.")
        config_dict = copy.deepcopy(dict(config_dict))
        check_format_version(config_dict.get("format_version", FORMAT_VERSION), config_dict.get("library_version"))
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(config_dict) - known, key=str)
        if unknown:
            raise ValueError(f"Unknown agentos quantization_config keys {unknown}; known keys are {sorted(known)}.")
        if config_dict.get("quant_method", QUANT_METHOD) != QUANT_METHOD:
            raise ValueError(f"quant_method={config_dict['quant_method']!r}: this config class reads "
                             f"quant_method={QUANT_METHOD!r} only.")
        config = cls(**config_dict)
        unused = {}
        for key, value in kwargs.items():
            if key in known:
                setattr(config, key, value)
            else:
                unused[key] = value
        if kwargs:
            config.validate()
        return (config, unused) if return_unused_kwargs else config

    def to_dict(self) -> dict[str, Any]:
        """All fields; the pruning, int8-embedding and smoothing ones only when set, so plain quantized checkpoints
        keep the version-1 key set."""
        data = {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self)}
        for key in (key for keys in OPTIONAL_KEYS_SINCE.values() for key in keys):
            if data[key] is None:
                del data[key]
        data["quant_method"] = QUANT_METHOD
        return data

    @property
    def is_quantized(self) -> bool:
        return self.bits is not None

    @property
    def mse_grid(self) -> int:
        """Range-shrink steps searched per group: 20 for the `"mse"` observer, 0 for `"minmax"`."""
        observer = self.observer or ("mse" if self.method == "gptq" else "minmax")
        return 20 if observer == "mse" else 0

    def stamped(self) -> "AgentOSConfig":
        """A copy carrying this library's format and package versions, written on save: the oldest format that
        holds its keys and method (1 without pruning, int8-embedding, smoothing or AWQ / learned-rounding ones), so older releases still read it."""
        config = copy.deepcopy(self)
        config.format_version = max(
            [1, METHODS_SINCE.get(self.method, 1)]
            + [v for v, keys in OPTIONAL_KEYS_SINCE.items() if any(getattr(self, k) is not None for k in keys)]
        )
        config.library_version = __version__
        return config
