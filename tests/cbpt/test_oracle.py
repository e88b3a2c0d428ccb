"""The trigger-fidelity helper of the cbpt plugin."""

from __future__ import annotations

import pytest
import torch

from clipguard.triggers import MaskPatternTrigger
from clipguard_cbpt.oracle import trigger_fidelity


def _trigger(value: float) -> MaskPatternTrigger:
    mask = torch.zeros(1, 16, 16)
    mask[:, -5:, -5:] = 1
    return MaskPatternTrigger(mask=mask, pattern=torch.full((3, 16, 16), value))


def test_fidelity_of_a_trigger_with_itself_is_one(bundle, shots) -> None:
    same = trigger_fidelity(bundle, shots.pixels, _trigger(1.0), _trigger(1.0))
    assert same["mean_shift_cosine"] == pytest.approx(1.0, abs=1e-5)
    assert same["per_image_cosine"] == pytest.approx(1.0, abs=1e-5)
