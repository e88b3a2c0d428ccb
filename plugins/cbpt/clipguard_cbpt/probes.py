"""The reach probes: per class, the share of held-out images of the other classes that one
small universal transformation (:mod:`clipguard_cbpt.probe_families`), fitted on the other
shots, sends to it; with the bound adapted to the model, and run within a scan's budget."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch

from clipguard.components import RunContext
from clipguard.features import encode_images
from clipguard.model import ModelBundle
from clipguard.progress import Progress
from clipguard_cbpt.probe_families import ProbeFamily, fit_transforms, spread_rows

if TYPE_CHECKING:
    from clipguard_cbpt.config import ScanConfig

#: most held-out images (not shots) each class's probe reach is also measured on
HELD_OUT_IMAGES = 600


@dataclass
class ProbeReach:
    """A reach probe's result for every class (:func:`probe_reach`)."""

    #: the family of transformations probed
    family: ProbeFamily
    #: per class, the share of held-out other-class shots its transformation sends to it
    reach: list[float]
    #: optimisation steps run (fewer than asked when the budget ran short)
    steps: int
    #: why the probe did not run (the encoder budget), else None
    skipped: str | None = None
    #: every fit of :func:`probe_reach_in_band`, in order: its family and median class
    #: reach; empty for :func:`probe_reach` alone
    tried: list[tuple[ProbeFamily, float]] = field(default_factory=list)
    #: per class, how many images its reach was measured on (held-out shots and images)
    measured: list[int] = field(default_factory=list)
    #: per class, its reach on the held-out shots alone (``reach`` when no held-out images
    #: were measured): what :func:`probe_reach_in_band` judges a bound by
    shot_reach: list[float] = field(default_factory=list)

    @property
    def probe(self) -> str:
        """The probe's name (its family's)."""
        return self.family.name

    @property
    def median(self) -> float:
        """The median class's reach."""
        return float(statistics.median(self.reach))

    @property
    def shot_median(self) -> float:
        """The median class's reach on the held-out shots alone."""
        return float(statistics.median(self.shot_reach or self.reach))

    def evidence(self) -> list[float]:
        """Per class, its reach above the median reach of all classes (>= 0)."""
        if self.skipped is not None:
            return [0.0] * len(self.reach)
        return [max(0.0, r - self.median) for r in self.reach]


def _other_class_rows(
    labels: torch.Tensor, n_classes: int, max_images: int, among: torch.Tensor | None = None
) -> list[torch.Tensor]:
    """Per class ``k``, the rows (of those flagged in ``among``; all when None) whose label is
    not ``k``: at most ``max_images``, evenly spread."""
    others = [labels != k for k in range(n_classes)]
    if among is not None:
        others = [rows & among for rows in others]
    return [spread_rows(torch.nonzero(rows).flatten(), max_images) for rows in others]


def _probe_rows(
    labels: torch.Tensor, n_classes: int, max_images: int
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per class, the rows of :func:`probe_reach`: the even shots of the other classes it
    fits on and the odd ones it measures on (at most ``max_images`` each, evenly spread)."""
    even = torch.arange(len(labels)) % 2 == 0
    return (
        _other_class_rows(labels, n_classes, max_images, even),
        _other_class_rows(labels, n_classes, max_images, ~even),
    )


def _held_out_rows(
    labels: torch.Tensor | None, n_classes: int, max_images: int
) -> list[torch.Tensor]:
    """Per class, the rows of the held-out images (``labels``; none when None) of the other
    classes, which :func:`probe_reach` also measures its reach on (at most ``max_images``
    each, evenly spread)."""
    if labels is None:
        return [torch.zeros(0, dtype=torch.long) for _ in range(n_classes)]
    return _other_class_rows(labels, n_classes, max_images)


def probe_cost(
    labels: torch.Tensor,
    n_classes: int,
    max_images: int,
    steps: int,
    held_out_labels: torch.Tensor | None = None,
    max_held_out: int = HELD_OUT_IMAGES,
) -> int:
    """Encoder images of one whole :func:`probe_reach` fit of ``steps`` steps on shots with
    ``labels``, measured on held-out images with ``held_out_labels`` too."""
    fit, held = _probe_rows(labels, n_classes, max_images)
    extra = _held_out_rows(held_out_labels, n_classes, max_held_out)
    return steps * sum(len(r) for r in fit) + sum(len(r) for r in held + extra)


def probe_reach(
    bundle: ModelBundle,
    pixels: torch.Tensor,
    labels: torch.Tensor,
    class_features: torch.Tensor,
    family: ProbeFamily,
    steps: int,
    max_images: int,
    budget: int,
    chunk_images: int = 1024,
    progress: Progress | None = None,
    held_out: tuple[torch.Tensor, torch.Tensor] | None = None,
    max_held_out: int = HELD_OUT_IMAGES,
) -> ProbeReach:
    """For every class ``k``, how far one small universal transformation of ``family`` reaches.

    The shots are split by position (even / odd). A transformation ``T_k`` of ``family``, from
    the identity, is fitted with Adam (``family.lr``) for ``steps`` steps to send the even shots
    of the other classes (at most ``max_images``) to ``k``; the reach of ``k`` is the share of
    the odd shots of the other classes (at most ``max_images``), and of the ``held_out``
    images (pixels, labels: images that are not shots) of the other classes (at most
    ``max_held_out``), that ``T_k`` sends to ``k`` (``shot_reach``: the share of the odd
    shots alone). A backdoor whose
    trigger lies in (or near) the family makes its target reachable far beyond the other
    classes; a clean model's classes are reached alike (docs/method.md); the more images the
    reach is measured on, the less a clean class's reach varies by chance. All classes are
    optimised together (each loss depends on its own ``T_k`` only), in encoder calls of at
    most ``chunk_images`` images. Costs ``steps`` times the fitted images plus the measured
    ones (:func:`probe_cost`), and runs fewer steps, or none (``skipped``), when ``budget``
    encoder images do not allow them. Shows a progress bar on ``progress``. Deterministic.
    """
    n_classes = int(class_features.shape[0])
    fit, held = _probe_rows(labels, n_classes, max_images)
    extra = _held_out_rows(None if held_out is None else held_out[1], n_classes, max_held_out)
    per_step = sum(len(r) for r in fit)
    to_measure = sum(len(r) for r in held + extra)
    if per_step == 0 or to_measure == 0 or budget < per_step + to_measure:
        return ProbeReach(family, [0.0] * n_classes, 0, "encoder budget too small or no shots")
    steps = min(steps, (budget - to_measure) // per_step)
    progress = progress or Progress(quiet=True)
    with progress.task(f"{family.name} reach: {family.describe()}", max(steps, 1)) as advance:
        parameters = fit_transforms(
            bundle,
            pixels,
            fit,
            list(range(n_classes)),
            class_features,
            family,
            steps,
            chunk_images,
            on_step=advance,
        )
    reach, measured, shot_reach = [], [], []
    with torch.no_grad():
        for k in range(n_classes):
            images = [pixels[held[k]]]
            if held_out is not None:
                images.append(held_out[0][extra[k]])
            transformed = family.apply(torch.cat(images), parameters[k])
            measured.append(len(transformed))
            if len(transformed) == 0:
                reach.append(0.0)
                shot_reach.append(0.0)
                continue
            hits = (encode_images(bundle, transformed) @ class_features.T).argmax(dim=1) == k
            reach.append(float(hits.float().mean()))
            shots_hit = hits[: len(held[k])]
            shot_reach.append(float(shots_hit.float().mean()) if len(shots_hit) else 0.0)
    return ProbeReach(family, reach, steps, measured=measured, shot_reach=shot_reach)


@dataclass(frozen=True)
class MedianBand:
    """Where the median class's reach should lie for a probe's bound to suit a model
    (:func:`probe_reach_in_band`), and how many extra fits may bring it there."""

    low: float
    high: float
    refits: int

    def distance(self, median: float) -> float:
        """How far ``median`` lies outside the band (0 inside)."""
        return max(self.low - median, median - self.high, 0.0)


def probe_reach_in_band(
    bundle: ModelBundle,
    pixels: torch.Tensor,
    labels: torch.Tensor,
    class_features: torch.Tensor,
    family: ProbeFamily,
    steps: int,
    max_images: int,
    budget: int,
    band: MedianBand,
    keep: int = 0,
    chunk_images: int = 1024,
    progress: Progress | None = None,
    held_out: tuple[torch.Tensor, torch.Tensor] | None = None,
    max_held_out: int = HELD_OUT_IMAGES,
) -> ProbeReach:
    """:func:`probe_reach` with a bound suited to the model (reach measured on the odd
    shots and ``held_out`` images alike; the bound judged by the odd shots alone, the
    ``shot_median``, as the band was chosen, so held-out images sharpen the reach reported
    at the bound the shots choose).

    One bound does not suit every model: an additive change of 0.02 per pixel sends a median
    CIFAR-10 lab class 10-20 % of the other classes' held-out shots but a synthetic-set class
    almost none, and at 0.05 CIFAR-10 classes are all reached alike (docs/method.md). So the
    probe is fitted with ``family`` first; while the median class's reach lies below
    ``band.low`` the bound is doubled (:meth:`ProbeFamily.rescaled`) and the probe fitted
    again, while above ``band.high`` halved, at most ``band.refits`` times. It stops when the
    median enters the band, when the direction would turn (the band lies between two bounds a
    factor 2 apart), or when what is left of ``budget``, less ``keep`` images left for later
    work, does not pay for a whole fit. Returns
    the fit whose median lies nearest the band (the first of equals), with every fit in
    ``tried``. Costs each fit's encoder images (:func:`probe_reach`). Deterministic.
    """
    whole_fit = probe_cost(
        labels,
        int(class_features.shape[0]),
        max_images,
        steps,
        None if held_out is None else held_out[1],
        max_held_out,
    )
    start = bundle.image_encoder_images
    fits: list[ProbeReach] = []
    current, direction = family, 0
    while True:
        left = budget - (bundle.image_encoder_images - start)
        fits.append(
            probe_reach(
                bundle,
                pixels,
                labels,
                class_features,
                current,
                steps,
                max_images,
                left,
                chunk_images,
                progress,
                held_out,
                max_held_out,
            )
        )
        latest = fits[-1]
        if latest.skipped is not None or len(fits) > band.refits:
            break
        turn = 1 if latest.shot_median < band.low else -1 if latest.shot_median > band.high else 0
        left = budget - (bundle.image_encoder_images - start)
        if turn == 0 or turn == -direction or left - keep < whole_fit:
            break
        current, direction = current.rescaled(2.0**turn), turn
    best = min(fits, key=lambda f: band.distance(f.shot_median))
    return replace(best, tried=[(f.family, f.shot_median) for f in fits])


#: the band of a probe that keeps its bound: one fit, whatever its median
FIXED_BOUND = MedianBand(0.0, 1.0, refits=0)


@dataclass(frozen=True)
class ProbeSpec:
    """A reach probe as configured: its family at the starting bound, its Adam steps, and
    the band its median class reach is brought into (:data:`FIXED_BOUND`: the bound is
    kept)."""

    family: ProbeFamily
    steps: int
    band: MedianBand = FIXED_BOUND


def probe_held_out(
    context: RunContext, config: ScanConfig, n_classes: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The images (pixels, labels) besides the shots that the reach probes also measure on:
    ``config.probe_held_out`` per class from :attr:`RunContext.held_out_shots`, fewer where
    ``n_classes - 1`` classes of them would exceed ``config.probe_held_out_max``; None where
    the run offers none (a purify run, a plugin called directly) or the option is 0."""
    if context.held_out_shots is None or config.probe_held_out == 0:
        return None
    needed = math.ceil(config.probe_held_out_max / max(n_classes - 1, 1))
    images = context.held_out_shots(min(config.probe_held_out, needed))
    return None if images is None else (images.pixels, images.labels)


def run_probe(
    bundle: ModelBundle,
    pixels: torch.Tensor,
    labels: torch.Tensor,
    class_features: torch.Tensor,
    spec: ProbeSpec,
    max_images: int,
    budget: int,
    keep: int = 0,
    progress: Progress | None = None,
    held_out: tuple[torch.Tensor, torch.Tensor] | None = None,
    max_held_out: int = HELD_OUT_IMAGES,
) -> ProbeReach:
    """The reach probe of ``spec`` on the shots
    (:func:`~clipguard_cbpt.inversion.probe_reach_in_band`), its reach measured on the
    held-out shots and ``held_out`` images: fits until the median class's reach lies in its
    band, the extra fits leaving ``keep`` images of ``budget`` unspent (one fit for
    :data:`FIXED_BOUND`)."""
    return probe_reach_in_band(
        bundle,
        pixels,
        labels,
        class_features,
        spec.family,
        spec.steps,
        max_images,
        budget,
        spec.band,
        keep,
        progress=progress,
        held_out=held_out,
        max_held_out=max_held_out,
    )
