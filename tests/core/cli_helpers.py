"""Running the clipguard CLI in-process and checking its one-line errors."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner, Result

from clipguard.cli import app


def run_cli(*args: str | Path) -> Result:
    """Invoke ``clipguard ARGS`` in-process (stdout and stderr captured separately)."""
    return CliRunner().invoke(app, [str(arg) for arg in args])


def assert_one_line_error(result: Result, *fragments: str) -> str:
    """Exit code 2, exactly one line on stderr, no traceback, no internal error; return it."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    message = lines[0]
    assert message.startswith("error: "), message
    assert "Traceback" not in result.output
    assert "internal error" not in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message
