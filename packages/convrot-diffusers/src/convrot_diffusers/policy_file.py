"""Policy files: the per-layer schemes ``convrot scan`` writes and ``quantize --policy`` reads.

A policy file is one JSON object mapping module-name glob patterns (convrot-core's policy format:
fnmatch on the full dotted name, first match wins) to a kind of ``convrot.KINDS``; ``convrot scan``
writes one exact layer name per scanned Linear and ends with the catch-all ``"*": "skip"``.

Everything is checked before any weight is read: the file's JSON (a duplicate key would silently
lose a rule), each kind, and each pattern against the Linear layers of the transformer, which is
built on the meta device from its config alone. A pattern that decides no layer is an error (a
misspelt layer name would otherwise quantize nothing), except the catch-all ``"*"``, which decides
nothing when every Linear is named.
"""

from __future__ import annotations

import difflib
import fnmatch
import json
import os
from collections.abc import Mapping
from pathlib import Path

# convrot and torch are imported where they are used: the CLI reads a policy file in its checks.
CATCH_ALL = "*"


class PolicyError(ValueError):
    """A policy that cannot be used; the message is one line naming the file and the field."""


def _kinds() -> tuple[str, ...]:
    from convrot.policy import KINDS

    return KINDS


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise PolicyError(f"{key!r} appears twice (the first match wins, so one of them would be ignored)")
        seen[key] = value
    return seen


def check_policy(policy: object, source: str = "policy") -> dict[str, str]:
    """``policy`` as an ordered {pattern: kind} dict; PolicyError naming the first bad field."""
    if not isinstance(policy, Mapping):
        raise PolicyError(f"{source}: must be a JSON object of layer pattern -> scheme, got {type(policy).__name__}")
    if not policy:
        raise PolicyError(f"{source}: is empty; it needs at least one layer pattern -> scheme")
    kinds = _kinds()
    for pattern, kind in policy.items():
        if not isinstance(pattern, str) or not pattern:
            raise PolicyError(f"{source}: layer patterns must be non-empty strings, got {pattern!r}")
        if kind not in kinds:
            raise PolicyError(f"{source}: {pattern!r}: unknown scheme {kind!r}; use one of {', '.join(kinds)}")
    return dict(policy)


def read_policy(path: str | os.PathLike) -> dict[str, str]:
    """The policy in the JSON file ``path``, checked (check_policy); PolicyError on any problem."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise PolicyError(f"{path}: {'not a file' if path.exists() else 'no such file'}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise PolicyError(f"{path}: not a UTF-8 text file (a policy is JSON, as `convrot scan` writes)") from None
    except OSError as error:
        raise PolicyError(f"{path}: {error.strerror or error}") from None
    try:
        policy = json.loads(text, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as error:
        raise PolicyError(f"{path}: not valid JSON (line {error.lineno}, column {error.colno}: {error.msg})") from None
    except PolicyError as error:
        raise PolicyError(f"{path}: {error}") from None
    return check_policy(policy, str(path))


def check_policy_layers(policy: Mapping[str, str], linear_names: list[str], model: str, source: str = "policy"):
    """Every pattern of ``policy`` but the catch-all decides at least one of the model's Linear layers."""
    from convrot.policy import layer_kind

    deciding = {layer_kind(name, policy)[1] for name in linear_names}
    for pattern in policy:
        if pattern in deciding or pattern == CATCH_ALL:
            continue
        matched = [name for name in linear_names if fnmatch.fnmatchcase(name, pattern)]
        if matched:
            problem = f"decides no layer: every Linear it matches ({matched[0]}, ...) an earlier pattern decides"
        else:
            close = difflib.get_close_matches(pattern, linear_names, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"its Linear layers are named like {linear_names[0]!r}"
            problem = f"names no Linear layer of {model}; {hint}"
        raise PolicyError(f"{source}: {pattern!r} {problem}")


def linear_names(transformer) -> list[str]:
    from torch import nn

    return [name for name, module in transformer.named_modules() if isinstance(module, nn.Linear)]


def meta_transformer(model: str | None):
    """The transformer of a demo name, a pipeline directory or a hub id, built on the meta device from its
    config alone (no weight is read): for checking a policy's layer names."""
    import torch

    from .demo import demo_name, demo_transformer, is_demo

    if is_demo(model):
        with torch.random.fork_rng(devices=[]), torch.device("meta"):  # the demo seeds torch's generator
            return demo_transformer(demo_name(model))
    import diffusers

    from .sources import transformer_class_of

    transformer_class = getattr(diffusers, transformer_class_of(model))
    config = transformer_class.load_config(os.path.expanduser(model), subfolder="transformer")
    with torch.device("meta"):
        return transformer_class.from_config(config)
