"""Built-in plugin: the trigger families that ship with the core (badnets)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from clipguard.hookspecs import hookimpl
from clipguard.triggers import BadNets


@hookimpl
def clipguard_register_triggers(register: Callable[[Any], None]) -> None:
    """Register the BadNets patch trigger."""
    register(BadNets())
