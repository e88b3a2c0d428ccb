"""The prompts a cbpt scan reads the model through: the hand-crafted ones, or class-wise
prompts fitted to the shots where they classify held-out images better (``fit_prompts``),
within the prompt check's share of the scan's budget (:func:`prompt_check_cost`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from clipguard.components import RunContext, ShotSet
from clipguard.cost import text_image_equivalents
from clipguard.features import encode_images
from clipguard.metrics import clean_accuracy
from clipguard.model import ModelBundle
from clipguard.prompts import PromptClassifier, PromptEncoder, PromptSet
from clipguard_cbpt.config import ScanConfig
from clipguard_cbpt.probes import probe_held_out
from clipguard_cbpt.tuning import CoOpConfig, cache_features, tune_prompts

#: the most of a scan's budget the prompt check may take
PROMPT_SHARE = 0.1


@dataclass(frozen=True)
class PromptCheckCost:
    """What the prompt check's fitting costs in budget units (image-encoder images):
    ``images`` features of the shots' views and of the held-out images, and ``step_images``
    per text-encoder step of the fitting, the images of equal compute
    (:func:`~clipguard.cost.text_image_equivalents`); ``prompts`` per step."""

    images: int
    step_images: float
    prompts: int

    def budget_images(self, steps: int) -> int:
        """Budget units of a fitting of ``steps`` steps."""
        return self.images + math.ceil(steps * self.step_images)

    def affordable_steps(self, allowance: int | None, wanted: int) -> int:
        """The steps, at most ``wanted``, that ``allowance`` budget units pay for (all of
        them without an allowance)."""
        if allowance is None:
            return wanted
        left = allowance - self.images
        if left <= 0:
            return 0
        return min(wanted, int(left / self.step_images) if self.step_images > 0 else wanted)


def prompt_check_cost(bundle: ModelBundle, shots: ShotSet, held_out_images: int) -> PromptCheckCost:
    """The cost of fitting prompts to ``shots`` (the ``coop`` tuning's views: the shots and
    their augmented views) and classifying ``held_out_images`` held-out images."""
    tuning = CoOpConfig(no_trigger_loss=True)
    tokens = PromptEncoder(bundle, shots.classnames, tuning.n_context).length
    n_prompts = len(shots.classnames)
    return PromptCheckCost(
        images=(1 + tuning.augmentations) * len(shots.labels) + held_out_images,
        step_images=text_image_equivalents(bundle, n_prompts, tokens),
        prompts=n_prompts,
    )


@dataclass
class PromptReading:
    """The prompts a scan reads the model through (:func:`scan_classifier`).

    ``fitted``: whether they are prompts fitted to the shots; ``accuracy``: with
    ``fit_prompts="auto"``, the held-out accuracy of the ``"hand-crafted"`` and the
    ``"fitted"`` prompts that decided it, on ``held_out_images`` images (None otherwise).
    ``steps`` of ``steps_wanted`` text-encoder steps fitted (0 of 0 when no fitting was
    planned; fewer, or 0, when the budget cut it), ``budget_images`` the budget units it
    took."""

    classifier: PromptClassifier
    fitted: bool
    accuracy: dict[str, float] | None = None
    held_out_images: int = 0
    steps: int = 0
    steps_wanted: int = 0
    budget_images: int = 0

    @property
    def cut(self) -> bool:
        """Whether the budget cut the fitting short (or off)."""
        return self.steps < self.steps_wanted

    @property
    def name(self) -> str:
        """``"fitted"`` or ``"hand-crafted"`` (the trigger file's ``prompts`` setting)."""
        return "fitted" if self.fitted else "hand-crafted"


def planned_held_out(
    config: ScanConfig, context: RunContext, n_classes: int
) -> tuple[bool, tuple[torch.Tensor, torch.Tensor] | None]:
    """Whether the prompt check fits prompts, and the held-out images it compares the
    prompts on (``fit_prompts="auto"``; None otherwise): ``fit_prompts`` True fits always,
    ``"auto"`` where the run offers held-out images."""
    if config.fit_prompts is True:
        return True, None
    if config.fit_prompts == "auto":
        held_out = probe_held_out(context, config, n_classes)
        return held_out is not None, held_out
    return False, None


def scan_classifier(
    bundle: ModelBundle,
    shots: ShotSet,
    config: ScanConfig,
    context: RunContext,
    allowance: int | None = None,
) -> PromptReading:
    """The classifier a scan inverts and probes through: the hand-crafted prompts, or with
    ``fit_prompts`` class-wise prompts tuned on ``shots`` (stage "prompt fitting": the
    ``coop`` purifier's tuning, its augmented views drawn from ``context.generator(5)``, at
    most ``config.prompt_steps`` steps). With ``fit_prompts="auto"`` both classify the reach
    probes' held-out images (:func:`probe_held_out`) and the fitted prompts are read through
    when they are at least ``config.fit_prompts_gain`` more accurate; without held-out
    images, the hand-crafted. The fitting takes at most ``allowance`` budget units
    (:func:`prompt_check_cost`; None: no limit): fewer steps where they do not fit, and
    none (the hand-crafted prompts) where not even one does."""
    fits, held_out = planned_held_out(config, context, len(shots.classnames))
    if not fits:
        return PromptReading(PromptClassifier(bundle, shots.classnames), fitted=False)
    held_images = 0 if held_out is None else int(held_out[1].numel())
    cost = prompt_check_cost(bundle, shots, held_images)
    steps = cost.affordable_steps(allowance, config.prompt_steps)
    if steps == 0:
        return PromptReading(
            PromptClassifier(bundle, shots.classnames),
            fitted=False,
            steps_wanted=config.prompt_steps,
        )
    spent = {"steps": steps, "steps_wanted": config.prompt_steps}
    spent["budget_images"] = cost.budget_images(steps)
    if held_out is None:
        fitted = fitted_classifier(bundle, shots, context, steps)
        return PromptReading(fitted, fitted=True, **spent)
    handcrafted = PromptClassifier(bundle, shots.classnames)
    fitted = fitted_classifier(bundle, shots, context, steps)
    pixels, labels = held_out
    with context.stage("prompt fitting"):
        features = encode_images(bundle, pixels)
    accuracy = {
        name: clean_accuracy(each.logits_from_features(features).argmax(dim=1), labels)
        for name, each in (("hand-crafted", handcrafted), ("fitted", fitted))
    }
    use_fitted = accuracy["fitted"] - accuracy["hand-crafted"] >= config.fit_prompts_gain
    return PromptReading(
        fitted if use_fitted else handcrafted,
        fitted=use_fitted,
        accuracy=accuracy,
        held_out_images=int(labels.numel()),
        **spent,
    )


def fitted_classifier(
    bundle: ModelBundle, shots: ShotSet, context: RunContext, steps: int | None = None
) -> PromptClassifier:
    """Class-wise prompts tuned on ``shots`` by the ``coop`` purifier's tuning (stage
    "prompt fitting", augmented views from ``context.generator(5)``; ``steps`` text-encoder
    steps, the tuning's default when None)."""
    tuning = CoOpConfig(no_trigger_loss=True)  # as the coop purifier tunes
    if steps is not None:
        tuning = tuning.model_copy(update={"steps": steps})
    with context.stage("prompt fitting"):
        cache = cache_features(
            bundle,
            shots.pixels,
            shots.labels,
            None,
            tuning.augmentations,
            tuning.crop_scale,
            context.generator(5),
        )
        learned, _ = tune_prompts(
            bundle, list(shots.classnames), cache, None, tuning, context.progress
        )
    prompts = PromptSet(
        context=learned,
        classnames=list(shots.classnames),
        model_sha256=bundle.sha256,
        architecture=bundle.arch,
    )
    return PromptClassifier(bundle, shots.classnames, prompts)
