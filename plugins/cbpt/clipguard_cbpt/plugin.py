"""Registers the CBPT scanner and the ``cbpt`` and ``coop`` purifiers with clipguard."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from clipguard.hookspecs import hookimpl
from clipguard_cbpt.nc import NCScanner
from clipguard_cbpt.purifier import CBPTPurifier, CoOpPurifier
from clipguard_cbpt.scanner import CBPTScanner


@hookimpl
def clipguard_register_scanners(register: Callable[[Any], None]) -> None:
    """Register the ``cbpt`` scanner and the per-class ``cbpt-nc`` scanner."""
    register(CBPTScanner())
    register(NCScanner())


@hookimpl
def clipguard_register_purifiers(register: Callable[[Any], None]) -> None:
    """Register the ``cbpt`` purifier and the ``coop`` baseline."""
    register(CBPTPurifier())
    register(CoOpPurifier())
