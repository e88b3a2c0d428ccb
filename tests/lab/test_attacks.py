"""Unit tests of the lab's trigger families: shape, range, determinism, registration."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from clipguard.errors import InputError
from clipguard.lab.attacks import (
    LAB_FAMILIES,
    BadClipConfig,
    BadClipLike,
    Blended,
    BlendedConfig,
    IssbaConfig,
    IssbaLike,
    Sig,
    SigConfig,
    WaNet,
    WaNetConfig,
    optimise_badclip_patch,
    write_badclip_patch,
)
from clipguard.plugins import get_registry
from clipguard.triggers import BadNets

SELF_CONTAINED = [f for f in LAB_FAMILIES if f is not BadClipLike]


def _images(seed: int, batch: int = 4, size: int = 32) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family_cls", SELF_CONTAINED, ids=lambda f: f.name)
def test_shape_range_and_no_in_place_change(family_cls):
    family = family_cls()
    trigger = family.build(family.Config(), 32)
    images = _images(0)
    before = images.clone()
    out = trigger.apply(images)
    assert out.shape == images.shape
    assert out.min() >= 0 and out.max() <= 1
    assert torch.equal(images, before)
    assert not torch.allclose(out, images)


@pytest.mark.parametrize("family_cls", SELF_CONTAINED, ids=lambda f: f.name)
def test_deterministic_for_a_config(family_cls):
    family = family_cls()
    images = _images(1)
    first = family.build(family.Config(), 32).apply(images)
    second = family.build(family.Config(), 32).apply(images)
    assert torch.equal(first, second)


@pytest.mark.parametrize("family_cls", SELF_CONTAINED, ids=lambda f: f.name)
def test_config_forbids_unknown_options(family_cls):
    with pytest.raises(ValidationError):
        family_cls.Config.model_validate({"no_such_option": 1})


@pytest.mark.parametrize("family_cls", SELF_CONTAINED, ids=lambda f: f.name)
def test_wrong_image_size_is_an_input_error(family_cls):
    family = family_cls()
    trigger = family.build(family.Config(), 32)
    with pytest.raises(InputError):
        trigger.apply(_images(0, size=16))


def test_seeds_change_random_triggers():
    images = _images(2)
    for family, config in (
        (Blended(), BlendedConfig),
        (WaNet(), WaNetConfig),
        (IssbaLike(), IssbaConfig),
    ):
        a = family.build(config(seed=0), 32).apply(images)
        b = family.build(config(seed=1), 32).apply(images)
        assert not torch.allclose(a, b), family.name


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    epsilon=st.floats(0.001, 0.2),
    size=st.sampled_from([16, 32]),
)
def test_issba_is_invisible_and_sample_specific(seed, epsilon, size):
    trigger = IssbaLike().build(IssbaConfig(epsilon=epsilon, seed=seed), size)
    images = _images(seed, batch=3, size=size) * 0.5 + 0.25  # away from the clamp
    residual = trigger.apply(images) - images
    assert residual.abs().max() <= epsilon + 1e-6
    assert not torch.allclose(residual[0], residual[1])


@settings(max_examples=25, deadline=None)
@given(delta=st.floats(0.01, 0.3), frequency=st.floats(1, 12))
def test_sig_amplitude_bounded(delta, frequency):
    trigger = Sig().build(SigConfig(delta=delta, frequency=frequency), 32)
    images = torch.full((2, 3, 32, 32), 0.5)
    change = trigger.apply(images) - images
    assert change.abs().max() <= delta + 1e-6
    assert torch.allclose(change[:, 0], change[:, 1])  # same signal on every channel


@settings(max_examples=25, deadline=None)
@given(alpha=st.floats(0.01, 1.0), seed=st.integers(0, 1000))
def test_blended_is_a_convex_mix(alpha, seed):
    trigger = Blended().build(BlendedConfig(alpha=alpha, seed=seed), 32)
    zeros = trigger.apply(torch.zeros(1, 3, 32, 32))
    ones = trigger.apply(torch.ones(1, 3, 32, 32))
    assert zeros.max() <= alpha + 1e-6
    assert ones.min() >= 1 - alpha - 1e-6


def test_wanet_keeps_a_constant_image():
    trigger = WaNet().build(WaNetConfig(), 32)
    images = torch.full((2, 3, 32, 32), 0.3)
    assert torch.allclose(trigger.apply(images), images, atol=1e-5)


def test_badnets_lc_is_label_consistent_badnets():
    registry = get_registry()
    lc = registry.trigger_family("badnets-lc")
    assert lc.label_consistent
    images = _images(3)
    same = BadNets().build(BadNets.Config(), 32).apply(images)
    assert torch.equal(lc.build(lc.Config(), 32).apply(images), same)


def test_all_seven_attacks_are_registered():
    registry = get_registry()
    assert not [e for e in registry.errors if "lab" in e], registry.errors
    for name in ("badnets", "blended", "sig", "wanet", "badnets-lc", "issba-like", "badclip-like"):
        assert registry.trigger_family(name).name == name


def test_badclip_needs_a_patch_file(tmp_path):
    with pytest.raises(InputError, match="patch_file"):
        BadClipLike().build(BadClipConfig(), 32)
    with pytest.raises(InputError):
        BadClipLike().build(BadClipConfig(patch_file=tmp_path / "missing.safetensors"), 32)


def test_badclip_patch_optimisation_moves_features_and_round_trips(tmp_path):
    torch.manual_seed(0)
    encoder = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 8))

    def encode(pixels: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(encoder(pixels), dim=-1)

    target = torch.nn.functional.normalize(torch.randn(8), dim=0)
    pixels = _images(4, batch=32, size=16)
    trigger = optimise_badclip_patch(encode, target, pixels, size=4, steps=60, lr=0.2)
    with torch.no_grad():
        before = (encode(pixels) @ target).mean()
        after = (encode(trigger.apply(pixels)) @ target).mean()
    assert after > before
    assert trigger.mask.sum() == 16
    path = tmp_path / "patch.safetensors"
    write_badclip_patch(path, trigger, "0" * 64, ["a", "b"], {"steps": 60})
    loaded = BadClipLike().build(BadClipConfig(patch_file=path), 16)
    assert torch.allclose(loaded.apply(pixels), trigger.apply(pixels))
    with pytest.raises(InputError):
        BadClipLike().build(BadClipConfig(patch_file=path), 32)
