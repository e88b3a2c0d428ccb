"""clipguard: audit CLIP models for backdoors and purify them with class-wise prompts.

What a plugin author needs is importable from here, as ``import clipguard`` then
``@clipguard.hookimpl`` and ``class MyScanner(clipguard.Scanner)``: the hook marker (and
:class:`~clipguard.hookspecs.Deferred`, to register a component loaded on first use), the
component base classes, the objects passed to and returned by them, and the model bundle.
They are imported on first access (PEP 562), so ``import clipguard`` alone does not import
torch.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from clipguard.components import (
        Purifier,
        PurifyOutcome,
        RunContext,
        Scanner,
        ScanOutcome,
        ShotSet,
        Verdict,
    )
    from clipguard.hookspecs import Deferred, hookimpl
    from clipguard.model import ModelBundle
    from clipguard.triggers import Trigger, TriggerFamily

try:
    __version__ = version("clipguard")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0+unknown"

#: public name -> the module that defines it
_EXPORTS = {
    "hookimpl": "clipguard.hookspecs",
    "Deferred": "clipguard.hookspecs",
    "Scanner": "clipguard.components",
    "Purifier": "clipguard.components",
    "ShotSet": "clipguard.components",
    "RunContext": "clipguard.components",
    "ScanOutcome": "clipguard.components",
    "PurifyOutcome": "clipguard.components",
    "Verdict": "clipguard.components",
    "TriggerFamily": "clipguard.triggers",
    "Trigger": "clipguard.triggers",
    "ModelBundle": "clipguard.model",
}

__all__ = [
    "Deferred",
    "ModelBundle",
    "Purifier",
    "PurifyOutcome",
    "RunContext",
    "ScanOutcome",
    "Scanner",
    "ShotSet",
    "Trigger",
    "TriggerFamily",
    "Verdict",
    "__version__",
    "hookimpl",
]


def __getattr__(name: str) -> Any:
    """The public names of :data:`__all__`, imported from their module on first access."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'clipguard' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
