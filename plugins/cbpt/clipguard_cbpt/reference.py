"""The reference contrast (the ``reference`` option): how much further the additive reach probe
reaches each class on the suspect than on a trusted model of the same task.

A probe rich enough to express any full-image trigger also expresses a model's natural
shortcuts, and on a weak model those are as cheap as an implant, so the reach of one model
alone cannot tell them apart (docs/research.md). A trusted model of the same task (best, a
model trained the same way on clean data; the checkpoint the suspect was fine-tuned from
only after a brief fine-tune, docs/benchmarks.md) shares the shortcuts but not the
implant: the contrast of class ``k`` at a bound is ``reach_suspect(k) -
reach_reference(k)``, and its largest value over the classes and the bounds
:data:`CONTRAST_FACTORS` times the settled bound is the scan's reference evidence.

The bound is settled on the reference (:func:`~clipguard_cbpt.probes.probe_reach_in_band`
with the additive probe's band), so the suspect cannot move it. Both models read the classes
through the hand-crafted prompts, on the same shots and held-out images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from clipguard.components import RunContext, ShotSet
from clipguard.errors import InputError
from clipguard.model import ModelBundle, load_model
from clipguard.progress import Progress
from clipguard.prompts import PromptClassifier
from clipguard_cbpt.probe_families import AdditivePerturbation
from clipguard_cbpt.probes import (
    HELD_OUT_IMAGES,
    MedianBand,
    probe_cost,
    probe_held_out,
    probe_reach,
    probe_reach_in_band,
)

if TYPE_CHECKING:
    from clipguard_cbpt.config import ScanConfig

#: the multiples of the settled bound at which both models are probed (the first is 1: the
#: reference's settling fit is its first)
CONTRAST_FACTORS: tuple[float, ...] = (1.0, 2.0, 4.0)


@dataclass(frozen=True)
class ReferenceContrast:
    """Both models' reach per class at every bound probed, and the contrast between them."""

    #: sha256 of the reference checkpoint
    reference_sha256: str
    #: the absolute bounds probed (the settled bound times :data:`CONTRAST_FACTORS`)
    bounds: list[float]
    #: per bound, every class's reach on the suspect
    suspect_reach: list[list[float]]
    #: per bound, every class's reach on the reference
    reference_reach: list[list[float]]
    #: images through both models' image encoders
    images: int

    def per_class(self) -> list[float]:
        """Per class, its largest contrast over the bounds (suspect's reach less the
        reference's)."""
        return [
            max(s[k] - r[k] for s, r in zip(self.suspect_reach, self.reference_reach, strict=True))
            for k in range(len(self.suspect_reach[0]))
        ]

    def top(self) -> tuple[float, int, float]:
        """The largest contrast, its class and the bound it was measured at (the first of
        equals)."""
        cells = [
            (s[k] - r[k], k, self.bounds[i])
            for i, (s, r) in enumerate(zip(self.suspect_reach, self.reference_reach, strict=True))
            for k in range(len(s))
        ]
        return max(cells, key=lambda cell: cell[0])


def contrast_fits(band: MedianBand) -> int:
    """The most probe fits of :func:`reach_contrast`: the reference's bound search, its fits
    at the other factors, and the suspect's fit at every factor."""
    reference_fits = (1 + band.refits) + (len(CONTRAST_FACTORS) - 1)
    return reference_fits + len(CONTRAST_FACTORS)


def contrast_cost(
    labels: torch.Tensor,
    n_classes: int,
    max_images: int,
    steps: int,
    band: MedianBand,
    held_out_labels: torch.Tensor | None = None,
    max_held_out: int = HELD_OUT_IMAGES,
) -> tuple[int, int]:
    """The most encoder passes and forwards of :func:`reach_contrast` (both models together),
    each fit as :func:`~clipguard_cbpt.probes.probe_cost` counts it."""
    measured = probe_cost(labels, n_classes, max_images, 0, held_out_labels, max_held_out)
    passes = probe_cost(labels, n_classes, max_images, steps, held_out_labels, max_held_out)
    fits = contrast_fits(band)
    return fits * (passes - measured), fits * measured


def reach_contrast(
    suspect: ModelBundle,
    reference: ModelBundle,
    pixels: torch.Tensor,
    labels: torch.Tensor,
    classnames: list[str],
    family: AdditivePerturbation,
    steps: int,
    band: MedianBand,
    max_images: int,
    progress: Progress | None = None,
    held_out: tuple[torch.Tensor, torch.Tensor] | None = None,
    max_held_out: int = HELD_OUT_IMAGES,
) -> ReferenceContrast:
    """The reach of the additive probe ``family`` per class on ``suspect`` and on
    ``reference`` at :data:`CONTRAST_FACTORS` times the bound settled on the reference from
    ``family`` within ``band``, on the shots (``pixels``, ``labels``) and ``held_out`` images.

    Raises :class:`~clipguard.errors.InputError` when the two models take images of different
    sizes. Runs every fit in full (at most :func:`contrast_fits`; :func:`contrast_cost`
    images): the contrast is not cut by the scan's budget. Deterministic."""
    if reference.image_size != suspect.image_size:
        raise InputError(
            f"the reference model takes {reference.image_size}-pixel images and the suspect "
            f"{suspect.image_size}-pixel ones: a reference must be a model of the same task "
            "and input size"
        )
    unbounded = 10**12
    start = suspect.image_encoder_images + reference.image_encoder_images
    reference_features = PromptClassifier(reference, classnames).class_features
    first = probe_reach_in_band(
        reference, pixels, labels, reference_features, family, steps, max_images, unbounded,
        band, progress=progress, held_out=held_out, max_held_out=max_held_out,
    )  # fmt: skip
    assert isinstance(first.family, AdditivePerturbation)
    settled = first.family

    def reach(bundle: ModelBundle, features: torch.Tensor, factor: float) -> list[float]:
        return probe_reach(
            bundle, pixels, labels, features, settled.rescaled(factor), steps, max_images,
            unbounded, progress=progress, held_out=held_out, max_held_out=max_held_out,
        ).reach  # fmt: skip

    reference_reach = [first.reach] + [
        reach(reference, reference_features, factor) for factor in CONTRAST_FACTORS[1:]
    ]
    suspect_features = PromptClassifier(suspect, classnames).class_features
    suspect_reach = [reach(suspect, suspect_features, factor) for factor in CONTRAST_FACTORS]
    return ReferenceContrast(
        reference.sha256,
        [settled.epsilon * factor for factor in CONTRAST_FACTORS],
        suspect_reach,
        reference_reach,
        suspect.image_encoder_images + reference.image_encoder_images - start,
    )


def measure_reference(
    bundle: ModelBundle, shots: ShotSet, config: ScanConfig, context: RunContext
) -> ReferenceContrast | None:
    """The reference contrast of a scan of ``bundle`` (stage "reference contrast"): None
    without ``config.reference``; else the reference model loaded safely (as
    :func:`~clipguard.model.load_model` loads the suspect; its errors propagate) and
    :func:`reach_contrast` on the shots and the held-out images the reach probes measure on
    (:func:`~clipguard_cbpt.probes.probe_held_out`), from the additive probe's starting bound
    and band. The reference's encoder images are added to ``bundle``'s count."""
    if config.reference is None:
        return None
    reference = load_model(config.reference, device=context.device)
    spec = config.additive_probe()
    assert isinstance(spec.family, AdditivePerturbation)
    with context.stage("reference contrast"):
        contrast = reach_contrast(
            bundle,
            reference,
            shots.pixels,
            shots.labels,
            list(shots.classnames),
            spec.family,
            spec.steps,
            spec.band,
            config.probe_shots,
            context.progress,
            probe_held_out(context, config, len(shots.classnames)),
            config.probe_held_out_max,
        )
        # the reference's passes are this scan's work too: counted with the suspect's, so
        # the report's image count and the stage's actual cost include them
        bundle.image_encoder_images += reference.image_encoder_images
    return contrast
