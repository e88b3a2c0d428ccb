"""Built-in plugin: the trigger families that ship with the core (badnets).

Registered as a :class:`~clipguard.hookspecs.Deferred`, so building the registry does not
import :mod:`clipguard.triggers` (nor torch).
"""

from __future__ import annotations

from clipguard.hookspecs import Deferred, RegisterTriggerFamily, hookimpl

BADNETS = Deferred(
    "clipguard.triggers:BadNets",
    "badnets",
    "1",
    "square patch (checkerboard by default) stamped in a corner",
)


@hookimpl
def clipguard_register_triggers(register: RegisterTriggerFamily) -> None:
    """Register the BadNets patch trigger."""
    register(BADNETS)
