"""Defaults of the run options, shared by :mod:`clipguard.api` and the command line.

Kept apart from both so the command line shows them in ``--help`` without importing the API
(and torch).
"""

from __future__ import annotations

#: clean images per class a scanner or purifier may use unless told otherwise (``--shots``)
DEFAULT_SHOTS = 16
#: held-out images used for before/after metrics of ``purify`` unless told otherwise
DEFAULT_EVAL_LIMIT = 2000
#: minutes a scan may take unless told otherwise (``--max-minutes``; 0 on the command line,
#: None in the API: no time budget). A lab model's scan takes a minute or two, far inside it;
#: a real-size model on a CPU gets the part of the scan that fits, and a ``clean`` verdict the
#: cut leaves unsettled is ``inconclusive`` with the time that settles it
DEFAULT_MAX_MINUTES = 30.0
#: shot draws a scan offers its scanner unless told otherwise (:attr:`RunContext.draws`)
DEFAULT_DRAWS = 3
