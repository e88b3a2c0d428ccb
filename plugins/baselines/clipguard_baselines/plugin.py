"""Registers the baseline purifiers (entry point ``baselines`` of ``clipguard-baselines``)."""

from __future__ import annotations

from clipguard.hookspecs import RegisterPurifier, hookimpl
from clipguard_baselines.finetune import CleanClipPurifier, FinetunePurifier, ZeroShotPurifier


@hookimpl
def clipguard_register_purifiers(register: RegisterPurifier) -> None:
    """Register ``zeroshot``, ``finetune`` and ``cleanclip``."""
    register(ZeroShotPurifier())
    register(FinetunePurifier())
    register(CleanClipPurifier())
