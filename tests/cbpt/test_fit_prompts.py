"""A scan through prompts fitted to the clean shots (`fit_prompts`)."""

from __future__ import annotations

import torch

from clipguard.components import RunContext
from clipguard.prompts import PromptClassifier
from clipguard.triggers import MaskPatternTrigger, TriggerFile
from clipguard_cbpt import scanner
from clipguard_cbpt.purifier import tuning_target
from clipguard_cbpt.scanner import CBPTScanner, ScanConfig, scan_classifier
from tests.cbpt.test_screen_draws import SCREEN_ONLY


def test_by_default_a_scan_reads_the_model_through_the_hand_crafted_prompts(bundle, shots) -> None:
    classifier = scan_classifier(bundle, shots, ScanConfig(), RunContext(seed=0))
    handcrafted = PromptClassifier(bundle, shots.classnames)
    assert classifier.prompts is None
    assert torch.equal(classifier.class_features, handcrafted.class_features)


def test_fitted_prompts_classify_the_shots_at_least_as_well_as_the_hand_crafted(
    bundle, shots
) -> None:
    """The fitted classifier is tuned on the shots (clean cross-entropy), from the
    hand-crafted context, for this model; the same seed fits the same prompts."""
    config = ScanConfig(fit_prompts=True)
    context = RunContext(seed=0)
    fitted = scan_classifier(bundle, shots, config, context)
    assert fitted.prompts is not None and fitted.prompts.model_sha256 == bundle.sha256
    assert "prompt fitting" in context.stage_seconds
    handcrafted = PromptClassifier(bundle, shots.classnames)

    def accuracy(classifier: PromptClassifier) -> float:
        return float((classifier.predict(shots.pixels) == shots.labels).float().mean())

    assert accuracy(fitted) >= accuracy(handcrafted)
    assert not torch.equal(fitted.class_features, handcrafted.class_features)
    again = scan_classifier(bundle, shots, config, RunContext(seed=0))
    assert torch.equal(again.class_features, fitted.class_features)


def test_a_scan_with_fitted_prompts_inverts_through_them(bundle, shots, monkeypatch) -> None:
    used: list[torch.Tensor] = []
    screen = scanner.screen

    def recording(bundle, draw, config, context, classifier, budget):
        used.append(classifier.class_features)
        return screen(bundle, draw, config, context, classifier, budget)

    monkeypatch.setattr(scanner, "screen", recording)
    context = RunContext(seed=0)
    outcome = CBPTScanner().scan(
        bundle, shots, ScanConfig(**SCREEN_ONLY, fit_prompts=True), context
    )
    expected = scan_classifier(bundle, shots, ScanConfig(fit_prompts=True), RunContext(seed=0))
    assert len(used) == 1 and torch.equal(used[0], expected.class_features)
    assert outcome.verdict in ("clean", "backdoor", "inconclusive")


def test_the_purifier_steers_away_from_the_suspect_of_a_scan_with_fitted_prompts() -> None:
    """A scan that read the model through fitted prompts names the target; the hand-crafted
    prompts' dominant class of its trigger is used only for other triggers."""
    trigger = MaskPatternTrigger(mask=torch.zeros(1, 4, 4), pattern=torch.zeros(3, 4, 4))
    names = ["cat", "dog", "deer"]

    def made_by(settings: dict) -> TriggerFile:
        return TriggerFile(trigger=trigger, model_sha256="", classnames=names, settings=settings)

    fitted = {"target_class": "deer", "options": {"fit_prompts": True}}
    assert tuning_target(made_by(fitted), names, dominant=0) == 2
    handcrafted = {"target_class": "deer", "options": {"fit_prompts": False}}
    assert tuning_target(made_by(handcrafted), names, dominant=0) == 0
    assert tuning_target(made_by({}), names, dominant=1) == 1
    unknown = {"target_class": "horse", "options": {"fit_prompts": True}}
    assert tuning_target(made_by(unknown), names, dominant=1) == 1
