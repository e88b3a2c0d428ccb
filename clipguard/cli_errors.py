"""Exit codes and error handling shared by every clipguard command (core and lab).

Exit codes: 0 success (``scan``: verdict clean), 1 (``scan``: backdoor found), 2 error,
3 (``scan``: verdict inconclusive), 130 interrupted; ``scan --fail-on`` chooses which
verdicts fail. An error is one line on stderr; ``CLIPGUARD_DEBUG=1`` adds the
traceback.
"""

from __future__ import annotations

import functools
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import typer
from rich.console import Console

from clipguard.errors import ClipguardError

EXIT_CLEAN, EXIT_BACKDOOR, EXIT_ERROR, EXIT_INCONCLUSIVE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
#: ``purify --fail-on-lost-class``: the purification gave up a class (a finding, like a backdoor)
EXIT_LOST_CLASS = 1

F = TypeVar("F", bound=Callable[..., Any])
_stderr = Console(stderr=True)


def fail(message: str) -> NoReturn:
    """Print the first line of ``message`` on stderr and exit 2."""
    if os.environ.get("CLIPGUARD_DEBUG") and sys.exc_info()[0] is not None:
        traceback.print_exc()
    first_line = message.splitlines()[0] if message else "error"
    _stderr.print(first_line, style="red", highlight=False, markup=False, soft_wrap=True)
    raise typer.Exit(EXIT_ERROR)


def handle_errors(function: F) -> F:
    """Decorator for commands: clipguard errors and bugs -> one line and exit 2; Ctrl-C -> 130."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except ClipguardError as error:
            fail(f"error: {error}")
        except KeyboardInterrupt:
            _stderr.print(
                "interrupted: no partial output was written", style="yellow", highlight=False
            )
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except Exception as error:  # a bug: still one line, the traceback on request
            fail(
                f"error: internal error: {type(error).__name__}: {error} "
                "(CLIPGUARD_DEBUG=1 shows more)"
            )

    return wrapper  # type: ignore[return-value]


def run_app(app: typer.Typer) -> None:
    """Run a typer app as a console script with the commands' error handling around it."""
    try:
        app()
    except ClipguardError as error:
        try:
            fail(f"error: {error}")
        except typer.Exit as exit_:
            sys.exit(exit_.exit_code)
    except KeyboardInterrupt:
        _stderr.print("interrupted: no partial output was written", style="yellow", highlight=False)
        sys.exit(EXIT_INTERRUPTED)
