"""The seven further trigger families: shape, range, determinism, what each one does."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from clipguard.errors import InputError
from clipguard.lab.attacks_extended import (
    EXTENDED_FAMILIES,
    YUV_TO_RGB,
    BadNetsRandom,
    Bpp,
    BppConfig,
    ColourFilter,
    ColourFilterConfig,
    FTrojan,
    FTrojanConfig,
    GridOverlay,
    GridOverlayConfig,
    MultiPatch,
    MultiPatchConfig,
    RandomPatchConfig,
    RefoolConfig,
    RefoolLike,
    dct_basis,
)
from clipguard.plugins import get_registry


def _images(seed: int, batch: int = 4, size: int = 32) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family_cls", EXTENDED_FAMILIES, ids=lambda f: f.name)
def test_shape_range_determinism_and_no_in_place_change(family_cls):
    family = family_cls()
    images = _images(0)
    before = images.clone()
    out = family.build(family.Config(), 32).apply(images)
    assert out.shape == images.shape
    assert out.min() >= 0 and out.max() <= 1
    assert torch.equal(images, before)
    assert not torch.allclose(out, images)
    assert torch.equal(family.build(family.Config(), 32).apply(images), out)


@pytest.mark.parametrize("family_cls", EXTENDED_FAMILIES, ids=lambda f: f.name)
def test_unknown_options_and_wrong_sizes_are_refused(family_cls):
    family = family_cls()
    with pytest.raises(ValidationError):
        family.Config.model_validate({"no_such_option": 1})
    with pytest.raises(InputError):
        family.build(family.Config(), 32).apply(_images(0, size=16))


@pytest.mark.parametrize("family_cls", EXTENDED_FAMILIES, ids=lambda f: f.name)
def test_every_family_is_registered(family_cls):
    assert get_registry().trigger_family(family_cls.name).name == family_cls.name


def test_the_random_patch_moves_between_images_whatever_the_batch():
    trigger = BadNetsRandom().build(RandomPatchConfig(size=4, pattern="white"), 32)
    images = _images(6, batch=8) * 0.5
    stamped = trigger.apply(images)
    places = set(zip(*trigger.positions(images), strict=True))
    assert len(places) > 4
    assert all(int((image[0] == 1).sum()) == 16 for image in stamped)
    one_by_one = torch.cat([trigger.apply(image[None]) for image in images])
    assert torch.equal(one_by_one, stamped)


@settings(max_examples=20, deadline=None)
@given(parts=st.integers(2, 8), size=st.integers(1, 3), seed=st.integers(0, 1000))
def test_multi_patch_stamps_separate_parts(parts, size, seed):
    trigger = MultiPatch().build(MultiPatchConfig(parts=parts, size=size, seed=seed), 32)
    assert int(trigger.mask.sum()) == parts * size * size


def test_multi_patch_refuses_more_parts_than_fit():
    with pytest.raises(InputError):
        MultiPatch().build(MultiPatchConfig(parts=16, size=8), 32)


@settings(max_examples=20, deadline=None)
@given(spacing=st.integers(3, 12), alpha=st.floats(0.05, 1.0))
def test_grid_overlay_covers_lines_across_the_whole_image(spacing, alpha):
    trigger = GridOverlay().build(GridOverlayConfig(spacing=spacing, alpha=alpha), 32)
    covered = trigger.mask[0] > 0
    assert covered.any(dim=0).all() and covered.any(dim=1).all()
    assert torch.allclose(trigger.mask[trigger.mask > 0], torch.tensor(alpha))


def test_refool_blends_a_smooth_pattern():
    trigger = RefoolLike().build(RefoolConfig(alpha=0.3), 32)
    pattern = trigger.pattern
    neighbour_change = (pattern[:, :, 1:] - pattern[:, :, :-1]).abs().mean()
    noise = torch.rand(3, 32, 32)
    assert neighbour_change < 0.2 * (noise[:, :, 1:] - noise[:, :, :-1]).abs().mean()
    assert torch.allclose(trigger.mask, torch.tensor(0.3))


def test_the_swap_filter_at_full_strength_swaps_red_and_blue():
    images = _images(5)
    out = ColourFilter().build(ColourFilterConfig(kind="swap", strength=1.0), 32).apply(images)
    assert torch.allclose(out, images[:, [2, 1, 0]])


@settings(max_examples=20, deadline=None)
@given(bits=st.integers(1, 6), dither=st.booleans(), seed=st.integers(0, 1000))
def test_bpp_keeps_at_most_two_to_the_bits_levels(bits, dither, seed):
    out = Bpp().build(BppConfig(bits=bits, dither=dither), 32).apply(_images(seed, batch=2))
    levels = out * (2**bits - 1)
    assert torch.allclose(levels, levels.round(), atol=1e-4)
    assert levels.round().unique().numel() <= 2**bits


def test_ftrojan_raises_the_chosen_dct_coefficients_of_u_and_v():
    config = FTrojanConfig(magnitude=0.1, frequencies=((3, 7),), block=8)
    images = torch.full((1, 3, 32, 32), 0.5)
    change = FTrojan().build(config, 32).apply(images)[0] - images[0]
    rgb_to_yuv = torch.linalg.inv(torch.tensor(YUV_TO_RGB))
    yuv = torch.einsum("oc,chw->ohw", rgb_to_yuv, change)
    basis = dct_basis(8, 3, 7)
    for row in (0, 8, 24):
        block = yuv[:, row : row + 8, 8:16]
        assert abs(float((block[0] * basis).sum())) < 1e-4
        for channel in (1, 2):
            assert abs(float((block[channel] * basis).sum()) - 0.1) < 1e-4
            assert abs(float((block[channel] * dct_basis(8, 7, 3)).sum())) < 1e-4


def test_ftrojan_refuses_blocks_that_do_not_tile_and_frequencies_outside_a_block():
    with pytest.raises(InputError):
        FTrojan().build(FTrojanConfig(block=7), 32)
    with pytest.raises(InputError):
        FTrojan().build(FTrojanConfig(frequencies=((8, 1),)), 32)
