"""Registers the baseline purifiers (entry point ``baselines`` of ``clipguard-baselines``).

Each is a :class:`~clipguard.hookspecs.Deferred`: :mod:`clipguard_baselines.finetune` (and
torch) is imported only by a command that uses one.
"""

from __future__ import annotations

from clipguard.hookspecs import Deferred, RegisterPurifier, hookimpl
from clipguard_baselines import __version__

PURIFIERS = (
    Deferred(
        "clipguard_baselines.finetune:ZeroShotPurifier",
        "zeroshot",
        __version__,
        "no defence: hand-crafted prompts (reference)",
    ),
    Deferred(
        "clipguard_baselines.finetune:FinetunePurifier",
        "finetune",
        __version__,
        "supervised fine-tuning of the image encoder on the clean shots (FT)",
    ),
    Deferred(
        "clipguard_baselines.finetune:CleanClipPurifier",
        "cleanclip",
        __version__,
        "CleanCLIP-style fine-tuning of both encoders (multimodal + self-supervised)",
    ),
)


@hookimpl
def clipguard_register_purifiers(register: RegisterPurifier) -> None:
    """Register ``zeroshot``, ``finetune`` and ``cleanclip``."""
    for purifier in PURIFIERS:
        register(purifier)
