"""Unit tests of the contrastive inversion: parametrisation, losses, schedule, budget, seed."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from clipguard.augment import apply_affine, random_affine
from clipguard.features import encode_images, mean_pairwise_cosine
from clipguard.prompts import PromptClassifier
from clipguard.triggers import MaskPatternTrigger
from clipguard_cbpt import probes
from clipguard_cbpt.contrastive import ContrastiveConfig, contrastive_loss, invert_contrastive
from clipguard_cbpt.inversion import (
    InversionConfig,
    LambdaSchedule,
    TriggerParameters,
    invert_targeted,
)
from clipguard_cbpt.probe_families import AdditivePerturbation, SmoothWarp, transform_towards
from clipguard_cbpt.probes import (
    MedianBand,
    ProbeReach,
    probe_cost,
    probe_reach,
    probe_reach_in_band,
)
from clipguard_cbpt.statistics import prediction_distribution, relative_collapse


@settings(max_examples=25, deadline=None)
@given(scale=st.floats(0.1, 50), seed=st.integers(0, 10_000))
def test_tanh_parametrisation_stays_in_unit_range(scale: float, seed: int) -> None:
    params = TriggerParameters(8, 0.05, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        params.mask_weight.mul_(scale)
        params.pattern_weight.mul_(scale)
    for tensor in (params.mask().detach(), params.pattern().detach()):
        assert float(tensor.min()) >= 0 and float(tensor.max()) <= 1
    images = torch.rand(2, 3, 8, 8)
    out = params.apply(images).detach()
    assert out.shape == images.shape and float(out.min()) >= 0 and float(out.max()) <= 1


def test_initial_mask_mean_near_mask_init() -> None:
    params = TriggerParameters(32, 0.05, torch.Generator().manual_seed(0))
    assert abs(float(params.mask().detach().mean()) - 0.05) < 0.03


def test_from_trigger_round_trip() -> None:
    mask = torch.zeros(1, 8, 8)
    mask[:, 2:4, 2:4] = 1
    pattern = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0))
    params = TriggerParameters.from_trigger(MaskPatternTrigger(mask, pattern))
    assert torch.allclose(params.mask(), mask, atol=1e-3)
    assert torch.allclose(params.pattern(), pattern.clamp(1e-4, 1 - 1e-4), atol=1e-3)


def test_contrastive_loss_is_a_scalar_and_prefers_collapse() -> None:
    generator = torch.Generator().manual_seed(0)
    clean = torch.nn.functional.normalize(torch.randn(8, 16, generator=generator), dim=1)
    spread = torch.nn.functional.normalize(torch.randn(8, 16, generator=generator), dim=1)
    point = torch.nn.functional.normalize(torch.randn(1, 16, generator=generator), dim=1)
    collapsed = torch.nn.functional.normalize(point + 0.01 * spread, dim=1)
    low = contrastive_loss(collapsed, clean, 0.07)
    high = contrastive_loss(spread, clean, 0.07)
    assert low.shape == () and high.shape == ()
    assert float(low) < float(high)
    # bounded below by 0: log(P / (P + N)) <= 0
    assert float(low) >= 0


def test_contrastive_loss_has_gradients_and_needs_two_features() -> None:
    z = torch.nn.functional.normalize(torch.randn(4, 8), dim=1).requires_grad_(True)
    c = torch.nn.functional.normalize(torch.randn(6, 8), dim=1)
    contrastive_loss(z, c, 0.1).backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()
    with pytest.raises(ValueError):
        contrastive_loss(z[:1], c, 0.1)


def test_collapse_measures() -> None:
    same = torch.nn.functional.normalize(torch.ones(5, 4), dim=1)
    assert math.isclose(mean_pairwise_cosine(same), 1.0, rel_tol=1e-5)
    assert math.isclose(relative_collapse(1.0, 0.3), 1.0)
    assert math.isclose(relative_collapse(0.3, 0.3), 0.0)


def test_lambda_schedule_waits_for_the_target_then_adapts() -> None:
    schedule = LambdaSchedule(init=1.0, up=2.0, down=4.0)
    schedule.update(False)
    assert schedule.value == 0 and not schedule.reached
    schedule.update(True)
    assert schedule.value == 1.0 and schedule.reached
    schedule.update(True)
    assert schedule.value == 2.0
    schedule.update(False)
    assert schedule.value == 0.5


def test_augmentation_identity_and_shapes() -> None:
    images = torch.rand(3, 3, 8, 8)
    theta = random_affine(3, 1.0, torch.Generator().manual_seed(0), flip=False)
    assert torch.allclose(apply_affine(images, theta), images, atol=1e-5)
    theta = random_affine(3, 0.5, torch.Generator().manual_seed(0))
    assert apply_affine(images, theta).shape == images.shape


CHEAP = {"steps": 12, "probe_steps": 4, "restarts": 2, "batch_size": 6, "check_every": 3}


def test_contrastive_inversion_is_deterministic_for_a_seed(bundle, shots) -> None:
    config = ContrastiveConfig(**CHEAP, budget=10_000)
    first = invert_contrastive(bundle, shots.pixels, config, torch.Generator().manual_seed(3))
    second = invert_contrastive(bundle, shots.pixels, config, torch.Generator().manual_seed(3))
    assert torch.equal(first.trigger.mask, second.trigger.mask)
    assert torch.equal(first.trigger.pattern, second.trigger.pattern)
    assert first.restarts == second.restarts
    other = invert_contrastive(bundle, shots.pixels, config, torch.Generator().manual_seed(4))
    assert not torch.equal(first.trigger.mask, other.trigger.mask)
    assert len(first.restarts) == 2 and sum(r["chosen"] for r in first.restarts) == 1
    assert 0 <= first.pl1 <= 1


def test_contrastive_inversion_respects_the_budget(bundle, shots) -> None:
    config = ContrastiveConfig(**{**CHEAP, "steps": 1000}, budget=300)
    start = bundle.image_encoder_images
    result = invert_contrastive(bundle, shots.pixels, config, torch.Generator().manual_seed(0))
    used = bundle.image_encoder_images - start
    # the budget covers the steps; the final measurement adds one pass over the shots
    assert used <= 300 + shots.pixels.shape[0]
    assert result.steps >= 1


def test_targeted_refinement_and_distribution(bundle, shots) -> None:
    classifier = PromptClassifier(bundle, shots.classnames)
    config = InversionConfig(batch_size=6, check_every=3, refine_steps=9, budget=1_000)
    result = invert_targeted(
        bundle,
        shots.pixels,
        shots.labels,
        classifier.class_features,
        1,
        config,
        torch.Generator().manual_seed(0),
    )
    assert result.steps <= 9
    stats = prediction_distribution(
        classifier.predict, shots.pixels, shots.labels, result.trigger, shots.classnames
    )
    assert math.isclose(sum(stats["distribution"].values()), 1.0)
    assert stats["dominant_class"] in shots.classnames
    assert 0 < stats["dominant_share"] <= 1


def test_config_forbids_unknown_options() -> None:
    with pytest.raises(ValueError):
        InversionConfig(stepz=3)


def test_additive_reach_measures_what_a_bounded_shift_does(bundle, shots) -> None:
    """With no room to move (epsilon 0) a class's reach is the share of the other classes'
    held-out (odd) shots the model already gives it; with the whole pixel range every
    class is reached on all of them. Deterministic, and within its encoder budget."""
    text = PromptClassifier(bundle, shots.classnames).class_features

    def reach(epsilon: float, steps: int) -> ProbeReach:
        family = AdditivePerturbation(epsilon)
        return probe_reach(bundle, shots.pixels, shots.labels, text, family, steps, 96, 10_000)

    still = reach(0.0, 3)
    predicted = (encode_images(bundle, shots.pixels) @ text.T).argmax(dim=1)
    odd = torch.arange(len(shots.labels)) % 2 == 1
    for k in range(3):
        held = odd & (shots.labels != k)
        assert still.reach[k] == pytest.approx(float((predicted[held] == k).float().mean()))
    start = bundle.image_encoder_images
    free = reach(1.0, 60)
    assert free.reach == [1.0, 1.0, 1.0] and free.skipped is None and free.probe == "additive"
    assert bundle.image_encoder_images - start <= 10_000
    assert reach(1.0, 60).reach == free.reach


def test_a_smooth_warp_moves_pixels_within_its_bound() -> None:
    """The warp probe's family: zero displacement is the identity; a uniform displacement of
    one pixel shifts the image by one pixel (edges repeated); the bound clamps per axis."""
    warp = SmoothWarp(grid=4, max_pixels=2.0)
    images = torch.rand(2, 3, 8, 8)
    identity = warp.initial(1, (3, 8, 8))[0]
    assert identity.shape == (2, 4, 4)
    assert torch.allclose(warp.apply(images, identity), images, atol=1e-6)
    right = torch.zeros(2, 4, 4)
    right[0] = 1.0  # x displacement of one pixel: each output pixel samples its right neighbour
    shifted = warp.apply(images, right)
    assert torch.allclose(shifted[..., :-1], images[..., 1:], atol=1e-5)
    assert torch.allclose(shifted[..., -1], images[..., -1], atol=1e-5)
    far = torch.full((1, 2, 4, 4), 5.0)
    warp.bound(far)
    assert float(far.max()) == 2.0


def test_the_warp_probe_reaches_within_its_budget(bundle, shots) -> None:
    text = PromptClassifier(bundle, shots.classnames).class_features
    family = SmoothWarp(grid=4, max_pixels=2.0)
    start = bundle.image_encoder_images
    result = probe_reach(bundle, shots.pixels, shots.labels, text, family, 5, 96, 10_000)
    assert result.probe == "warp" and result.steps == 5 and result.skipped is None
    assert all(0.0 <= r <= 1.0 for r in result.reach)
    assert bundle.image_encoder_images - start == 5 * 12 + 12
    again = probe_reach(bundle, shots.pixels, shots.labels, text, family, 5, 96, 10_000)
    assert again.reach == result.reach


def test_a_transformation_towards_a_class_is_a_trigger(bundle, shots) -> None:
    """The purifier's warp trigger: fitted on the other classes' shots only, it applies like any
    trigger (same shape, pixels in [0, 1]); with no steps it is the identity; deterministic."""
    text = PromptClassifier(bundle, shots.classnames).class_features
    family = SmoothWarp(grid=4, max_pixels=3.0)
    start = bundle.image_encoder_images
    trigger = transform_towards(bundle, shots.pixels, shots.labels, text, family, 1, steps=5)
    assert bundle.image_encoder_images - start == 5 * 8  # 8 shots of the two other classes
    assert float(trigger.parameters.abs().max()) <= 3.0
    warped = trigger.apply(shots.pixels)
    assert (
        warped.shape == shots.pixels.shape and 0 <= float(warped.min()) <= float(warped.max()) <= 1
    )
    again = transform_towards(bundle, shots.pixels, shots.labels, text, family, 1, steps=5)
    assert torch.equal(again.parameters, trigger.parameters)
    still = transform_towards(bundle, shots.pixels, shots.labels, text, family, 1, steps=0)
    assert torch.allclose(still.apply(shots.pixels), shots.pixels, atol=1e-5)


def test_probe_reach_fits_its_budget(bundle, shots) -> None:
    text = PromptClassifier(bundle, shots.classnames).class_features
    family = AdditivePerturbation(0.02)
    # 12 shots, 3 classes: 4 fitted and 4 measured per class, 12 + 12 images per step / at end
    start = bundle.image_encoder_images
    short = probe_reach(bundle, shots.pixels, shots.labels, text, family, 30, 96, budget=12 * 5)
    assert short.steps == 4 and bundle.image_encoder_images - start <= 60
    none = probe_reach(bundle, shots.pixels, shots.labels, text, family, 30, 96, budget=20)
    assert none.steps == 0 and none.skipped is not None and none.evidence() == [0.0] * 3
    capped = probe_reach(bundle, shots.pixels, shots.labels, text, family, 1, 2, budget=100)
    assert capped.steps == 1


def test_probe_reach_also_measures_on_held_out_images(bundle, shots) -> None:
    """Held-out images (not shots) add to what each class's reach is measured on, never to
    what is fitted: with no room to move, the reach of ``k`` is the share of the other
    classes' odd shots and held-out images the model already gives ``k``; the fit (and so
    the reach on the shots alone) is unchanged; the cost is ``probe_cost``'s; at most
    ``max_held_out`` held-out images are measured per class."""
    text = PromptClassifier(bundle, shots.classnames).class_features
    generator = torch.Generator().manual_seed(5)
    held_pixels = torch.rand(9, *shots.pixels.shape[1:], generator=generator)
    held_labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])

    def reach(epsilon: float, steps: int, **held_out: Any) -> ProbeReach:
        family = AdditivePerturbation(epsilon)
        return probe_reach(
            bundle, shots.pixels, shots.labels, text, family, steps, 96, 10_000, **held_out
        )

    start = bundle.image_encoder_images
    both = reach(0.0, 2, held_out=(held_pixels, held_labels))
    assert bundle.image_encoder_images - start == probe_cost(shots.labels, 3, 96, 2, held_labels)
    assert (
        probe_cost(shots.labels, 3, 96, 2, held_labels) == probe_cost(shots.labels, 3, 96, 2) + 18
    )
    predicted = (encode_images(bundle, shots.pixels) @ text.T).argmax(dim=1)
    held_predicted = (encode_images(bundle, held_pixels) @ text.T).argmax(dim=1)
    odd = torch.arange(len(shots.labels)) % 2 == 1
    for k in range(3):
        hits = (predicted[odd & (shots.labels != k)] == k).sum() + (
            held_predicted[held_labels != k] == k
        ).sum()
        assert both.measured[k] == 4 + 6  # odd shots of the two other classes, held-out images
        assert both.reach[k] == pytest.approx(float(hits) / both.measured[k])
        on_shots = (predicted[odd & (shots.labels != k)] == k).float().mean()
        assert both.shot_reach[k] == pytest.approx(float(on_shots))
    alone = reach(0.05, 3)
    with_held = reach(0.05, 3, held_out=(held_pixels, held_labels))
    assert alone.measured == [4, 4, 4]
    for k in range(3):  # the shots' hits are the same: the fit did not see the held-out images
        assert 0 <= round(with_held.reach[k] * 10) - round(alone.reach[k] * 4) <= 6
    capped = reach(0.02, 1, held_out=(held_pixels, held_labels), max_held_out=3)
    assert capped.measured == [4 + 3] * 3
    assert probe_cost(shots.labels, 3, 96, 1, held_labels, 3) == 12 + 3 * (4 + 3)


def test_an_adapted_probe_keeps_a_bound_whose_median_is_in_its_band(bundle, shots) -> None:
    """When the first fit's median class reach already lies in the band, the adapted probe is
    that one fit: same reach, same cost, and its one fit recorded."""
    text = PromptClassifier(bundle, shots.classnames).class_features
    family = AdditivePerturbation(0.02)
    single = probe_reach(bundle, shots.pixels, shots.labels, text, family, 3, 96, 10_000)
    start = bundle.image_encoder_images
    band = MedianBand(0.0, 1.0, refits=2)
    adapted = probe_reach_in_band(
        bundle, shots.pixels, shots.labels, text, family, 3, 96, 10_000, band
    )
    assert adapted.reach == single.reach and adapted.family == family
    assert adapted.tried == [(family, single.median)]
    assert bundle.image_encoder_images - start == 3 * 12 + 12


def test_an_adapted_probe_doubles_or_halves_its_bound_towards_the_band(bundle, shots) -> None:
    """Below the band the bound doubles, above it halves, at most ``refits`` times, each fit
    paid in full; the fit nearest the band is returned."""
    text = PromptClassifier(bundle, shots.classnames).class_features

    def adapted(epsilon: float, band: MedianBand, budget: int = 10_000) -> ProbeReach:
        family = AdditivePerturbation(epsilon)
        return probe_reach_in_band(
            bundle, shots.pixels, shots.labels, text, family, 3, 96, budget, band
        )

    start = bundle.image_encoder_images
    saturated = adapted(1.0, MedianBand(0.0, 0.0001, refits=2))
    assert [f.epsilon for f, _ in saturated.tried] == [1.0, 0.5, 0.25]  # type: ignore[attr-defined]
    assert bundle.image_encoder_images - start == 3 * (3 * 12 + 12)
    medians = [median for _, median in saturated.tried]
    assert saturated.median == min(medians)
    starved = adapted(0.001, MedianBand(0.9999, 1.0, refits=1))
    assert [f.epsilon for f, _ in starved.tried] == [0.001, 0.002]  # type: ignore[attr-defined]
    # a budget that pays for one fit only: no refit
    start = bundle.image_encoder_images
    poor = adapted(1.0, MedianBand(0.0, 0.0001, refits=2), budget=3 * 12 + 12 + 20)
    assert len(poor.tried) == 1 and bundle.image_encoder_images - start == 3 * 12 + 12


def test_an_adapted_probe_stops_where_the_band_lies_between_two_bounds(monkeypatch) -> None:
    """When doubling overshoots the band (or halving undershoots it) the search stops instead
    of going back, and keeps the fit whose median lies nearer the band."""
    medians = {0.02: 0.01, 0.04: 0.6, 0.08: 0.9}

    def fake_probe(bundle, pixels, labels, features, family, *args, **kwargs) -> ProbeReach:
        return ProbeReach(family, [medians[round(family.epsilon, 4)]] * 3, steps=3)

    monkeypatch.setattr(probes, "probe_reach", fake_probe)
    labels = torch.tensor([0, 1, 2] * 4)

    class Counter:
        image_encoder_images = 0

    result = probe_reach_in_band(
        Counter(),  # type: ignore[arg-type]
        torch.zeros(12, 3, 4, 4),
        labels,
        torch.zeros(3, 8),
        AdditivePerturbation(0.02),
        3,
        96,
        10_000,
        MedianBand(0.05, 0.35, refits=5),
    )
    assert [f.epsilon for f, _ in result.tried] == [0.02, 0.04]  # type: ignore[attr-defined]
    assert result.family == AdditivePerturbation(0.02)  # 0.01 is 0.04 below; 0.6 is 0.25 above
    assert MedianBand(0.05, 0.35, 1).distance(0.2) == 0.0


def test_an_adapted_probe_judges_its_bound_by_the_held_out_shots(monkeypatch) -> None:
    """Held-out images sharpen the reach reported, not the choice of bound: a fit whose
    median on the held-out shots lies below the band is refitted at a doubled bound even
    when its median over shots and held-out images lies inside it."""

    def fake_probe(bundle, pixels, labels, features, family, *args, **kwargs) -> ProbeReach:
        low = round(family.epsilon, 4) == 0.02
        shots = [0.01] * 3 if low else [0.2] * 3
        return ProbeReach(family, [0.1] * 3, steps=3, measured=[50] * 3, shot_reach=shots)

    monkeypatch.setattr(probes, "probe_reach", fake_probe)

    class Counter:
        image_encoder_images = 0

    result = probe_reach_in_band(
        Counter(),  # type: ignore[arg-type]
        torch.zeros(12, 3, 4, 4),
        torch.tensor([0, 1, 2] * 4),
        torch.zeros(3, 8),
        AdditivePerturbation(0.02),
        3,
        96,
        10_000,
        MedianBand(0.05, 0.35, refits=2),
    )
    assert [(f.epsilon, m) for f, m in result.tried] == [(0.02, 0.01), (0.04, 0.2)]  # type: ignore[attr-defined]
    assert result.family == AdditivePerturbation(0.04) and result.median == 0.1
