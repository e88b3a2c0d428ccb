"""Console-script entry point: signal handling and malloc settings before the heavy imports.

Ctrl-C or SIGTERM at any moment, even while torch is still being imported, ends the run with
exit code 130 and a one-line message; nothing partial is written (outputs are atomic). Freed
memory is kept for reuse (:func:`clipguard.allocator.reuse_freed_memory`) before torch
allocates anything.
"""

from __future__ import annotations

import signal
import sys

from clipguard.allocator import reuse_freed_memory

EXIT_INTERRUPTED = 130


def _sigterm_as_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> None:
    """Run the ``clipguard`` command line."""
    signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    reuse_freed_memory()
    try:
        from clipguard.cli import app
        from clipguard.cli_errors import run_app
    except KeyboardInterrupt:
        sys.stderr.write("interrupted: no partial output was written\n")
        sys.exit(EXIT_INTERRUPTED)
    run_app(app)
