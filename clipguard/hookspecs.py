"""The plugin contract: pluggy hook specifications of the ``clipguard`` project.

A plugin is a module (or any object) with functions marked ``@hookimpl`` whose names are the
hooks below. The registration hooks receive a ``register`` callback and call it once per
thing they provide, so one plugin can register several scanners, purifiers or trigger
families::

    import clipguard

    @clipguard.hookimpl
    def clipguard_register_scanners(register):
        register(MyScanner())

Installed plugins are found through the ``clipguard`` entry-point group
(``[project.entry-points.clipguard] myplugin = "my_package.plugin"``); ``CLIPGUARD_PLUGINS``
restricts which of them load (:mod:`clipguard.plugins`). A hook implementation may take any
subset of a hook's arguments, by name.

A registration hook may pass a :class:`Deferred` instead of an instance: the component is
then listed (``clipguard plugins``) from the names it carries and its module is imported
only when a command uses it, so listing plugins, ``--help`` and option errors never wait for
torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias

import pluggy

if TYPE_CHECKING:
    import typer

    from clipguard.components import Purifier, Scanner
    from clipguard.triggers import TriggerFamily

PROJECT = "clipguard"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@dataclass(frozen=True)
class Deferred:
    """A scanner, purifier or trigger family registered by import path, loaded on first use.

    ``target`` is ``"package.module:Name"``, a class (or any callable) that, called without
    arguments, returns the component; ``name``, ``version`` and ``description`` are what
    ``clipguard plugins`` lists without importing ``target``, and must be the component's
    own: the registry checks the name and version when it loads it. Pass it to ``register``
    in place of an instance::

        register(Deferred("my_package.scanner:MyScanner", "mine", __version__, "what it does"))
    """

    target: str
    name: str
    version: str
    description: str = ""

    def load(self) -> Any:
        """Import ``target`` and call it: the component (exceptions propagate)."""
        module_name, _, attribute = self.target.partition(":")
        factory = getattr(importlib.import_module(module_name), attribute)
        return factory()


#: the callback of :func:`clipguard_register_scanners`
RegisterScanner: TypeAlias = Callable[["Scanner | Deferred"], None]
#: the callback of :func:`clipguard_register_purifiers`
RegisterPurifier: TypeAlias = Callable[["Purifier | Deferred"], None]
#: the callback of :func:`clipguard_register_triggers`
RegisterTriggerFamily: TypeAlias = Callable[["TriggerFamily | Deferred"], None]


@hookspec
def clipguard_register_scanners(register: RegisterScanner) -> None:
    """Register backdoor scanners.

    :param register: Call it once per :class:`clipguard.Scanner` instance the plugin
        provides, or a :class:`Deferred` that loads one on first use. Its ``name`` is what
        ``clipguard scan --plugin NAME`` selects; names are unique across all plugins: a
        second registration of a name is reported as an error (in ``clipguard plugins`` and
        every report's ``errors``) naming both plugins, and is not registered. Anything that
        is not a ``Scanner`` is reported and skipped (for a :class:`Deferred`: when it is
        loaded, as a one-line error of the command that uses it).

    Called once per registry build: when a command or :mod:`clipguard.api` function first
    needs the registered components (the plugin manager is created on first use, and again
    after :func:`clipguard.plugins.reset_plugin_manager`). An exception raised here is
    reported as an error of the plugin; the other plugins still register.

    :returns: Nothing; a returned value is ignored.
    """


@hookspec
def clipguard_register_purifiers(register: RegisterPurifier) -> None:
    """Register purifiers.

    :param register: Call it once per :class:`clipguard.Purifier` instance the plugin
        provides (or :class:`Deferred`). Its ``name`` is what ``clipguard purify --plugin
        NAME`` selects; names are unique across plugins, with duplicates and wrong types
        reported as for :func:`clipguard_register_scanners`.

    Called once per registry build, like :func:`clipguard_register_scanners`.

    :returns: Nothing; a returned value is ignored.
    """


@hookspec
def clipguard_register_triggers(register: RegisterTriggerFamily) -> None:
    """Register trigger families, used to attack (the lab) and to evaluate (``--attack``).

    :param register: Call it once per :class:`clipguard.TriggerFamily` instance the plugin
        provides (or :class:`Deferred`). Its ``name`` is what ``--attack NAME`` selects;
        names are unique across plugins, with duplicates and wrong types reported as for
        :func:`clipguard_register_scanners`.

    Called once per registry build, before the scanners and purifiers are registered.

    :returns: Nothing; a returned value is ignored.
    """


@hookspec
def clipguard_register_commands(app: typer.Typer) -> None:
    """Add commands to the ``clipguard`` command line.

    :param app: The ``clipguard`` typer application. Add commands with ``app.command()``
        and command groups with ``app.add_typer(sub_app, name=...)``; a name already taken
        by the core or another plugin must not be reused. Every command added here gets the
        core's error handling (a :class:`~clipguard.errors.ClipguardError` becomes one line
        on stderr and exit code 2; Ctrl-C exit code 130).

    Called once, when :mod:`clipguard.cli` is imported (before the command line is parsed),
    for every plugin that loaded. An exception raised here is reported as an error of the
    plugin (``clipguard plugins``) and the plugin's commands are left out; the core's
    commands still work. The built-in lab (entry point ``lab``) adds ``clipguard lab ...``
    and ``clipguard demo`` through this hook.

    :returns: Nothing; a returned value is ignored.
    """
