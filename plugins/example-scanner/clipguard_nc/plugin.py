"""The entry-point module of the package.

``pyproject.toml`` declares ``[project.entry-points.clipguard] neural-cleanse =
"clipguard_nc.plugin"``; clipguard imports this module and calls its ``@hookimpl`` functions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from clipguard.hookspecs import hookimpl

from clipguard_nc.scanner import NeuralCleanseScanner


@hookimpl
def clipguard_register_scanners(register: Callable[[Any], None]) -> None:
    """Register the ``neural-cleanse`` scanner (called once by clipguard's plugin manager)."""
    register(NeuralCleanseScanner())
