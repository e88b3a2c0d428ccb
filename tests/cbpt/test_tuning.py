"""Unit tests of the prompt tuning: cached features, losses, no image encoder in the loop."""

from __future__ import annotations

import math

import pytest
import torch

from clipguard.components import RunContext
from clipguard.prompts import PromptClassifier, handcrafted_text_features
from clipguard.triggers import MaskPatternTrigger, TriggerFile
from clipguard_cbpt.config import DEFAULT_THRESHOLDS
from clipguard_cbpt.purifier import (
    CBPTPurifier,
    CoOpConfig,
    CoOpPurifier,
    PurifyConfig,
    says_clean,
)
from clipguard_cbpt.tuning import (
    FeatureCache,
    TuningConfig,
    cache_features,
    prompt_losses,
    random_mask_like,
    tune_prompts,
)


def _patch_trigger(size: int = 16) -> MaskPatternTrigger:
    mask = torch.zeros(1, size, size)
    mask[:, -4:, -4:] = 1
    return MaskPatternTrigger(mask=mask, pattern=torch.ones(3, size, size))


def _patched_cache(bundle, shots, augmentations: int) -> FeatureCache:
    """The shots' feature cache with the corner patch trigger, ``augmentations`` views."""
    return cache_features(
        bundle,
        shots.pixels,
        shots.labels,
        _patch_trigger(),
        augmentations,
        0.7,
        torch.Generator().manual_seed(0),
    )


def test_cache_shapes_and_cost(bundle, shots) -> None:
    cache = _patched_cache(bundle, shots, 2)
    n, e = shots.pixels.shape[0], 32
    assert cache.clean.shape == (3, n, e) and cache.triggered.shape == (3, n, e)
    assert cache.encoder_images == 2 * 3 * n
    assert torch.allclose(cache.clean.norm(dim=-1), torch.ones(3, n), atol=1e-5)
    none = cache_features(
        bundle, shots.pixels, shots.labels, None, 0, 0.7, torch.Generator().manual_seed(0)
    )
    assert none.triggered is None and none.clean.shape == (1, n, e)


@pytest.mark.parametrize("kind", ["true-class", "away", "both"])
def test_losses_are_scalars(bundle, shots, kind) -> None:
    cache = _patched_cache(bundle, shots, 1)
    anchor = handcrafted_text_features(bundle, shots.classnames)
    config = TuningConfig(trigger_loss=kind)
    losses = prompt_losses(anchor, anchor, cache, bundle.logit_scale, 0, config)
    assert set(losses) == {"clean", "trigger", "anchor", "distill"}
    assert all(v.shape == () and math.isfinite(float(v)) for v in losses.values())
    assert float(losses["anchor"]) == pytest.approx(0.0, abs=1e-5)
    assert float(losses["distill"]) == 0  # off by default
    assert float(losses["trigger"]) > 0
    off = prompt_losses(
        anchor,
        anchor,
        cache,
        bundle.logit_scale,
        0,
        TuningConfig(no_trigger_loss=True, no_anchor_loss=True),
    )
    assert float(off["trigger"]) == 0 and float(off["anchor"]) == 0


def test_tuning_loop_never_runs_the_image_encoder(bundle, shots, monkeypatch) -> None:
    cache = _patched_cache(bundle, shots, 1)
    calls, images = bundle.image_encoder_calls, bundle.image_encoder_images

    def refuse(*args, **kwargs):
        raise AssertionError("image encoder called inside the tuning loop")

    monkeypatch.setattr(bundle, "encode_image", refuse)
    monkeypatch.setattr(bundle.model, "encode_image", refuse)
    context, stats = tune_prompts(bundle, shots.classnames, cache, 0, TuningConfig(steps=5))
    assert context.shape == (3, 4, int(bundle.model.token_embedding.weight.shape[1]))
    assert stats["steps"] == 5 and stats["text_encoder_prompts"] == 5 * 3
    assert bundle.image_encoder_calls == calls and bundle.image_encoder_images == images


def test_tuning_lowers_the_loss(bundle, shots) -> None:
    cache = _patched_cache(bundle, shots, 0)
    config = TuningConfig(steps=15, lr=1e-3, no_trigger_loss=True, no_anchor_loss=True)
    _, stats = tune_prompts(bundle, shots.classnames, cache, 0, config)
    assert stats["loss_last"]["clean"] < stats["loss_first"]["clean"]


def test_fitted_reference_starts_from_and_anchors_to_plain_coop(bundle, shots) -> None:
    cache = _patched_cache(bundle, shots, 0)
    plain = TuningConfig(steps=6, no_trigger_loss=True, no_anchor_loss=True)
    coop, _ = tune_prompts(bundle, shots.classnames, cache, None, plain)
    fitted = TuningConfig(steps=6, reference_prompts="fitted")
    context, stats = tune_prompts(bundle, shots.classnames, cache, 0, fitted)
    # both tunings ran the text encoder; the final one started at the fitted prompts,
    # so its anchor loss starts at zero
    assert stats["text_encoder_prompts"] == 2 * 6 * 3
    assert stats["loss_first"]["anchor"] == pytest.approx(0.0, abs=1e-5)
    assert not torch.equal(context, coop)
    again, _ = tune_prompts(bundle, shots.classnames, cache, 0, fitted)
    assert torch.equal(context, again)


def test_random_mask_keeps_the_size() -> None:
    trigger = _patch_trigger()
    other = random_mask_like(trigger, torch.Generator().manual_seed(0))
    assert float(other.mask.mean()) == pytest.approx(float(trigger.mask.mean()))
    assert not torch.equal(other.mask, trigger.mask)


def test_purifier_with_a_given_trigger(bundle, shots) -> None:
    trigger = TriggerFile(_patch_trigger(), bundle.sha256, list(shots.classnames))
    calls = bundle.image_encoder_calls
    outcome = CBPTPurifier().purify(
        bundle, shots, PurifyConfig(steps=4, augmentations=1), RunContext(seed=0), trigger=trigger
    )
    assert outcome.prompts is not None and outcome.prompts.plugin == "cbpt"
    assert outcome.prompts.context.shape[:2] == (3, 4)
    assert outcome.trigger is trigger and outcome.trigger_target in shots.classnames
    assert isinstance(outcome.classifier, PromptClassifier)
    assert outcome.classifier.predict(shots.pixels).shape == (12,)
    # features: 2 views x (clean + triggered) x 12
    assert outcome.statistics["feature_encoder_images"] == 48
    assert outcome.statistics["inversion_encoder_images"] == 0
    assert outcome.statistics["warp_trigger_encoder_images"] == 0  # off by default
    assert bundle.image_encoder_calls > calls


def test_the_warp_trigger_adds_its_views_and_follows_the_gate(bundle, shots) -> None:
    """With ``warp_trigger_pixels`` a warp fitted towards the target adds its triggered views
    to the cache; a gated trigger (scan found no backdoor) gets no warp."""
    config = PurifyConfig(steps=2, augmentations=1, warp_trigger_pixels=8)
    trigger = TriggerFile(_patch_trigger(), bundle.sha256, list(shots.classnames))
    warped = CBPTPurifier().purify(bundle, shots, config, RunContext(seed=0), trigger=trigger)
    # 2 views x (clean + mask-triggered + warp-triggered) x 12
    assert warped.statistics["feature_encoder_images"] == 72
    # the warp: 30 steps on the 8 shots of the two other classes
    assert warped.statistics["warp_trigger_encoder_images"] == 30 * 8
    gated = TriggerFile(
        _patch_trigger(), bundle.sha256, list(shots.classnames), {"verdict": "clean"}
    )
    outcome = CBPTPurifier().purify(bundle, shots, config, RunContext(seed=0), trigger=gated)
    assert outcome.statistics["trigger_loss_gated"] is True
    assert outcome.statistics["warp_trigger_encoder_images"] == 0


def test_the_deciding_probe_becomes_a_further_trigger(bundle, shots) -> None:
    """When a reach probe decided the trigger's scan (``deciding_probe`` in its settings),
    the purifier fits that probe's family, at the recorded bound, towards the target and
    tunes against it too; the default (off), a rule-decided scan and the gate skip it."""
    config = PurifyConfig(steps=2, augmentations=1, probe_trigger=True, probe_trigger_steps=5)
    settings = {"verdict": "backdoor", "deciding_probe": {"name": "additive", "epsilon": 0.05}}
    trigger = TriggerFile(_patch_trigger(), bundle.sha256, list(shots.classnames), settings)
    followed = CBPTPurifier().purify(bundle, shots, config, RunContext(seed=0), trigger=trigger)
    assert followed.statistics["probe_trigger"] == {"name": "additive", "epsilon": 0.05}
    # 5 steps on the 8 shots of the two other classes; 2 views x 3 triggers (clean, mask,
    # additive) x 12 shots
    assert followed.statistics["probe_trigger_encoder_images"] == 5 * 8
    assert followed.statistics["feature_encoder_images"] == 72
    off = CBPTPurifier().purify(
        bundle,
        shots,
        PurifyConfig(steps=2, augmentations=1, probe_trigger_steps=5),
        RunContext(seed=0),
        trigger=trigger,
    )
    by_rule = TriggerFile(
        _patch_trigger(), bundle.sha256, list(shots.classnames), {"deciding_probe": None}
    )
    gated = TriggerFile(
        _patch_trigger(), bundle.sha256, list(shots.classnames), {**settings, "verdict": "clean"}
    )
    for trigger_file, options in ((trigger, off), (by_rule, None), (gated, None)):
        outcome = options or CBPTPurifier().purify(
            bundle, shots, config, RunContext(seed=0), trigger=trigger_file
        )
        assert outcome.statistics["probe_trigger"] is None
        assert outcome.statistics["probe_trigger_encoder_images"] == 0


def test_purifier_inverts_its_own_trigger_and_is_deterministic(bundle, shots) -> None:
    config = PurifyConfig(
        steps=3,
        augmentations=1,
        inversion_steps=3,
        inversion_restarts=1,
        inversion_budget=120,
        refine=False,
    )
    first = CBPTPurifier().purify(bundle, shots, config, RunContext(seed=5))
    second = CBPTPurifier().purify(bundle, shots, config, RunContext(seed=5))
    assert first.trigger is not None and first.trigger.model_sha256 == bundle.sha256
    assert torch.equal(first.trigger.trigger.mask, second.trigger.trigger.mask)
    assert torch.equal(first.prompts.context, second.prompts.context)
    assert first.statistics["inversion_encoder_images"] > 0


def test_coop_baseline(bundle, shots) -> None:
    outcome = CoOpPurifier().purify(bundle, shots, CoOpConfig(steps=3), RunContext(seed=0))
    assert outcome.prompts is not None and outcome.prompts.plugin == "coop"
    assert outcome.trigger is None and outcome.statistics["loss_last"]["trigger"] == 0


def test_purifier_inverts_with_the_scan_procedure(bundle, shots) -> None:
    config = PurifyConfig(steps=2, augmentations=0, inversion_method="scan", inversion_budget=60)
    outcome = CBPTPurifier().purify(bundle, shots, config, RunContext(seed=0))
    assert outcome.trigger is not None
    assert outcome.trigger_target in shots.classnames
    assert 0 < outcome.statistics["inversion_encoder_images"] <= 60 + 4 * 12
    assert outcome.trigger.settings["verdict"] in ("backdoor", "clean", "inconclusive")
    # its trigger records both signals, so the gate judges it as the scan did
    settings = outcome.trigger.settings
    assert {
        "evidence",
        "additive_evidence",
        "warp_evidence",
        "decided_by",
        "deciding_probe",
    } <= set(settings)
    assert says_clean(settings) is (settings["verdict"] == "clean")
    assert outcome.statistics["trigger_loss_gated"] is says_clean(settings)


def test_several_triggers_share_the_views(bundle, shots) -> None:
    other = MaskPatternTrigger(mask=torch.full((1, 16, 16), 0.1), pattern=torch.zeros(3, 16, 16))
    cache = cache_features(
        bundle,
        shots.pixels,
        shots.labels,
        [_patch_trigger(), other],
        2,
        0.7,
        torch.Generator().manual_seed(0),
    )
    n = shots.pixels.shape[0]
    assert cache.clean.shape[0] == 3 and cache.triggered.shape[:2] == (6, n)
    assert cache.encoder_images == 3 * 3 * n
    anchor = handcrafted_text_features(bundle, shots.classnames)
    losses = prompt_losses(anchor, anchor, cache, bundle.logit_scale, 0, TuningConfig())
    assert losses["trigger"].dim() == 0 and math.isfinite(float(losses["trigger"]))


@pytest.mark.parametrize(
    ("settings", "gated"),
    [
        ({"verdict": "clean"}, True),
        ({"verdict": "backdoor"}, False),
        ({}, False),
        # the evidence is judged by the current default threshold, whatever the old verdict
        ({"verdict": "backdoor", "evidence": 0.0}, True),
        ({"verdict": "clean", "evidence": 100.0}, False),
        # ... of the rule the scan used
        ({"evidence": 0.5 * DEFAULT_THRESHOLDS["size"], "options": {"signals": "size"}}, True),
        ({"evidence": 1.1 * DEFAULT_THRESHOLDS["size"], "options": {"signals": "size"}}, False),
        # the additive probe's evidence is judged too: at its threshold it flags alone
        ({"verdict": "backdoor", "evidence": 0.0, "additive_evidence": 0.3}, False),
        ({"verdict": "backdoor", "evidence": 0.0, "additive_evidence": 0.1}, True),
        # ... and the warp probe's
        ({"verdict": "backdoor", "evidence": 0.0, "warp_evidence": 0.5}, False),
        ({"evidence": 0.0, "additive_evidence": 0.1, "warp_evidence": 0.05}, True),
        # ... and the reference contrast of a scan with a reference model
        ({"verdict": "backdoor", "evidence": 0.0, "reference_contrast": 0.25}, False),
        ({"verdict": "backdoor", "evidence": 0.0, "reference_contrast": 0.1}, True),
    ],
)
def test_a_clean_scan_turns_the_trigger_loss_off(bundle, shots, settings, gated) -> None:
    trigger = TriggerFile(_patch_trigger(), bundle.sha256, list(shots.classnames), settings)
    outcome = CBPTPurifier().purify(
        bundle, shots, PurifyConfig(steps=3, augmentations=0), RunContext(seed=0), trigger=trigger
    )
    assert outcome.statistics["trigger_loss_gated"] is gated
    assert (outcome.statistics["loss_last"]["trigger"] == 0) is gated
    # gated: held to the hand-crafted predictions, and no triggered view is encoded
    options = outcome.prompts.settings["options"]
    assert options["distill_weight"] == (PurifyConfig().gated_distill_weight if gated else 0)
    n = shots.pixels.shape[0]
    assert outcome.statistics["feature_encoder_images"] == (n if gated else 2 * n)
    forced = CBPTPurifier().purify(
        bundle,
        shots,
        PurifyConfig(steps=3, augmentations=0, gate_on_verdict=False),
        RunContext(seed=0),
        trigger=trigger,
    )
    assert forced.statistics["trigger_loss_gated"] is False


def test_extra_triggers_are_inverted_towards_the_target(bundle, shots) -> None:
    trigger = TriggerFile(_patch_trigger(), bundle.sha256, list(shots.classnames))
    config = PurifyConfig(
        steps=2, augmentations=0, extra_triggers=2, extra_trigger_success=0.01, inversion_budget=64
    )
    outcome = CBPTPurifier().purify(bundle, shots, config, RunContext(seed=0), trigger=trigger)
    assert 0 < outcome.statistics["extra_trigger_encoder_images"] <= 64 + 2 * 32
    assert len(outcome.statistics["extra_trigger_pl1"]) <= 2


def test_distillation_is_zero_at_the_handcrafted_prompts_and_positive_away(bundle, shots) -> None:
    cache = cache_features(
        bundle, shots.pixels, shots.labels, None, 1, 0.7, torch.Generator().manual_seed(0)
    )
    anchor = handcrafted_text_features(bundle, shots.classnames)
    config = TuningConfig(distill_weight=3.0)
    at_anchor = prompt_losses(anchor, anchor, cache, bundle.logit_scale, None, config)
    assert float(at_anchor["distill"]) == pytest.approx(0.0, abs=1e-5)
    moved = torch.nn.functional.normalize(anchor + 0.5 * anchor.roll(1, dims=0), dim=1)
    away = prompt_losses(moved, anchor, cache, bundle.logit_scale, None, config)
    assert float(away["distill"]) > 1e-3
