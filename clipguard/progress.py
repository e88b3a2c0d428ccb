"""Progress bars for long work (rich), silenced by ``quiet``.

Bars go to stderr, so JSON printed on stdout stays machine-readable.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as RichProgress

T = TypeVar("T")


class Progress:
    """Shows progress bars on stderr unless ``quiet``; cheap to pass around."""

    def __init__(self, quiet: bool = False, console: Console | None = None) -> None:
        self.quiet = quiet
        self.console = console or Console(stderr=True)

    def _bar(self) -> RichProgress:
        return RichProgress(
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
            disable=self.quiet,
        )

    def track(
        self, items: Sequence[T] | Iterable[T], description: str, total: int | None = None
    ) -> Iterator[T]:
        """Iterate over ``items`` with a bar named ``description``."""
        if total is None and isinstance(items, Sequence):
            total = len(items)
        with self._bar() as bar:
            task = bar.add_task(description, total=total)
            for item in items:
                yield item
                bar.advance(task)

    @contextmanager
    def task(self, description: str, total: int) -> Iterator[Callable[[int], None]]:
        """A bar advanced by calling the yielded function with a step count (default 1)."""
        with self._bar() as bar:
            task_id = bar.add_task(description, total=total)

            def advance(steps: int = 1) -> None:
                bar.advance(task_id, steps)

            yield advance
