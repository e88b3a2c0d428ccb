"""What plugins implement: scanners, purifiers, and the objects passed to and from them.

A plugin registers instances of :class:`Scanner` or :class:`Purifier` subclasses (see
:mod:`clipguard.hookspecs`). Each has a ``name``, a ``version``, a one-line ``description``
and a pydantic ``Config`` model holding its options; the CLI fills the config from
``--option key=value`` and ``--config FILE``, and the report records it.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from pydantic import BaseModel

from clipguard.model import ModelBundle
from clipguard.progress import Progress
from clipguard.prompts import PromptClassifier, PromptSet
from clipguard.report import NextStep, UnitCosts
from clipguard.triggers import TriggerFile

if TYPE_CHECKING:
    from clipguard.cost import ScanPlan

Verdict = Literal["backdoor", "clean", "inconclusive"]


@dataclass
class ShotSet:
    """The defender's clean labelled few-shot images, in pixel space ``[0, 1]``."""

    pixels: torch.Tensor
    labels: torch.Tensor
    classnames: list[str]

    @property
    def n_classes(self) -> int:
        return len(self.classnames)


@dataclass
class RunContext:
    """Per-run settings and recorders handed to a plugin.

    ``seed`` must make the plugin's result reproducible on CPU; ``progress`` shows bars for
    long loops; ``stage(name)`` times a stage into ``stage_seconds`` for the report.
    ``draws`` is how many shot draws the caller offers: ``draw_shots(i)`` is valid for
    ``1 <= i < draws``; 1 where no more may be drawn. Where ``draws > 1`` (``clipguard scan
    --draws N``), ``draw_shots(i)`` is another draw of as many images per class as the
    plugin's shots, with seed ``seed + i``, its images counted in the report's data hash;
    ``draw_shots`` is None where no more may be drawn (a scan with ``--draws 1``, a purify
    run, whose other images are its held-out evaluation, or a plugin called directly).
    ``held_out_shots``, offered by every scan, gives up to ``n`` images per class that are
    not among the run's own shots (drawn with ``seed``, so a plugin may measure on them what
    it fitted on its shots), fewer where the folder has fewer left; their images are
    counted in the report's data hash too.
    ``unit_costs`` (a scan) are the seconds of one pass of this model on this device, measured
    before the scan; ``deadline`` (``time.perf_counter()`` seconds; ``--max-minutes``) is when
    the run must end, None without a time budget: a scanner turns what is left into passes
    (:func:`clipguard.cost.affordable_images`). ``encoder_images``, where set, counts the
    images through the image encoder so far; ``stage`` then records each stage's images in
    ``stage_images``.
    """

    seed: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    progress: Progress = field(default_factory=lambda: Progress(quiet=True))
    stage_seconds: dict[str, float] = field(default_factory=dict)
    draws: int = 1
    draw_shots: Callable[[int], ShotSet] | None = None
    held_out_shots: Callable[[int], ShotSet | None] | None = None
    unit_costs: UnitCosts | None = None
    deadline: float | None = None
    encoder_images: Callable[[], int] | None = None
    stage_images: dict[str, int] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the enclosed block as stage ``name`` (accumulates when repeated), count its
        image-encoder images where ``encoder_images`` is set, and show it on the progress
        display's overall line."""
        start = time.perf_counter()
        images = self.encoder_images() if self.encoder_images is not None else 0
        try:
            with self.progress.stage(name):
                yield
        finally:
            self.stage_seconds[name] = self.stage_seconds.get(name, 0.0) + (
                time.perf_counter() - start
            )
            if self.encoder_images is not None:
                self.stage_images[name] = self.stage_images.get(name, 0) + (
                    self.encoder_images() - images
                )

    def seconds_left(self) -> float | None:
        """Seconds until ``deadline``, at least 0; None without a time budget."""
        if self.deadline is None:
            return None
        return max(self.deadline - time.perf_counter(), 0.0)

    def generator(self, offset: int = 0) -> torch.Generator:
        """A CPU random generator seeded with ``seed + offset``."""
        return torch.Generator().manual_seed(self.seed + offset)


@dataclass
class ScanOutcome:
    """What a scanner returns.

    ``artifacts`` maps file names to bytes; the core writes them atomically into the output
    folder and lists their paths in the report. ``trigger`` (when the scanner inverts one)
    lets a purifier reuse it in the same process. ``next_steps`` (for an ``inconclusive``
    verdict) say what to run to settle it: the report shows them.
    """

    verdict: Verdict
    score: float
    target_class: str | None
    explanation: str
    statistics: dict[str, Any] = field(default_factory=dict)
    artifacts: dict[str, bytes] = field(default_factory=dict)
    trigger: TriggerFile | None = None
    next_steps: list[NextStep] = field(default_factory=list)


@dataclass
class PurifyOutcome:
    """What a purifier returns: the purified classifier and the file that deploys it.

    ``prompts`` is set by prompt-tuning purifiers (written as ``prompts.safetensors``);
    fine-tuning purifiers put a model file in ``artifacts`` instead. ``trigger`` is the
    trigger the purifier used, if any (the report measures its ASR before and after).
    """

    classifier: PromptClassifier
    prompts: PromptSet | None = None
    statistics: dict[str, Any] = field(default_factory=dict)
    artifacts: dict[str, bytes] = field(default_factory=dict)
    trigger: TriggerFile | None = None
    trigger_target: str | None = None


class Scanner(ABC):
    """A backdoor scanner: looks at a model and clean shots, returns a verdict."""

    name: ClassVar[str]
    version: ClassVar[str]
    description: ClassVar[str] = ""
    Config: ClassVar[type[BaseModel]]

    @abstractmethod
    def scan(
        self, bundle: ModelBundle, shots: ShotSet, config: BaseModel, context: RunContext
    ) -> ScanOutcome:
        """Scan ``bundle`` using the clean ``shots``; ``config`` is an instance of ``Config``."""

    def plan(
        self, bundle: ModelBundle, shots: ShotSet, config: BaseModel, context: RunContext
    ) -> ScanPlan | None:
        """The passes each stage of :meth:`scan` will take at most with these arguments
        (``context.unit_costs`` and ``context.deadline`` set as the scan will have them),
        without scanning; None (the default) when the scanner cannot say: its cost is then
        reported as unknown (``clipguard scan --estimate``)."""
        return None


class Purifier(ABC):
    """A purifier: returns a classifier for ``shots.classnames`` without the backdoor.

    ``trigger`` is a trigger file from an earlier scan when the user passed one (already
    checked to fit the model and classes); a purifier that needs a trigger and gets none
    inverts its own.
    """

    name: ClassVar[str]
    version: ClassVar[str]
    description: ClassVar[str] = ""
    Config: ClassVar[type[BaseModel]]

    @abstractmethod
    def purify(
        self,
        bundle: ModelBundle,
        shots: ShotSet,
        config: BaseModel,
        context: RunContext,
        trigger: TriggerFile | None = None,
    ) -> PurifyOutcome:
        """Purify ``bundle`` for the classes of ``shots``."""
