"""The plugin contract: pluggy hook specifications of the ``clipguard`` project.

A plugin is a module (or any object) with functions marked ``@hookimpl`` whose names are the
hooks below. Each hook receives a ``register`` callback and calls it once per thing it
provides, so one plugin can register several scanners, purifiers or trigger families::

    from clipguard.hookspecs import hookimpl

    @hookimpl
    def clipguard_register_scanners(register):
        register(MyScanner())

Installed plugins are found through the ``clipguard`` entry-point group
(``[project.entry-points.clipguard] myplugin = "my_package.plugin"``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

PROJECT = "clipguard"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def clipguard_register_scanners(register: Callable[[Any], None]) -> None:
    """Register backdoor scanners.

    Called once when the plugin manager builds its registry. Call ``register(scanner)`` for
    each :class:`clipguard.components.Scanner` instance the plugin provides. Names must be
    unique across all plugins; a duplicate is reported as an error naming both plugins and
    is not registered. Return value: ignored.
    """


@hookspec
def clipguard_register_purifiers(register: Callable[[Any], None]) -> None:
    """Register purifiers.

    Called once when the plugin manager builds its registry. Call ``register(purifier)`` for
    each :class:`clipguard.components.Purifier` instance. Names are unique across plugins,
    as for scanners. Return value: ignored.
    """


@hookspec
def clipguard_register_triggers(register: Callable[[Any], None]) -> None:
    """Register trigger families used to attack (the lab) and to evaluate (``--attack``).

    Called once when the plugin manager builds its registry. Call ``register(family)`` for
    each :class:`clipguard.triggers.TriggerFamily` instance. Names are unique across
    plugins. Return value: ignored.
    """
