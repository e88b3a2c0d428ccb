"""The prompts a cbpt scan reads the model through: the hand-crafted ones, or class-wise
prompts fitted to the shots where they classify held-out images better (``fit_prompts``)."""

from __future__ import annotations

from dataclasses import dataclass

from clipguard.components import RunContext, ShotSet
from clipguard.features import encode_images
from clipguard.metrics import clean_accuracy
from clipguard.model import ModelBundle
from clipguard.prompts import PromptClassifier, PromptSet
from clipguard_cbpt.config import ScanConfig
from clipguard_cbpt.probes import probe_held_out
from clipguard_cbpt.tuning import CoOpConfig, cache_features, tune_prompts


@dataclass
class PromptReading:
    """The prompts a scan reads the model through (:func:`scan_classifier`).

    ``fitted``: whether they are prompts fitted to the shots; ``accuracy``: with
    ``fit_prompts="auto"``, the held-out accuracy of the ``"hand-crafted"`` and the
    ``"fitted"`` prompts that decided it, on ``held_out_images`` images (None otherwise).
    """

    classifier: PromptClassifier
    fitted: bool
    accuracy: dict[str, float] | None = None
    held_out_images: int = 0

    @property
    def name(self) -> str:
        """``"fitted"`` or ``"hand-crafted"`` (the trigger file's ``prompts`` setting)."""
        return "fitted" if self.fitted else "hand-crafted"


def scan_classifier(
    bundle: ModelBundle, shots: ShotSet, config: ScanConfig, context: RunContext
) -> PromptReading:
    """The classifier a scan inverts and probes through: the hand-crafted prompts, or with
    ``fit_prompts`` class-wise prompts tuned on ``shots`` (stage "prompt fitting": the
    ``coop`` purifier's tuning, its augmented views drawn from ``context.generator(5)``).
    With ``fit_prompts="auto"`` both classify the reach probes' held-out images
    (:func:`probe_held_out`) and the fitted prompts are read through when they are at least
    ``config.fit_prompts_gain`` more accurate; without held-out images, the hand-crafted."""
    if config.fit_prompts is True:
        return PromptReading(fitted_classifier(bundle, shots, context), fitted=True)
    handcrafted = PromptClassifier(bundle, shots.classnames)
    held_out = None
    if config.fit_prompts == "auto":
        held_out = probe_held_out(context, config, len(shots.classnames))
    if held_out is None:
        return PromptReading(handcrafted, fitted=False)
    fitted = fitted_classifier(bundle, shots, context)
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
    )


def fitted_classifier(bundle: ModelBundle, shots: ShotSet, context: RunContext) -> PromptClassifier:
    """Class-wise prompts tuned on ``shots`` by the ``coop`` purifier's tuning (stage
    "prompt fitting", augmented views from ``context.generator(5)``)."""
    tuning = CoOpConfig(no_trigger_loss=True)  # as the coop purifier tunes
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
