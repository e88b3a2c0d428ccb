"""The reach-probe benchmark's colour family: colour filters as universal per-pixel channel
mixes (benchmarks.probe_reach --probe colour)."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from benchmarks.probe_reach import ColourMix
from clipguard.lab.attacks_extended import FILTER_MATRICES


@given(strength=st.floats(min_value=0.0, max_value=2.0), seed=st.integers(0, 2**16))
def test_a_colour_mix_starts_at_the_identity_and_stays_in_its_bound(
    strength: float, seed: int
) -> None:
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(3, 3, 8, 8, generator=generator)
    family = ColourMix(strength)
    parameters = family.initial(2, tuple(images.shape[1:]))
    assert parameters.shape == (2, 3, 4)
    assert torch.equal(family.apply(images, parameters[0]), images)
    parameters = torch.randn(2, 3, 4, generator=generator) * 3
    family.bound(parameters)
    assert float(parameters.abs().max()) <= float(torch.tensor(strength))  # in float32
    changed = family.apply(images, parameters[1])
    assert changed.shape == images.shape
    assert float(changed.min()) >= 0.0 and float(changed.max()) <= 1.0
    assert family.rescaled(2.0).settings() == {"strength": 2 * strength}


def test_a_colour_mix_expresses_a_colour_filter_trigger() -> None:
    """The lab's warm filter at strength 0.5 is a channel-mix change with entries of at most
    0.1: a colour mix of strength 0.1 reproduces it pixel for pixel."""
    images = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    matrix = torch.tensor(FILTER_MATRICES["warm"])
    filtered = (0.5 * images + 0.5 * torch.einsum("oc,bchw->bohw", matrix, images)).clamp(0, 1)
    change = 0.5 * (matrix - torch.eye(3))
    assert float(change.abs().max()) <= 0.1
    parameters = torch.cat([change, torch.zeros(3, 1)], dim=1)
    assert torch.allclose(ColourMix(0.1).apply(images, parameters), filtered, atol=1e-6)
