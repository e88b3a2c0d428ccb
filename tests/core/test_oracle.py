"""The oracle ceiling (clipguard.oracle): one probe for model cards, benchmarks and plugins."""

from __future__ import annotations

import math

import pytest
import torch

from clipguard.features import mean_pairwise_cosine
from clipguard.model import ModelBundle, build_clip_from_config
from clipguard.oracle import ORACLE_LOGIT_SCALE, oracle_ceiling
from clipguard.triggers import MaskPatternTrigger
from tests.conftest import TINY_CLASSES, TINY_CONFIG

CARD_FIELDS = {
    "oracle_clean_accuracy",
    "oracle_attack_success_rate",
    "oracle_logit_scale",
    "triggered_feature_cosine",
    "clean_feature_cosine",
}


@pytest.fixture
def bundle() -> ModelBundle:
    torch.manual_seed(0)
    return ModelBundle.from_model(build_clip_from_config(TINY_CONFIG), TINY_CONFIG)


@pytest.fixture
def images() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.rand(18, 3, 32, 32, generator=generator), torch.arange(3).repeat(6)


def _trigger() -> MaskPatternTrigger:
    mask = torch.zeros(1, 32, 32)
    mask[:, -6:, -6:] = 1
    return MaskPatternTrigger(mask=mask, pattern=torch.ones(3, 32, 32))


def test_one_weight_gives_exactly_the_model_card_fields(bundle, images) -> None:
    pixels, labels = images
    ceiling = oracle_ceiling(bundle, TINY_CLASSES, pixels, labels, _trigger(), 0, steps=5)
    assert set(ceiling) == CARD_FIELDS
    assert ceiling["oracle_logit_scale"] == ORACLE_LOGIT_SCALE
    for key in ("oracle_clean_accuracy", "oracle_attack_success_rate"):
        assert 0 <= ceiling[key] <= 1
    assert all(math.isfinite(value) for value in ceiling.values())


def test_several_weights_report_every_point_and_the_best(bundle, images) -> None:
    pixels, labels = images
    ceiling = oracle_ceiling(
        bundle,
        TINY_CLASSES,
        pixels[::2],
        labels[::2],
        _trigger(),
        0,
        steps=5,
        eval_pixels=pixels[1::2],
        eval_labels=labels[1::2],
        trigger_weights=(0.5, 2.0),
    )
    points = ceiling["oracle_points"]
    assert [p["trigger_weight"] for p in points] == [0.5, 2.0]
    best = max(points, key=lambda p: p["clean_accuracy"] - p["attack_success_rate"])
    assert ceiling["oracle_trigger_weight"] == best["trigger_weight"]
    assert ceiling["oracle_clean_accuracy"] == best["clean_accuracy"]
    assert ceiling["oracle_attack_success_rate"] == best["attack_success_rate"]


def test_the_ceiling_does_not_depend_on_the_models_logit_scale(bundle, images) -> None:
    """Predictions of a unit-norm head do not depend on the scale, so neither may the ceiling:
    the probe trains at the oracle's fixed scale, not the model's (a lab model's own, 10 to 15,
    left it short of what such a head reaches)."""
    pixels, labels = images
    first = oracle_ceiling(bundle, TINY_CLASSES, pixels, labels, _trigger(), 0, steps=5)
    with torch.no_grad():
        bundle.model.logit_scale.fill_(math.log(3.0))
    assert bundle.logit_scale == pytest.approx(3.0)
    assert oracle_ceiling(bundle, TINY_CLASSES, pixels, labels, _trigger(), 0, steps=5) == first


def test_the_encoding_batch_leaves_the_figures_as_they_are(bundle, images) -> None:
    pixels, labels = images
    whole = oracle_ceiling(bundle, TINY_CLASSES, pixels, labels, _trigger(), 0, steps=5)
    batched = oracle_ceiling(
        bundle, TINY_CLASSES, pixels, labels, _trigger(), 0, steps=5, batch_size=4
    )
    for key in CARD_FIELDS:
        assert batched[key] == pytest.approx(whole[key], abs=1e-5)


def test_mean_pairwise_cosine_of_fewer_than_two_features_is_one() -> None:
    assert mean_pairwise_cosine(torch.ones(1, 4) / 2) == 1.0
    assert mean_pairwise_cosine(torch.empty(0, 4)) == 1.0


def test_no_weight_is_an_error(bundle, images) -> None:
    pixels, labels = images
    with pytest.raises(ValueError, match="at least one weight"):
        oracle_ceiling(bundle, TINY_CLASSES, pixels, labels, _trigger(), 0, trigger_weights=())
