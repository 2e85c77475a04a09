"""The diffusers releases convrot-diffusers is written and tested against.

The floor is what the code needs: the quantizer interface diffusers calls on
save and pre-quantized load (``DiffusersQuantizer.get_state_dict_and_metadata``,
``maybe_update_loaded_keys``) arrived in 0.39.0, Flux's attention module and
``_get_qkv_projections`` in 0.35.0, the processors' ``_parallel_config`` in
0.36.0. The ceiling is the newest release tested: the fused Flux blocks
(activation_fusion.py) compute diffusers' block forwards, which are the same
from 0.36.0 to 0.42.1, and a later release may change them.
"""

from __future__ import annotations

import diffusers
from packaging.specifiers import SpecifierSet
from packaging.version import Version

DIFFUSERS_RANGE = SpecifierSet(">=0.39.0,<0.43")
MIN_DIFFUSERS = Version("0.39.0")
RANGE_TEXT = ">= 0.39.0, < 0.43 (tested: 0.39.0 and 0.42.1)"


class UnsupportedDiffusersError(RuntimeError):
    """The installed diffusers is outside the range a convrot-diffusers feature was written for."""


def installed_diffusers() -> Version:
    return Version(diffusers.__version__)


def diffusers_in_range(version: Version | None = None) -> bool:
    version = installed_diffusers() if version is None else version
    # prereleases=True admits 0.42.2.dev0; "<0.43" still excludes 0.43.0.dev0 (PEP 440).
    return DIFFUSERS_RANGE.contains(version, prereleases=True)


def check_diffusers(feature: str) -> None:
    """Raises UnsupportedDiffusersError naming ``feature`` when the installed diffusers is outside the range."""
    found = installed_diffusers()
    if not diffusers_in_range(found):
        raise UnsupportedDiffusersError(
            f"{feature} is written for diffusers {RANGE_TEXT}, found {found}; "
            "install a diffusers in that range or leave this fusion off"
        )
