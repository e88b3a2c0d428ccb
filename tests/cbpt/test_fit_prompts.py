"""A scan through prompts fitted to the clean shots (`fit_prompts`)."""

from __future__ import annotations

import torch

from clipguard.components import RunContext
from clipguard.prompts import PromptClassifier
from clipguard.triggers import MaskPatternTrigger, TriggerFile
from clipguard_cbpt import screening
from clipguard_cbpt.config import ScanConfig
from clipguard_cbpt.prompt_fit import scan_classifier
from clipguard_cbpt.purifier import CBPTPurifier, PurifyConfig, resolve_reference, tuning_target
from clipguard_cbpt.scanner import CBPTScanner
from tests.cbpt.test_screen_draws import SCREEN_ONLY


def test_by_default_a_scan_reads_the_model_through_the_hand_crafted_prompts(bundle, shots) -> None:
    reading = scan_classifier(bundle, shots, ScanConfig(), RunContext(seed=0))
    classifier = reading.classifier
    handcrafted = PromptClassifier(bundle, shots.classnames)
    assert not reading.fitted and reading.name == "hand-crafted" and reading.accuracy is None
    assert classifier.prompts is None
    assert torch.equal(classifier.class_features, handcrafted.class_features)


def test_fitted_prompts_classify_the_shots_at_least_as_well_as_the_hand_crafted(
    bundle, shots
) -> None:
    """The fitted classifier is tuned on the shots (clean cross-entropy), from the
    hand-crafted context, for this model; the same seed fits the same prompts."""
    config = ScanConfig(fit_prompts=True)
    context = RunContext(seed=0)
    fitted = scan_classifier(bundle, shots, config, context).classifier
    assert fitted.prompts is not None and fitted.prompts.model_sha256 == bundle.sha256
    assert "prompt fitting" in context.stage_seconds
    handcrafted = PromptClassifier(bundle, shots.classnames)

    def accuracy(classifier: PromptClassifier) -> float:
        return float((classifier.predict(shots.pixels) == shots.labels).float().mean())

    assert accuracy(fitted) >= accuracy(handcrafted)
    assert not torch.equal(fitted.class_features, handcrafted.class_features)
    again = scan_classifier(bundle, shots, config, RunContext(seed=0)).classifier
    assert torch.equal(again.class_features, fitted.class_features)


def test_a_scan_with_fitted_prompts_inverts_through_them(bundle, shots, monkeypatch) -> None:
    used: list[torch.Tensor] = []
    screen = screening.screen

    def recording(bundle, draw, config, context, classifier, budget):
        used.append(classifier.class_features)
        return screen(bundle, draw, config, context, classifier, budget)

    monkeypatch.setattr(screening, "screen", recording)
    context = RunContext(seed=0)
    outcome = CBPTScanner().scan(
        bundle, shots, ScanConfig(**SCREEN_ONLY, fit_prompts=True), context
    )
    expected = scan_classifier(bundle, shots, ScanConfig(fit_prompts=True), RunContext(seed=0))
    assert len(used) == 1 and torch.equal(used[0], expected.classifier.class_features)
    assert outcome.verdict in ("clean", "backdoor", "inconclusive")
    assert outcome.statistics["prompts"] == "fitted"
    assert outcome.trigger is not None and outcome.trigger.settings["prompts"] == "fitted"


def _held_out(shots):
    """A held_out_shots callable offering the shots themselves (the tests' data is small)."""

    def offer(per_class: int):
        return shots

    return offer


def test_auto_reads_through_fitted_prompts_when_they_gain_on_held_out_images(bundle, shots) -> None:
    """``fit_prompts="auto"`` compares both prompt sets on the held-out images and keeps the
    fitted ones only at a gain of ``fit_prompts_gain`` or more; without held-out images it
    keeps the hand-crafted prompts."""
    fitted = scan_classifier(bundle, shots, ScanConfig(fit_prompts=True), RunContext(seed=0))
    readings = {}
    for gain in (0.0, 1.0):
        context = RunContext(seed=0, held_out_shots=_held_out(shots))
        config = ScanConfig(fit_prompts="auto", fit_prompts_gain=gain)
        readings[gain] = scan_classifier(bundle, shots, config, context)
    for gain, reading in readings.items():
        accuracy = reading.accuracy
        assert accuracy is not None and reading.held_out_images == shots.labels.numel()
        assert reading.fitted == (accuracy["fitted"] - accuracy["hand-crafted"] >= gain)
        if reading.fitted:
            assert torch.equal(reading.classifier.class_features, fitted.classifier.class_features)
    # on its own shots the fitted prompts are at least as accurate (tuned on them)
    assert readings[0.0].fitted and not readings[1.0].fitted
    alone = scan_classifier(bundle, shots, ScanConfig(fit_prompts="auto"), RunContext(seed=0))
    assert not alone.fitted and alone.accuracy is None


def test_the_purifier_steers_away_from_the_suspect_of_a_scan_with_fitted_prompts() -> None:
    """A scan that read the model through fitted prompts names the target; the hand-crafted
    prompts' dominant class of its trigger is used only for other triggers."""
    trigger = MaskPatternTrigger(mask=torch.zeros(1, 4, 4), pattern=torch.zeros(3, 4, 4))
    names = ["cat", "dog", "deer"]

    def made_by(settings: dict) -> TriggerFile:
        return TriggerFile(trigger=trigger, model_sha256="", classnames=names, settings=settings)

    fitted = {"target_class": "deer", "options": {"fit_prompts": True}}
    assert tuning_target(made_by(fitted), names, dominant=0) == 2
    # since fit_prompts=auto, the scan records which prompts it read through
    auto = {"target_class": "deer", "prompts": "fitted", "options": {"fit_prompts": "auto"}}
    assert tuning_target(made_by(auto), names, dominant=0) == 2
    kept = {"target_class": "deer", "prompts": "hand-crafted", "options": {"fit_prompts": "auto"}}
    assert tuning_target(made_by(kept), names, dominant=0) == 0
    handcrafted = {"target_class": "deer", "options": {"fit_prompts": False}}
    assert tuning_target(made_by(handcrafted), names, dominant=0) == 0
    assert tuning_target(made_by({}), names, dominant=1) == 1
    unknown = {"target_class": "horse", "options": {"fit_prompts": True}}
    assert tuning_target(made_by(unknown), names, dominant=1) == 1


def test_a_trigger_of_a_fitted_scan_holds_the_purified_prompts_to_fitted_prompts(
    bundle, shots
) -> None:
    """``reference_prompts=auto`` (the default) follows the trigger's scan: fitted prompts for
    a ``fit_prompts`` scan, the hand-crafted prompts otherwise; a value set stays."""
    mask = torch.zeros(1, 16, 16)
    mask[:, -4:, -4:] = 1
    trigger = MaskPatternTrigger(mask=mask, pattern=torch.ones(3, 16, 16))
    names = list(shots.classnames)

    def made_by(fit_prompts: bool) -> TriggerFile:
        settings = {"target_class": names[0], "options": {"fit_prompts": fit_prompts}}
        return TriggerFile(trigger, bundle.sha256, names, settings=settings)

    assert PurifyConfig().reference_prompts == "auto"
    assert resolve_reference(PurifyConfig(), made_by(True)).reference_prompts == "fitted"
    assert resolve_reference(PurifyConfig(), made_by(False)).reference_prompts == "handcrafted"
    kept = PurifyConfig(reference_prompts="handcrafted")
    assert resolve_reference(kept, made_by(True)).reference_prompts == "handcrafted"
    config = PurifyConfig(steps=3, augmentations=0)
    for fit_prompts, expected, prompts_per_step in ((True, "fitted", 2), (False, "handcrafted", 1)):
        outcome = CBPTPurifier().purify(
            bundle, shots, config, RunContext(seed=0), trigger=made_by(fit_prompts)
        )
        assert outcome.statistics["reference_prompts"] == expected
        assert outcome.prompts.settings["options"]["reference_prompts"] == expected
        tuned = outcome.statistics["text_encoder_prompts"]
        assert tuned == prompts_per_step * 3 * len(names)
