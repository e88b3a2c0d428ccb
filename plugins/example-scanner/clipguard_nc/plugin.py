"""The entry-point module of the package.

``pyproject.toml`` declares ``[project.entry-points.clipguard] neural-cleanse =
"clipguard_nc.plugin"``; clipguard imports this module and calls its ``@hookimpl`` functions.
It imports neither the scanner module nor torch: the scanner is registered as a
:class:`~clipguard.hookspecs.Deferred`, so ``clipguard --help`` and ``clipguard plugins`` stay
fast, and clipguard imports :mod:`clipguard_nc.scanner` when a scan uses it.
"""

from __future__ import annotations

from clipguard.hookspecs import Deferred, RegisterScanner, hookimpl

from clipguard_nc import __version__

SCANNER = Deferred(
    "clipguard_nc.scanner:NeuralCleanseScanner",
    "neural-cleanse",
    __version__,
    "per-class trigger inversion (Neural Cleanse) with the MAD anomaly index of mask sizes",
)


@hookimpl
def clipguard_register_scanners(register: RegisterScanner) -> None:
    """Register the ``neural-cleanse`` scanner (called once by clipguard's plugin manager)."""
    register(SCANNER)
