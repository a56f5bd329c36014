"""Field checks shared by the config dataclasses: JSON kinds, target patterns, N:M patterns, format versions."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

from .version import FORMAT_VERSION, __version__


class CheckpointVersionError(ValueError):
    """A checkpoint written by a newer library than the one installed."""



def parse_pattern(pattern: str | None) -> tuple[int, int] | None:
    """`"2:4"` -> `(2, 4)`: keep N of every M consecutive input weights. `None`/`"unstructured"` -> None."""
    if pattern in (None, "unstructured"):
        return None
    if not isinstance(pattern, str):
        raise ValueError(f"pattern={pattern!r} ({type(pattern).__name__}) must be a string like '2:4' or "
                         "'unstructured'.")
    try:
        n, m = (int(p) for p in pattern.split(":"))
    except ValueError as err:
        raise ValueError(f"pattern={pattern!r} must look like 'N:M' (e.g. '2:4') or 'unstructured'.") from err
    if not 0 < n < m:
        raise ValueError(f"pattern={pattern!r} needs 0 < N < M.")
    return n, m


# What a field of a config must hold, checked before its value is used: JSON has no int/float/bool guard of its own
# (`"sym": "false"` is a truthy string, `"bits": 4.0` a float, `true` an int to Python).
FIELD_KINDS = {
    "int": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer (not a float, string or boolean)"),
    "bool": (lambda v: isinstance(v, bool), "a boolean (true or false, not a string or number)"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "number": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
               "a finite number (not a string or boolean)"),
    "patterns": (lambda v: isinstance(v, (list, tuple)) and all(isinstance(p, str) and p for p in v),
                 "a list of non-empty strings (module names or 're:<regex>')"),
    "mapping": (lambda v: isinstance(v, Mapping) and all(isinstance(k, str) and k for k in v),
                "a mapping with non-empty string keys"),
}


def check_field_types(obj, kinds: dict[str, str], owner: str) -> None:
    """Raise a `ValueError` naming the first field of `obj` whose value is not of its kind in `kinds`
    (`{"bits": "int?"}`: a trailing `?` also allows None)."""
    for name, kind in kinds.items():
        value = getattr(obj, name)
        optional = kind.endswith("?")
        if value is None and optional:
            continue
        accepts, expected = FIELD_KINDS[kind.rstrip("?")]
        if not accepts(value):
            raise ValueError(f"{owner} {name}={value!r} ({type(value).__name__}) must be {expected}"
                             + (" or None (null in JSON)." if optional else "."))


def check_patterns(name: str, patterns: list[str] | None) -> None:
    """Every `re:` pattern of a target/ignore list must compile."""
    for pattern in patterns or []:
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except (re.error, RecursionError, OverflowError) as err:
                raise ValueError(f"{name} pattern {pattern!r} is not a valid regex: {err}") from None


def check_format_version(version, library_version=None) -> None:
    """A format version is an int >= 1; one newer than this library's raises `CheckpointVersionError`."""
    if not FIELD_KINDS["int"][0](version) or version < 1:
        raise ValueError(f"format_version={version!r} ({type(version).__name__}) must be an integer from 1 to "
                         f"{FORMAT_VERSION} (the agentos checkpoint format the file was written in).")
    if version > FORMAT_VERSION:
        raise CheckpointVersionError(
            f"This checkpoint uses agentos format version {version}, written by "
            f"{f'optimum-agentos {library_version}' if library_version else 'a newer optimum-agentos'}; the installed "
            f"optimum-agentos {__version__} reads up to version "
            f"{FORMAT_VERSION}. Upgrade optimum-agentos with `pip install -U optimum-agentos`."
        )


def check_group_size_value(gs, what: str = "group_size") -> None:
    """A group size is -1 (one group per output channel) or a power of two >= 2."""
    if not FIELD_KINDS["int"][0](gs) or (gs != -1 and (gs < 2 or gs & (gs - 1))):
        raise ValueError(f"{what}={gs!r} must be -1 (one group per output channel) or a power of two >= 2, e.g. 64 "
                         "or 128.")
