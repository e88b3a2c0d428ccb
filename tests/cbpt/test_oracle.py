"""The oracle ceiling and trigger fidelity helpers."""

from __future__ import annotations

import math

import pytest
import torch

from clipguard.triggers import MaskPatternTrigger
from clipguard_cbpt.oracle import Ceiling, probe_ceiling, trigger_fidelity


def _trigger(value: float) -> MaskPatternTrigger:
    mask = torch.zeros(1, 16, 16)
    mask[:, -5:, -5:] = 1
    return MaskPatternTrigger(mask=mask, pattern=torch.full((3, 16, 16), value))


def test_fidelity_of_a_trigger_with_itself_is_one(bundle, shots) -> None:
    same = trigger_fidelity(bundle, shots.pixels, _trigger(1.0), _trigger(1.0))
    assert same["mean_shift_cosine"] == pytest.approx(1.0, abs=1e-5)
    assert same["per_image_cosine"] == pytest.approx(1.0, abs=1e-5)


def _ceiling_on_shots(bundle, shots, trigger_weights: tuple[float, ...]) -> Ceiling:
    """The probe fitted and measured on the same shots (20 steps): enough to check its form."""
    return probe_ceiling(
        bundle,
        shots.classnames,
        shots.pixels,
        shots.labels,
        shots.pixels,
        shots.labels,
        _trigger(1.0),
        target=0,
        trigger_weights=trigger_weights,
        steps=20,
    )


def test_probe_ceiling_reports_every_weight(bundle, shots) -> None:
    ceiling = _ceiling_on_shots(bundle, shots, (0.5, 2.0))
    assert [p.trigger_weight for p in ceiling.points] == [0.5, 2.0]
    assert ceiling.best in ceiling.points
    for point in ceiling.points:
        assert 0 <= point.clean_accuracy <= 1 and 0 <= point.attack_success_rate <= 1
    assert set(ceiling.as_dict()) == {"best", "points"}


def test_probe_ceiling_does_not_depend_on_the_models_logit_scale(bundle, shots) -> None:
    """Predictions of a unit-norm head do not depend on the scale, so neither may the ceiling:
    the probe trains at the oracle's fixed scale, not the model's (a lab model's own, 10 to 15,
    left it short of what such a head reaches)."""
    first = _ceiling_on_shots(bundle, shots, (1.0,)).as_dict()
    with torch.no_grad():
        bundle.model.logit_scale.fill_(math.log(3.0))
    assert bundle.logit_scale == pytest.approx(3.0)
    assert _ceiling_on_shots(bundle, shots, (1.0,)).as_dict() == first
