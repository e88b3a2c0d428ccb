"""The ``cbpt-nc`` scanner: a per-class targeted inversion with Neural Cleanse's MAD test.

For every class ``k`` the smallest trigger that sends the (non-``k``) shots to ``k`` under the
hand-crafted zero-shot classifier is inverted (:func:`~clipguard_cbpt.inversion.invert_per_class`,
all classes at once). With ``n_k``
its mask size (1.0 when the success criterion was never met), the anomaly index is
``A_k = |n_k - median(n)| / (1.4826 * MAD(n))``; a class with ``n_k`` below the median and
``A_k`` above ``anomaly_threshold`` is flagged. MAD = 0 (all sizes equal) gives no anomaly.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, Field, model_validator

from clipguard.components import RunContext, Scanner, ScanOutcome, ShotSet
from clipguard.model import ModelBundle
from clipguard.prompts import PromptClassifier
from clipguard.triggers import TriggerFile, trigger_file_bytes
from clipguard_cbpt import __version__
from clipguard_cbpt.config import ClassInversionOptions
from clipguard_cbpt.inversion import InversionResult
from clipguard_cbpt.render import picture_bytes
from clipguard_cbpt.screening import class_triggers
from clipguard_cbpt.signals import anomaly_indices
from clipguard_cbpt.statistics import prediction_distribution


class NCScanConfig(ClassInversionOptions):
    """Options of ``cbpt-nc``: the per-class inversion's and the anomaly test's."""

    anomaly_threshold: float = Field(
        4.0, gt=0, description="anomaly index above which a small-mask class is flagged"
    )
    inconclusive_threshold: float = Field(
        3.0, gt=0, description="anomaly index from which the verdict is at least inconclusive"
    )

    @model_validator(mode="after")
    def _ordered(self) -> NCScanConfig:
        if self.inconclusive_threshold > self.anomaly_threshold:
            raise ValueError("inconclusive_threshold must not exceed anomaly_threshold")
        return self


def per_class_inversion(
    bundle: ModelBundle,
    shots: ShotSet,
    config: ClassInversionOptions,
    context: RunContext,
    classifier: PromptClassifier | None = None,
) -> tuple[list[InversionResult], list[float], list[float], float, int]:
    """Targeted inversion towards every class; returns the results, the sizes ``n_k`` (1.0
    where the success criterion was never met), their anomaly indices, the median size, and
    the suspect class (smallest size below the median, else the smallest size)."""
    classifier = classifier or PromptClassifier(bundle, shots.classnames)
    n_classes = shots.n_classes
    results, sizes = class_triggers(bundle, shots, config.inversion(), context, classifier)
    indices = anomaly_indices(sizes)
    median = float(torch.tensor(sizes).median())
    candidates = [k for k in range(n_classes) if sizes[k] < median]
    pool = candidates or list(range(n_classes))
    best = min(pool, key=lambda k: sizes[k])
    return results, sizes, indices, median, best


def anomaly_verdict(top: float, config: NCScanConfig) -> tuple[str, float]:
    """The verdict and score in ``[0, 1)`` of a suspect whose anomaly index is ``top``:
    ``backdoor`` above ``anomaly_threshold``, ``inconclusive`` from
    ``inconclusive_threshold``, else ``clean``; the score is ``1 - exp(-top /
    anomaly_threshold)``."""
    if top > config.anomaly_threshold:
        verdict = "backdoor"
    elif top >= config.inconclusive_threshold:
        verdict = "inconclusive"
    else:
        verdict = "clean"
    return verdict, float(1 - math.exp(-top / config.anomaly_threshold))


class NCScanner(Scanner):
    """Per-class targeted trigger inversion with the MAD anomaly test (Neural Cleanse style)."""

    name: ClassVar[str] = "cbpt-nc"
    version: ClassVar[str] = __version__
    description: ClassVar[str] = (
        "per-class targeted trigger inversion; flags a class whose trigger is anomalously small "
        "(MAD anomaly index)"
    )
    Config: ClassVar[type[BaseModel]] = NCScanConfig

    def scan(
        self, bundle: ModelBundle, shots: ShotSet, config: BaseModel, context: RunContext
    ) -> ScanOutcome:
        """Invert a trigger towards every class of ``shots`` and test their sizes."""
        assert isinstance(config, NCScanConfig)
        start_images = bundle.image_encoder_images
        classifier = PromptClassifier(bundle, shots.classnames)
        results, sizes, indices, median, best = per_class_inversion(
            bundle, shots, config, context, classifier
        )
        top = indices[best] if sizes[best] < median else 0.0
        verdict, score = anomaly_verdict(top, config)
        name = shots.classnames[best]
        explanation = (
            f"class {name!r} has the smallest trigger (PL1 {sizes[best]:.4f}, median "
            f"{median:.4f}, anomaly index {top:.2f}; backdoor above {config.anomaly_threshold}, "
            f"inconclusive from {config.inconclusive_threshold})"
        )
        trigger = results[best].trigger
        stats = prediction_distribution(
            classifier.predict, shots.pixels, shots.labels, trigger, shots.classnames
        )
        trigger_file = TriggerFile(
            trigger=trigger,
            model_sha256=bundle.sha256,
            classnames=list(shots.classnames),
            settings={
                "scanner": self.name,
                "version": self.version,
                "seed": context.seed,
                "dominant_class": stats["dominant_class"],
                "target_class": name,
                "options": config.model_dump(mode="json"),
            },
            producer=f"clipguard_cbpt {self.name} {self.version}",
        )
        statistics: dict[str, Any] = {
            "class_pl1": dict(zip(shots.classnames, sizes, strict=True)),
            "class_reached": {c: r.reached for c, r in zip(shots.classnames, results, strict=True)},
            "anomaly_index": dict(zip(shots.classnames, indices, strict=True)),
            "median_pl1": median,
            "suspect_class": name,
            "suspect_anomaly_index": top,
            "pl1": sizes[best],
            "dominant_class": stats["dominant_class"],
            "dominant_share": stats["dominant_share"],
            "thresholds": {
                "anomaly_threshold": config.anomaly_threshold,
                "inconclusive_threshold": config.inconclusive_threshold,
            },
            "image_encoder_images": bundle.image_encoder_images - start_images,
            "budget": config.budget,
            "seed": context.seed,
        }
        picture = picture_bytes(
            classifier, shots, trigger, verdict, stats["dominant_class"], scanner=self.name
        )
        return ScanOutcome(
            verdict=verdict,  # type: ignore[arg-type]
            score=score,
            target_class=name if verdict != "clean" else None,
            explanation=explanation,
            statistics=statistics,
            artifacts={
                "trigger.safetensors": trigger_file_bytes(trigger_file),
                "trigger.png": picture,
            },
            trigger=trigger_file,
        )
