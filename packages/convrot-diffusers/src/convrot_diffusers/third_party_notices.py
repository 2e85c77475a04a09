"""Notices of other libraries that a ``convrot`` run has no use for, silenced one by one.

Each filter drops one message at the logger that emits it; every other warning of
those libraries still shows.
"""

from __future__ import annotations

import logging

# transformers, without torchvision, falls back to its PIL image processors and says so once for each
# that diffusers' pipeline modules import (CLIPImageProcessor, SiglipImageProcessor); the PIL ones are
# what the pipelines here use.
_KNOWN = (("transformers.utils.import_utils", "requires torchvision (not installed); falling back to"),)


class _DropMessage(logging.Filter):
    def __init__(self, fragment: str):
        super().__init__()
        self.fragment = fragment

    def filter(self, record: logging.LogRecord) -> bool:
        return self.fragment not in record.getMessage()


def silence_known_notices() -> None:
    """Installs the filters (idempotent); works before the libraries are imported."""
    for logger_name, fragment in _KNOWN:
        logger = logging.getLogger(logger_name)
        if not any(isinstance(f, _DropMessage) and f.fragment == fragment for f in logger.filters):
            logger.addFilter(_DropMessage(fragment))
