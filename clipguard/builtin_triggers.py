"""Built-in plugin: the trigger families that ship with the core (badnets)."""

from __future__ import annotations

from clipguard.hookspecs import RegisterTriggerFamily, hookimpl
from clipguard.triggers import BadNets


@hookimpl
def clipguard_register_triggers(register: RegisterTriggerFamily) -> None:
    """Register the BadNets patch trigger."""
    register(BadNets())
