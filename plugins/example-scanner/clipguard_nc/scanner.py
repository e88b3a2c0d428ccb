"""The ``neural-cleanse`` scanner: per-class trigger inversion and the MAD anomaly index.

Contract (what clipguard passes and expects, see :class:`clipguard.components.Scanner`):
``scan(bundle, shots, config, context)`` gets a frozen model bundle, the clean shots in pixel
space, a validated :class:`NeuralCleanseConfig` and a run context (seed, progress, timers),
and returns a :class:`~clipguard.components.ScanOutcome`:

* ``verdict`` ``backdoor`` when a class needs an anomalously small trigger (see
  :func:`clipguard_nc.anomaly.decide`), ``inconclusive`` in the band
  ``[inconclusive_from, threshold]`` of the anomaly index or when too few classes could be
  inverted, ``clean`` otherwise;
* ``score`` the anomaly index of the most anomalous class below the median;
* ``target_class`` the most anomalous flagged class (backdoor only);
* artefacts ``neural-cleanse-classes.json`` (every class's mask size, anomaly index, success
  rate) and, for a backdoor verdict, ``trigger.safetensors`` (a clipguard trigger file of the
  target's trigger, readable by :func:`clipguard.triggers.load_trigger_file`).
"""

from __future__ import annotations

import json
from typing import Any

from clipguard.components import RunContext, Scanner, ScanOutcome, ShotSet
from clipguard.model import ModelBundle
from clipguard.prompts import HANDCRAFTED_TEMPLATE, handcrafted_text_features
from clipguard.triggers import MaskPatternTrigger, TriggerFile, trigger_file_bytes
from pydantic import BaseModel, ConfigDict, Field, model_validator

from clipguard_nc import __version__
from clipguard_nc.anomaly import Decision, decide
from clipguard_nc.inversion import InversionResult, InversionSettings, invert_classes, plan_steps

CLASSES_ARTIFACT = "neural-cleanse-classes.json"
TRIGGER_ARTIFACT = "trigger.safetensors"


class NeuralCleanseConfig(BaseModel):
    """Options of the ``neural-cleanse`` scanner (``--option key=value`` or ``--config FILE``)."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(80, ge=1, description="most optimisation steps per class")
    lr: float = Field(0.1, gt=0, description="Adam learning rate of the tanh parameters")
    batch_size: int = Field(8, ge=1, description="triggered shots per class and step")
    threshold: float = Field(2.0, gt=0, description="anomaly index above which a class is flagged")
    inconclusive_from: float = Field(
        1.5,
        ge=0,
        description="anomaly index from which an unflagged class makes the verdict "
        "inconclusive (band [inconclusive_from, threshold])",
    )
    min_classes: int = Field(
        5, ge=3, description="fewest classes the anomaly index is computed over (else inconclusive)"
    )
    success_rate: float = Field(
        0.95, gt=0, le=1, description="share of triggered shots that must reach the class"
    )
    lambda_init: float = Field(1.0, gt=0, description="mask weight once the class is first reached")
    lambda_up: float = Field(1.5, gt=1, description="factor raising the mask weight")
    lambda_down: float = Field(1.5**1.5, gt=1, description="factor lowering the mask weight")
    patience: int = Field(5, ge=1, description="steps above/below the success rate before a change")
    early_stop_patience: int = Field(
        30, ge=0, description="stop a class after this many steps without a smaller mask (0: never)"
    )
    mask_init: float = Field(0.1, gt=0, lt=1, description="initial mask value")
    image_budget: int | None = Field(
        12_000,
        ge=1,
        description="most images through the image encoder for the whole scan "
        "(caps the steps; null: no cap)",
    )

    @model_validator(mode="after")
    def _band(self) -> NeuralCleanseConfig:
        if self.inconclusive_from > self.threshold:
            raise ValueError("inconclusive_from must not exceed threshold")
        return self

    def inversion_settings(self) -> InversionSettings:
        """The optimisation knobs as :class:`~clipguard_nc.inversion.InversionSettings`."""
        return InversionSettings(
            steps=self.steps,
            lr=self.lr,
            batch_size=self.batch_size,
            success_rate=self.success_rate,
            lambda_init=self.lambda_init,
            lambda_up=self.lambda_up,
            lambda_down=self.lambda_down,
            patience=self.patience,
            early_stop_patience=self.early_stop_patience,
            mask_init=self.mask_init,
            image_budget=self.image_budget,
        )


def _percent(value: float) -> str:
    return f"{100 * value:.2f} %"


class NeuralCleanseScanner(Scanner):
    """Per-class Neural Cleanse: a class needing an anomalously small trigger is the target."""

    name = "neural-cleanse"
    version = __version__
    description = (
        "per-class trigger inversion (Neural Cleanse) with the MAD anomaly index of mask sizes"
    )
    Config = NeuralCleanseConfig

    def scan(
        self, bundle: ModelBundle, shots: ShotSet, config: BaseModel, context: RunContext
    ) -> ScanOutcome:
        """Invert a trigger towards every class and flag anomalously small ones.

        Deterministic for ``context.seed`` on CPU. Passes at most ``config.image_budget``
        images through the image encoder (plus the text encoder once per class).
        """
        assert isinstance(config, NeuralCleanseConfig)
        classnames = list(shots.classnames)
        n_classes = len(classnames)
        class_features = handcrafted_text_features(bundle, classnames)
        generator = context.generator(offset=7919)
        settings = config.inversion_settings()
        total, _ = plan_steps(settings, shots.labels, n_classes)
        with (
            context.stage("inversion"),
            context.progress.task(
                f"neural-cleanse: inverting {n_classes} classes", total=total
            ) as advance,
        ):
            inversion = invert_classes(
                bundle,
                shots.pixels,
                shots.labels,
                class_features,
                settings,
                generator,
                advance=advance,
            )
        sizes = [c.mask_size for c in inversion.classes]
        reached = [c.reached for c in inversion.classes]
        decision = decide(
            sizes, reached, config.threshold, config.inconclusive_from, config.min_classes
        )
        per_class = _per_class_table(classnames, inversion, decision)
        artifacts = {CLASSES_ARTIFACT: (json.dumps(per_class, indent=2) + "\n").encode("utf-8")}
        trigger: TriggerFile | None = None
        target_name: str | None = None
        if decision.verdict == "backdoor" and decision.target is not None:
            target_name = classnames[decision.target]
            found = inversion.classes[decision.target]
            trigger = TriggerFile(
                trigger=MaskPatternTrigger(
                    mask=found.mask, pattern=found.pattern, family="inverted"
                ),
                model_sha256=bundle.sha256,
                classnames=classnames,
                settings={
                    **config.model_dump(mode="json"),
                    "target_class": target_name,
                    "anomaly_index": decision.indices[decision.target],
                    "mask_size": found.mask_size,
                    "seed": context.seed,
                    "template": HANDCRAFTED_TEMPLATE,
                },
                producer=f"{self.name} {self.version}",
            )
            artifacts[TRIGGER_ARTIFACT] = trigger_file_bytes(trigger)
        return ScanOutcome(
            verdict=decision.verdict,
            score=float(decision.score),
            target_class=target_name,
            explanation=_explain(classnames, sizes, decision, config),
            statistics=_statistics(classnames, inversion, decision, per_class),
            artifacts=artifacts,
            trigger=trigger,
        )


def _per_class_table(
    classnames: list[str], inversion: InversionResult, decision: Decision
) -> list[dict[str, Any]]:
    return [
        {
            "class": classnames[c.class_index],
            "mask_size": round(c.mask_size, 6),
            "anomaly_index": round(decision.indices[c.class_index], 4),
            "below_median": c.mask_size < decision.median,
            "flagged": c.class_index in decision.flagged,
            "reached": c.reached,
            "success": None if c.success is None else round(c.success, 4),
            "steps": c.steps,
            "final_lambda": round(c.final_lambda, 6),
        }
        for c in inversion.classes
    ]


def _statistics(
    classnames: list[str],
    inversion: InversionResult,
    decision: Decision,
    per_class: list[dict[str, Any]],
) -> dict[str, Any]:
    return {
        "mask_sizes": {row["class"]: row["mask_size"] for row in per_class},
        "anomaly_indices": {row["class"]: row["anomaly_index"] for row in per_class},
        "flagged": [classnames[k] for k in decision.flagged],
        "candidate_class": None if decision.candidate is None else classnames[decision.candidate],
        "median_mask_size": round(decision.median, 6),
        "scale": round(decision.scale, 6),
        "scale_kind": decision.scale_kind,
        "classes_reached": sum(1 for row in per_class if row["reached"]),
        "steps_planned": inversion.steps_planned,
        "steps_run": inversion.steps_run,
        "image_encoder_images": inversion.image_encoder_images,
        "budget_limited": inversion.budget_limited,
        "rule": decision.reason,
    }


def _explain(
    classnames: list[str], sizes: list[float], decision: Decision, config: NeuralCleanseConfig
) -> str:
    median = _percent(decision.median)
    if decision.candidate is None:
        return f"no class below the median mask size ({median}); {decision.reason}"
    name = classnames[decision.candidate]
    size = _percent(sizes[decision.candidate])
    index = decision.score
    if decision.verdict == "backdoor":
        return (
            f"class {name!r} needs a trigger of {size} of the image against a median of "
            f"{median} (anomaly index {index:.2f} > {config.threshold:g})"
        )
    if decision.verdict == "inconclusive":
        return (
            f"{decision.reason}: smallest-trigger class {name!r} ({size} of the image, median "
            f"{median}, anomaly index {index:.2f}, threshold {config.threshold:g})"
        )
    return (
        f"no anomalously small trigger: most anomalous class {name!r} ({size}, median {median}, "
        f"anomaly index {index:.2f} < {config.inconclusive_from:g})"
    )
