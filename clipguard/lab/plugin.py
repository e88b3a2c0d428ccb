"""The lab as a clipguard plugin (entry point ``lab`` of the ``clipguard`` package).

It registers the lab's trigger families (:data:`clipguard.lab.attacks.LAB_FAMILIES` and
:data:`clipguard.lab.attacks_extended.EXTENDED_FAMILIES`) and adds
the ``clipguard lab ...`` command group and ``clipguard demo`` to the command line, through
the same hooks as any installed plugin: the core never imports the lab.
"""

from __future__ import annotations

import typer

from clipguard.hookspecs import RegisterTriggerFamily, hookimpl
from clipguard.lab.attacks import LAB_FAMILIES
from clipguard.lab.attacks_extended import EXTENDED_FAMILIES


@hookimpl
def clipguard_register_triggers(register: RegisterTriggerFamily) -> None:
    """Register the lab's trigger families (badnets is registered by the core)."""
    for family in LAB_FAMILIES + EXTENDED_FAMILIES:
        register(family())


@hookimpl
def clipguard_register_commands(app: typer.Typer) -> None:
    """Add ``clipguard lab`` (data, build, zoo, badclip-patch) and ``clipguard demo``."""
    from clipguard.lab.cli import app as lab_app
    from clipguard.lab.cli import demo

    app.command("demo")(demo)
    app.add_typer(lab_app, name="lab", help="Build small clean and backdoored CLIP models.")
