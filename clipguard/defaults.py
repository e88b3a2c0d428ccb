"""Defaults of the run options, shared by :mod:`clipguard.api` and the command line.

Kept apart from both so the command line shows them in ``--help`` without importing the API
(and torch).
"""

from __future__ import annotations

#: clean images per class a scanner or purifier may use unless told otherwise (``--shots``)
DEFAULT_SHOTS = 16
#: held-out images used for before/after metrics of ``purify`` unless told otherwise
DEFAULT_EVAL_LIMIT = 2000
#: minutes a scan may take unless told otherwise (``--max-minutes``): no time budget, so a
#: scan's work depends on its options and the model, never on how busy the machine is
DEFAULT_MAX_MINUTES: float | None = None
#: shot draws a scan offers its scanner unless told otherwise (:attr:`RunContext.draws`)
DEFAULT_DRAWS = 3
