"""Progress: one display on a terminal's stderr whatever the stdout format; nothing in pipes."""

from __future__ import annotations

import io
import json
from contextlib import contextmanager

import pytest
from rich.console import Console

from clipguard import cli, progress
from clipguard.components import RunContext
from clipguard.progress import Progress, display
from tests.core.cli_helpers import run_cli


def _console(terminal: bool) -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, force_terminal=terminal, width=120), buffer


def _refresh() -> None:
    shown = progress._active.get()
    if shown is not None:
        shown.bars.refresh()


def _run_stages() -> None:
    context = RunContext(progress=Progress())
    with context.stage("load model"):
        _refresh()
    with context.stage("scan"), context.stage("per-class inversion"):
        with context.progress.task("inverting class 0", 3) as advance:
            advance()
            _refresh()
        for _ in context.progress.track(range(2), "refining"):
            _refresh()


def test_a_terminal_shows_the_stage_count_and_the_current_step():
    console, buffer = _console(terminal=True)
    with display("clipguard scan", console=console):
        _run_stages()
    shown = buffer.getvalue()
    assert "clipguard scan · stage 1: load model" in shown
    assert "clipguard scan · stage 2: scan > per-class inversion" in shown
    assert "inverting class 0" in shown and "1/3" in shown
    assert "refining" in shown


@pytest.mark.parametrize(("terminal", "quiet"), [(False, False), (True, True)])
def test_nothing_is_drawn_in_a_pipe_or_when_quiet(terminal, quiet):
    console, buffer = _console(terminal)
    with display("clipguard scan", quiet=quiet, console=console):
        _run_stages()
    assert buffer.getvalue() == ""


def test_bars_outside_a_display_stay_off_a_pipe():
    console, buffer = _console(terminal=False)
    with Progress(console=console).task("loading", 2) as advance:
        advance(2)
    assert buffer.getvalue() == ""


def test_the_display_is_closed_by_an_error():
    console, _ = _console(terminal=True)
    with pytest.raises(RuntimeError), display("clipguard scan", console=console):
        raise RuntimeError("boom")
    assert progress._active.get() is None


@pytest.mark.parametrize(
    ("flags", "quiet"),
    [(["--json"], False), (["--format", "sarif"], False), ([], False), (["--json", "-q"], True)],
)
def test_the_stdout_format_no_longer_switches_progress_off(
    fixed_verdict, tiny_model_path, tiny_data, monkeypatch, flags, quiet
):
    asked = []

    @contextmanager
    def recording_display(title: str, quiet: bool = False, console=None):
        asked.append((title, quiet))
        yield

    monkeypatch.setattr(cli, "display", recording_display)
    result = run_cli(
        "scan", tiny_model_path, "--data", tiny_data, "--plugin", "fixed-verdict", "--shots",
        "2", "--draws", "1", *flags,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert asked == [("clipguard scan", quiet)]


def test_a_piped_run_prints_only_the_report(fixed_verdict, tiny_model_path, tiny_data):
    result = run_cli(
        "scan", tiny_model_path, "--data", tiny_data, "--plugin", "fixed-verdict", "--shots",
        "2", "--draws", "1", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    assert json.loads(result.stdout)["verdict"] == "clean"
