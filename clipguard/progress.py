"""Progress on stderr for long work (rich): shown on a terminal only, silenced by ``quiet``.

Bars go to stderr, so a report printed on stdout stays machine-readable, and only when
stderr is a terminal: piped or redirected, nothing is drawn (no bar remnants in logs).

A command wraps its run in :func:`display`: one live display, cleared when the run ends,
with an overall line (the command, which stage it is in, counted, with the stage's sub-stage,
and the time elapsed) and, under it, the bar of the step under way with its count and its
ETA. The ETA is the step's own: how many steps a plugin's stages will take is not known
before they start, so no overall ETA is shown rather than an invented one. Code reports
through a :class:`Progress` (``track``, ``task``, ``stage``); outside a display each bar is
drawn on its own, as before.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TypeVar

from rich.console import Console, RenderableType
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as RichProgress
from rich.text import Text

T = TypeVar("T")


class _IfCounted(ProgressColumn):
    """``column`` for a task with a known total, nothing for one without (the overall line)."""

    def __init__(self, column: ProgressColumn) -> None:
        super().__init__()
        self.column = column

    def render(self, task: Task) -> RenderableType:
        return self.column.render(task) if task.total is not None else Text("")


class _Display:
    """The live display of one run: the overall line and one row per step under way."""

    def __init__(self, title: str, console: Console) -> None:
        self.title = title
        self.bars = RichProgress(
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            _IfCounted(MofNCompleteColumn()),
            TimeElapsedColumn(),
            _IfCounted(TimeRemainingColumn()),
            console=console,
            transient=True,
        )
        self.overall = self.bars.add_task(title, total=None)
        self.stages: list[str] = []
        self.stage_count = 0
        self.last_stage: str | None = None

    def _describe(self) -> None:
        path = " > ".join(self.stages)
        stage = f" · stage {self.stage_count}: {path}" if path else ""
        self.bars.update(self.overall, description=f"{self.title}{stage}")

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if not self.stages and name != self.last_stage:
            self.stage_count += 1
            self.last_stage = name
        self.stages.append(name)
        self._describe()
        try:
            yield
        finally:
            self.stages.pop()
            self._describe()

    @contextmanager
    def step(self, description: str, total: int | None) -> Iterator[TaskID]:
        task = self.bars.add_task(f"  {description}", total=total)
        try:
            yield task
        finally:
            self.bars.remove_task(task)


_active: ContextVar[_Display | None] = ContextVar("clipguard_progress_display", default=None)


@contextmanager
def display(title: str, quiet: bool = False, console: Console | None = None) -> Iterator[None]:
    """Show the progress of the enclosed run as one live display on ``console`` (default:
    stderr), cleared when the block ends, also on an exception. Nothing is shown when
    ``quiet`` or when the console is not a terminal. Every :class:`Progress` that is not
    quiet draws into it while it is open."""
    console = console or Console(stderr=True)
    if quiet or not console.is_terminal:
        yield
        return
    shown = _Display(title, console)
    token = _active.set(shown)
    try:
        with shown.bars:
            yield
    finally:
        _active.reset(token)


class Progress:
    """Reports progress: into the open :func:`display`, else as bars of its own on stderr.
    Shows nothing when ``quiet`` or when stderr is not a terminal; cheap to pass around."""

    def __init__(self, quiet: bool = False, console: Console | None = None) -> None:
        self.quiet = quiet
        self.console = console or Console(stderr=True)

    def _shown(self) -> _Display | None:
        return None if self.quiet else _active.get()

    def _bar(self) -> RichProgress:
        return RichProgress(
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
            disable=self.quiet or not self.console.is_terminal,
        )

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Name the stage the enclosed block is in, on the display's overall line (stages
        nest: a plugin's stage shows under the run's)."""
        shown = self._shown()
        if shown is None:
            yield
            return
        with shown.stage(name):
            yield

    def track(
        self, items: Sequence[T] | Iterable[T], description: str, total: int | None = None
    ) -> Iterator[T]:
        """Iterate over ``items`` with a bar named ``description``."""
        if total is None and isinstance(items, Sequence):
            total = len(items)
        with self.task(description, total) as advance:
            for item in items:
                yield item
                advance()

    @contextmanager
    def task(self, description: str, total: int | None) -> Iterator[Callable[[int], None]]:
        """A bar advanced by calling the yielded function with a step count (default 1)."""
        shown = self._shown()
        if shown is not None:
            with shown.step(description, total) as task_id:

                def advance_shown(steps: int = 1) -> None:
                    shown.bars.advance(task_id, steps)

                yield advance_shown
            return
        with self._bar() as bar:
            task_id = bar.add_task(description, total=total)

            def advance(steps: int = 1) -> None:
                bar.advance(task_id, steps)

            yield advance
