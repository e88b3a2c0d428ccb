"""Command-line options shared by the core's commands and the commands plugins add.

Declared once, so ``clipguard scan`` and a plugin's command (the lab's ``clipguard demo``)
spell, document and default an option alike. Only typer is imported here: a plugin's
command module can use these without loading the core's command line.
"""

from __future__ import annotations

from typing import Annotated

import typer

SeedOpt = Annotated[int, typer.Option("--seed", help="random seed (same seed, same result on CPU)")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars or summary")]
ThreadsOpt = Annotated[
    int | None,
    typer.Option(
        "--threads",
        envvar="CLIPGUARD_THREADS",
        min=1,
        help="torch CPU threads (default: torch's count, at most 2)",
        show_default=False,
    ),
]
DrawsOpt = Annotated[
    int,
    typer.Option(
        "--draws",
        help=(
            "shot draws the scanner may use: --shots per class each, seeds SEED, SEED+1, ... "
            "(the cbpt scanner screens each and judges by the median); purify offers them "
            "to its own inversion when no --trigger is given"
        ),
    ),
]
