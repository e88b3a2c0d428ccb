"""The ``cbpt`` scanner: contrastive trigger inversion, then a verdict from mask size and collapse.

Procedure (see ``docs/method.md``):

1. :func:`~clipguard_cbpt.inversion.invert_contrastive` finds the smallest mask/pattern that
   collapses the features of the clean shots (restarts, adaptive mask weight).
2. Zero-shot predictions (hand-crafted prompts) on the triggered shots give the dominant
   class and its share.
3. Optionally (``refine``, default on) the trigger is refined towards that class with a
   Neural-Cleanse-like cross-entropy; its mask size ``refined_pl1`` is the second signal and
   the refined trigger is the one written out (it serves purification better).
4. Verdict: ``backdoor`` when the dominant share and the mask size both pass the backdoor
   thresholds, ``clean`` when either is on the clean side of the clean thresholds, otherwise
   ``inconclusive``. Thresholds are config fields; the report records the values used.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import BaseModel, Field, model_validator

from clipguard.components import RunContext, Scanner, ScanOutcome, ShotSet
from clipguard.model import ModelBundle
from clipguard.prompts import PromptClassifier
from clipguard.triggers import TriggerFile, trigger_file_bytes
from clipguard_cbpt import __version__
from clipguard_cbpt.inversion import (
    InversionConfig,
    InversionResult,
    invert_contrastive,
    invert_targeted,
    prediction_distribution,
)
from clipguard_cbpt.render import render_trigger_png

#: clean/triggered pairs shown in trigger.png
N_PICTURE_PAIRS = 8


class ScanConfig(InversionConfig):
    """Options of the ``cbpt`` scanner: the inversion's, plus the verdict thresholds."""

    share_backdoor: float = Field(
        0.8, ge=0, le=1, description="dominant-class share at or above which a model is suspect"
    )
    share_clean: float = Field(
        0.5, ge=0, le=1, description="dominant-class share below which a model is called clean"
    )
    pl1_backdoor: float = Field(
        0.02, gt=0, le=1, description="mask size (PL1) at or below which a model is suspect"
    )
    pl1_clean: float = Field(
        0.06, gt=0, le=1, description="mask size (PL1) above which a model is called clean"
    )

    @model_validator(mode="after")
    def _ordered(self) -> ScanConfig:
        if self.share_clean > self.share_backdoor:
            raise ValueError("share_clean must not exceed share_backdoor")
        if self.pl1_backdoor > self.pl1_clean:
            raise ValueError("pl1_backdoor must not exceed pl1_clean")
        return self


def decide(share: float, pl1: float, config: ScanConfig) -> tuple[str, float, str]:
    """Verdict, score in ``[0, 1]`` and a one-line explanation from the two signals.

    The score is the mean of the share evidence (``share`` scaled between ``share_clean``
    and ``share_backdoor``) and the mask evidence (``pl1`` scaled between ``pl1_clean`` and
    ``pl1_backdoor``), each clipped to ``[0, 1]``; it is 1 when both pass the backdoor side.
    """
    share_ev = _ramp(share, config.share_clean, config.share_backdoor)
    pl1_ev = _ramp(-pl1, -config.pl1_clean, -config.pl1_backdoor)
    score = (share_ev + pl1_ev) / 2
    facts = f"dominant share {share:.2f}, mask size PL1 {pl1:.4f}"
    if share >= config.share_backdoor and pl1 <= config.pl1_backdoor:
        return (
            "backdoor",
            score,
            (
                f"a small trigger ({facts}) sends the clean shots to one class: "
                f"share >= {config.share_backdoor} and PL1 <= {config.pl1_backdoor}"
            ),
        )
    if share < config.share_clean or pl1 > config.pl1_clean:
        return (
            "clean",
            score,
            (
                f"no small trigger collapses the shots onto one class ({facts}; clean when share < "
                f"{config.share_clean} or PL1 > {config.pl1_clean})"
            ),
        )
    return (
        "inconclusive",
        score,
        (
            f"signals between the thresholds ({facts}); backdoor needs share >= "
            f"{config.share_backdoor} and PL1 <= {config.pl1_backdoor}"
        ),
    )


def _ramp(value: float, low: float, high: float) -> float:
    if high <= low:
        return 1.0 if value >= high else 0.0
    return float(min(max((value - low) / (high - low), 0.0), 1.0))


def run_inversion(
    bundle: ModelBundle, shots: ShotSet, config: InversionConfig, context: RunContext
) -> tuple[InversionResult, InversionResult | None, dict[str, Any], dict[str, Any]]:
    """Contrastive inversion plus optional targeted refinement on ``shots``.

    Returns the contrastive result, the refined result (None when ``refine`` is off or no
    budget is left), the prediction statistics of the contrastive trigger, and those of the
    refined one (empty without refinement). Deterministic for ``context.seed``.
    """
    classifier = PromptClassifier(bundle, shots.classnames)
    start_images = bundle.image_encoder_images
    with context.stage("inversion"):
        generator = context.generator(0)
        contrastive = invert_contrastive(
            bundle,
            shots.pixels,
            config,
            generator,
            context.progress,
            budget=config.budget if not config.refine else int(config.budget * 0.75),
        )
        stats = prediction_distribution(
            classifier.predict, shots.pixels, shots.labels, contrastive.trigger, shots.classnames
        )
    refined: InversionResult | None = None
    refined_stats: dict[str, Any] = {}
    left = config.budget - (bundle.image_encoder_images - start_images)
    if config.refine and config.refine_steps > 0 and left > config.batch_size:
        with context.stage("refinement"):
            refined = invert_targeted(
                bundle,
                shots.pixels,
                shots.labels,
                classifier.class_features,
                int(stats["dominant_index"]),
                config,
                context.generator(1),
                start=contrastive.trigger,
                progress=context.progress,
                budget=left,
            )
            refined_stats = prediction_distribution(
                classifier.predict,
                shots.pixels,
                shots.labels,
                refined.trigger,
                shots.classnames,
            )
    return contrastive, refined, stats, refined_stats


class CBPTScanner(Scanner):
    """Contrastive trigger inversion (CBPT stage 1) with a verdict and a trigger picture."""

    name: ClassVar[str] = "cbpt"
    version: ClassVar[str] = __version__
    description: ClassVar[str] = (
        "contrastive trigger inversion: smallest trigger that collapses clean shots; "
        "verdict from its size and the share of shots sent to one class"
    )
    Config: ClassVar[type[BaseModel]] = ScanConfig

    def scan(
        self, bundle: ModelBundle, shots: ShotSet, config: BaseModel, context: RunContext
    ) -> ScanOutcome:
        """Scan ``bundle`` with the clean ``shots``; see the module docstring."""
        assert isinstance(config, ScanConfig)
        torch.set_num_threads(min(torch.get_num_threads(), 2))
        start_images = bundle.image_encoder_images
        contrastive, refined, stats, refined_stats = run_inversion(bundle, shots, config, context)
        final = refined if refined is not None else contrastive
        final_stats = refined_stats if refined is not None else stats
        # the verdict: dominant share of the contrastive trigger (untargeted evidence) and the
        # mask size of the trigger that sends the shots to that class
        share = float(stats["dominant_share"])
        pl1 = final.pl1 if (refined is None or refined.reached) else contrastive.pl1
        verdict, score, explanation = decide(share, pl1, config)
        target = stats["dominant_class"] if verdict != "clean" else None
        settings = config.model_dump(mode="json")
        trigger_file = TriggerFile(
            trigger=final.trigger,
            model_sha256=bundle.sha256,
            classnames=list(shots.classnames),
            settings={
                "scanner": self.name,
                "version": self.version,
                "seed": context.seed,
                "dominant_class": final_stats["dominant_class"],
                "options": settings,
            },
            producer=f"clipguard_cbpt {self.name} {self.version}",
        )
        statistics: dict[str, Any] = {
            "pl1": pl1,
            "contrastive_pl1": contrastive.pl1,
            "collapse_score": contrastive.collapse,
            "collapse_reached": contrastive.reached,
            "dominant_class": stats["dominant_class"],
            "dominant_share": share,
            "dominant_share_others": stats["dominant_share_others"],
            "class_distribution": stats["distribution"],
            "restarts": contrastive.restarts,
            "contrastive_steps": contrastive.steps,
            "thresholds": {
                "share_backdoor": config.share_backdoor,
                "share_clean": config.share_clean,
                "pl1_backdoor": config.pl1_backdoor,
                "pl1_clean": config.pl1_clean,
            },
            "image_encoder_images": bundle.image_encoder_images - start_images,
            "budget": config.budget,
            "seed": context.seed,
        }
        if refined is not None:
            statistics["refined"] = {
                "pl1": refined.pl1,
                "reached": refined.reached,
                "steps": refined.steps,
                "target_class": refined_stats["dominant_class"],
                "dominant_share": refined_stats["dominant_share"],
                "dominant_share_others": refined_stats["dominant_share_others"],
            }
        picture = picture_bytes(
            bundle, shots, final.trigger, verdict, final_stats["dominant_class"]
        )
        return ScanOutcome(
            verdict=verdict,  # type: ignore[arg-type]
            score=score,
            target_class=target,
            explanation=explanation,
            statistics=statistics,
            artifacts={
                "trigger.safetensors": trigger_file_bytes(trigger_file),
                "trigger.png": picture,
            },
            trigger=trigger_file,
        )


def picture_bytes(
    bundle: ModelBundle,
    shots: ShotSet,
    trigger: Any,
    verdict: str,
    dominant: str,
    scanner: str = "cbpt",
) -> bytes:
    """``trigger.png`` with up to :data:`N_PICTURE_PAIRS` shots of different classes."""
    chosen: list[int] = []
    seen: set[int] = set()
    for index, label in enumerate(shots.labels.tolist()):
        if label not in seen:
            seen.add(label)
            chosen.append(index)
        if len(chosen) == N_PICTURE_PAIRS:
            break
    clean = shots.pixels[chosen]
    classifier = PromptClassifier(bundle, shots.classnames)
    clean_pred = classifier.predict(clean).tolist()
    trig_pred = classifier.predict(trigger.apply(clean)).tolist()
    names = shots.classnames
    return render_trigger_png(
        trigger,
        clean,
        [names[k] for k in clean_pred],
        [names[k] for k in trig_pred],
        title=f"{scanner} scan: {verdict}; triggered shots go to '{dominant}'",
    )
