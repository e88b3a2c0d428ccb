"""Registers the baseline purifiers (entry point ``baselines``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from clipguard.hookspecs import hookimpl
from clipguard_baselines.finetune import CleanClipPurifier, FinetunePurifier, ZeroShotPurifier


@hookimpl
def clipguard_register_purifiers(register: Callable[[Any], None]) -> None:
    """Register ``zeroshot``, ``finetune`` and ``cleanclip``."""
    register(ZeroShotPurifier())
    register(FinetunePurifier())
    register(CleanClipPurifier())
