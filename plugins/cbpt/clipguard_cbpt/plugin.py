"""Registers the CBPT scanners and the ``cbpt`` and ``coop`` purifiers with clipguard.

Each is registered as a :class:`~clipguard.hookspecs.Deferred`: listing plugins or asking
for ``--help`` imports neither the scanner modules nor torch; a command that uses one
imports it then.
"""

from __future__ import annotations

from clipguard.hookspecs import Deferred, RegisterPurifier, RegisterScanner, hookimpl
from clipguard_cbpt import __version__

SCANNERS = (
    Deferred(
        "clipguard_cbpt.scanner:CBPTScanner",
        "cbpt",
        __version__,
        "per-class trigger inversion + text alignment + additive and warp reach; flags a class "
        "whose trigger is anomalously small or whose prompt drifted from its images (calibrated "
        "MAD indices), or that a small full-image change or warp reaches far beyond the others "
        "(or, with a trusted reference model, far beyond the reference)",
    ),
    Deferred(
        "clipguard_cbpt.nc:NCScanner",
        "cbpt-nc",
        __version__,
        "per-class targeted trigger inversion; flags a class whose trigger is anomalously small "
        "(MAD anomaly index)",
    ),
)
PURIFIERS = (
    Deferred(
        "clipguard_cbpt.purifier:CBPTPurifier",
        "cbpt",
        __version__,
        "class-wise prompt tuning: clean CE + triggered CE to the true class + anchor to the "
        "hand-crafted prompts, with an inverted trigger; the encoders stay frozen",
    ),
    Deferred(
        "clipguard_cbpt.purifier:CoOpPurifier",
        "coop",
        __version__,
        "CoOp-CSC prompt tuning on the clean shots only (baseline that ignores the backdoor)",
    ),
)


@hookimpl
def clipguard_register_scanners(register: RegisterScanner) -> None:
    """Register the ``cbpt`` scanner and the per-class ``cbpt-nc`` scanner."""
    for scanner in SCANNERS:
        register(scanner)


@hookimpl
def clipguard_register_purifiers(register: RegisterPurifier) -> None:
    """Register the ``cbpt`` purifier and the ``coop`` baseline."""
    for purifier in PURIFIERS:
        register(purifier)
