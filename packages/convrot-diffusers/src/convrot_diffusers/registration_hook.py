"""ConvRotConfig registered with diffusers as soon as both are imported, in either order.

``import convrot_diffusers`` must keep its promise (``<Transformer>.from_pretrained(saved_directory)``
finds ConvRot) without importing torch and diffusers itself, which would cost the ``convrot``
command seconds before it can print ``--help`` or reject an argument. So the package registers
at once when diffusers is already imported, and otherwise watches for diffusers' import and
registers right after it.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys


def _register() -> None:
    integration = sys.modules.get(f"{__package__}.diffusers_integration")
    if integration is not None and not hasattr(integration, "register"):
        # diffusers is being imported by diffusers_integration itself (``from convrot_diffusers import
        # quantize_pipeline`` before any diffusers import), which registers once it is defined.
        return
    from .diffusers_integration import register

    register()


class _AfterDiffusersImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the loader of the ``diffusers`` spec that the other finders find."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "diffusers":
            return None
        sys.meta_path.remove(self)  # one import to watch; find_spec below must not come back here
        spec = importlib.util.find_spec("diffusers")
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            _register()

        spec.loader.exec_module = exec_then_register
        return spec


def register_when_diffusers_is_imported() -> None:
    if "diffusers" in sys.modules:
        _register()
    elif not any(isinstance(finder, _AfterDiffusersImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AfterDiffusersImport())
