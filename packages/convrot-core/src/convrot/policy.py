"""Quantization policies: which Linear layers become W4A4, W8A8, W4A8 (optionally with
group-scaled weights: w4a4g64, w4a8g64), or stay as they are.

A policy maps module-name glob patterns (fnmatch, case-sensitive, matched
against the full dotted name; ``*`` also matches dots) to a kind. The first
matching pattern wins; a layer no pattern matches is W4A4.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping

KINDS = ("w4a4", "w8a8", "w4a8", "w4a4g64", "w4a8g64", "skip")
DEFAULT_KIND = "w4a4"


def check_policy(policy: Mapping[str, str] | None) -> dict[str, str]:
    """The policy as an ordered dict, after checking its patterns and kinds."""
    if policy is None:
        return {}
    if not isinstance(policy, Mapping):
        raise TypeError(f"policy must be a mapping of glob pattern -> kind, got {type(policy).__name__}")
    for pattern, kind in policy.items():
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"policy patterns must be non-empty strings, got {pattern!r}")
        if kind not in KINDS:
            raise ValueError(f"policy[{pattern!r}] = {kind!r}: the kind must be one of {KINDS}")
    return dict(policy)


def layer_kind(name: str, policy: Mapping[str, str]) -> tuple[str, str | None]:
    """(kind, the pattern that decided it, or None for the default) for a module name."""
    for pattern, kind in policy.items():
        if fnmatch.fnmatchcase(name, pattern):
            return kind, pattern
    return DEFAULT_KIND, None
