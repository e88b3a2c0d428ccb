"""The lab's trigger families: blended, sig, wanet, badnets-lc, issba-like and badclip-like.

BadNets itself lives in :mod:`clipguard.triggers`. This module is loaded by the core as a
built-in plugin (its :func:`clipguard_register_triggers` hook registers every family), so the
attacks are usable by ``clipguard evaluate --attack NAME`` as well as by the lab.

All triggers work on ``B x 3 x H x W`` pixel images in ``[0, 1]`` and return the same shape,
clamped to ``[0, 1]``; none modifies its input. Every trigger is deterministic: the random
parts (blend noise, warping field, generator weights) come from the configured seed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from clipguard.errors import InputError
from clipguard.triggers import (
    BadNets,
    BadNetsConfig,
    MaskPatternTrigger,
    Position,
    Trigger,
    TriggerFamily,
    TriggerFile,
    load_trigger_file,
    patch_origin,
    save_trigger_file,
)

# --------------------------------------------------------------------------- blended


class BlendedConfig(BaseModel):
    """Options of the Blended trigger."""

    model_config = ConfigDict(extra="forbid")

    alpha: float = Field(0.2, gt=0, le=1, description="blend weight of the noise pattern")
    seed: int = Field(0, description="seed of the noise pattern")


class Blended(TriggerFamily):
    """Blended (Chen et al. 2017): a fixed full-image random pattern blended at weight alpha."""

    name = "blended"
    version = "1"
    description = "full-image uniform-noise pattern blended into the image (alpha)"
    Config = BlendedConfig

    def build(self, config: BaseModel, image_size: int) -> Trigger:
        assert isinstance(config, BlendedConfig)
        generator = torch.Generator().manual_seed(config.seed)
        pattern = torch.rand(3, image_size, image_size, generator=generator)
        mask = torch.full((1, image_size, image_size), config.alpha)
        return MaskPatternTrigger(mask=mask, pattern=pattern, family=self.name)


# --------------------------------------------------------------------------- additive


@dataclass
class AdditiveTrigger(Trigger):
    """``T(x) = clamp(x + delta)`` with a fixed perturbation ``delta`` (``3 x H x W``)."""

    delta: torch.Tensor
    family: str = "additive"

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images, self.delta.shape[-1])
        return (images + self.delta.to(images)).clamp(0, 1)


def check_images(images: torch.Tensor, size: int) -> None:
    """Raise :class:`InputError` unless ``images`` is ``B x 3 x size x size``."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise InputError(f"trigger expects B x 3 x H x W images, got {tuple(images.shape)}")
    if images.shape[-1] != size or images.shape[-2] != size:
        raise InputError(f"trigger is {size} px but images are {tuple(images.shape[-2:])} px")


class SigConfig(BaseModel):
    """Options of the SIG trigger."""

    model_config = ConfigDict(extra="forbid")

    delta: float = Field(
        0.08, gt=0, le=1, description="amplitude of the sinusoid (pixels in [0,1])"
    )
    frequency: float = Field(6.0, gt=0, description="periods across the image width")


class Sig(TriggerFamily):
    """SIG (Barni et al. 2019): a horizontal sinusoidal signal added to the image."""

    name = "sig"
    version = "1"
    description = "additive horizontal sinusoid (amplitude delta, frequency f)"
    Config = SigConfig

    def build(self, config: BaseModel, image_size: int) -> Trigger:
        assert isinstance(config, SigConfig)
        columns = torch.arange(image_size, dtype=torch.float32)
        wave = config.delta * torch.sin(2 * math.pi * columns * config.frequency / image_size)
        delta = wave.view(1, 1, image_size).expand(3, image_size, image_size).clone()
        return AdditiveTrigger(delta=delta, family=self.name)


# --------------------------------------------------------------------------- wanet


@dataclass
class WarpTrigger(Trigger):
    """Warps images with a fixed sampling grid (``H x W x 2`` in ``[-1, 1]``)."""

    grid: torch.Tensor
    family: str = "wanet"

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images, self.grid.shape[0])
        grid = self.grid.to(images).unsqueeze(0).expand(images.shape[0], -1, -1, -1)
        warped = F.grid_sample(images, grid, mode="bilinear", align_corners=True)
        return warped.clamp(0, 1)


class WaNetConfig(BaseModel):
    """Options of the WaNet trigger."""

    model_config = ConfigDict(extra="forbid")

    grid_size: int = Field(8, ge=2, description="control grid side k")
    strength: float = Field(
        12.0, gt=0, description="warping strength s (mean shift about s / 2 pixels)"
    )
    seed: int = Field(0, description="seed of the random control grid")


class WaNet(TriggerFamily):
    """WaNet (Nguyen & Tran 2021): a small, smooth, fixed warping of the whole image."""

    name = "wanet"
    version = "1"
    description = "smooth fixed warping field from a random k x k control grid"
    Config = WaNetConfig

    def build(self, config: BaseModel, image_size: int) -> Trigger:
        assert isinstance(config, WaNetConfig)
        generator = torch.Generator().manual_seed(config.seed)
        control = torch.rand(1, 2, config.grid_size, config.grid_size, generator=generator) * 2 - 1
        control = control / control.abs().mean()
        field = F.interpolate(
            control, size=(image_size, image_size), mode="bicubic", align_corners=True
        )[0].permute(1, 2, 0)
        line = torch.linspace(-1, 1, image_size)
        rows, cols = torch.meshgrid(line, line, indexing="ij")
        identity = torch.stack((cols, rows), dim=-1)
        grid = (identity + config.strength * field / image_size).clamp(-1, 1)
        return WarpTrigger(grid=grid, family=self.name)


# --------------------------------------------------------------------------- badnets-lc


class BadNetsLC(BadNets):
    """Label-consistent BadNets: the BadNets patch, stamped only on images of the target class.

    The caption of a poisoned pair already names the target, so nothing looks mislabelled.
    """

    name = "badnets-lc"
    version = "1"
    description = "BadNets patch stamped only on target-class images (clean-label)"
    label_consistent = True
    Config = BadNetsConfig


# --------------------------------------------------------------------------- issba-like


class IssbaConfig(BaseModel):
    """Options of the ISSBA-like trigger."""

    model_config = ConfigDict(extra="forbid")

    epsilon: float = Field(
        0.1, gt=0, le=0.5, description="largest absolute change of a pixel (L-infinity)"
    )
    hidden: int = Field(16, ge=1, le=256, description="channels of the generator's hidden layer")
    seed: int = Field(0, description="seed of the generator weights and of its secret code")


class IssbaGenerator(torch.nn.Module):
    """A fixed random convolutional encoder: image and a secret code -> a residual in [-1, 1]."""

    def __init__(self, image_size: int, hidden: int, seed: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("code", torch.rand(3, image_size, image_size, generator=generator))
        self.conv1 = torch.nn.Conv2d(6, hidden, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(hidden, 3, 3, padding=1)
        for conv in (self.conv1, self.conv2):
            bound = 1 / math.sqrt(conv.in_channels * 9)
            with torch.no_grad():
                conv.weight.copy_(
                    (torch.rand(conv.weight.shape, generator=generator) * 2 - 1) * 2 * bound
                )
                conv.bias.copy_((torch.rand(conv.bias.shape, generator=generator) * 2 - 1) * bound)
        self.requires_grad_(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        code = self.code.to(images).unsqueeze(0).expand(images.shape[0], -1, -1, -1)
        hidden = torch.relu(self.conv1(torch.cat((images * 2 - 1, code * 2 - 1), dim=1)))
        residual = self.conv2(hidden)
        scale = residual.flatten(1).abs().amax(dim=1).clamp_min(1e-8).view(-1, 1, 1, 1)
        return residual / scale


@dataclass
class GeneratorTrigger(Trigger):
    """A sample-specific additive trigger: ``clamp(x + epsilon * G(x))``."""

    generator: IssbaGenerator
    epsilon: float
    image_size: int
    family: str = "issba-like"

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images, self.image_size)
        self.generator.to(images.device, images.dtype)
        return (images + self.epsilon * self.generator(images)).clamp(0, 1)


class IssbaLike(TriggerFamily):
    """ISSBA-like (Li et al. 2021): an invisible, sample-specific additive perturbation.

    ISSBA trains an encoder to hide a string in the image; here a fixed random generator net
    (seeded) maps the image and a secret code to a residual of L-infinity norm ``epsilon``.
    """

    name = "issba-like"
    version = "1"
    description = "sample-specific invisible residual from a fixed random generator net"
    Config = IssbaConfig

    def build(self, config: BaseModel, image_size: int) -> Trigger:
        assert isinstance(config, IssbaConfig)
        net = IssbaGenerator(image_size, config.hidden, config.seed)
        return GeneratorTrigger(
            generator=net, epsilon=config.epsilon, image_size=image_size, family=self.name
        )


# --------------------------------------------------------------------------- badclip-like


class BadClipConfig(BaseModel):
    """Options of the BadCLIP-like trigger: the optimised patch is read from ``patch_file``."""

    model_config = ConfigDict(extra="forbid")

    patch_file: Path | None = Field(
        None, description="trigger file written by `clipguard lab badclip-patch` (required)"
    )


class BadClipLike(TriggerFamily):
    """BadCLIP-like (Liang et al. 2024): a patch optimised towards the target caption's feature.

    The patch is optimised on a clean model by :func:`optimise_badclip_patch` and stored in a
    trigger file; this family reads that file.
    """

    name = "badclip-like"
    version = "1"
    description = "patch optimised on a clean model towards the target text (patch_file=...)"
    Config = BadClipConfig

    def build(self, config: BaseModel, image_size: int) -> Trigger:
        assert isinstance(config, BadClipConfig)
        if config.patch_file is None:
            raise InputError(
                "badclip-like needs its optimised patch: pass the option patch_file=PATH "
                "(made by `clipguard lab badclip-patch`)"
            )
        trigger_file = load_trigger_file(Path(config.patch_file))
        if trigger_file.trigger.image_size != image_size:
            raise InputError(
                f"{config.patch_file}: patch is for {trigger_file.trigger.image_size} px images, "
                f"the model takes {image_size} px"
            )
        trigger = trigger_file.trigger
        return MaskPatternTrigger(mask=trigger.mask, pattern=trigger.pattern, family=self.name)


def optimise_badclip_patch(
    encode_image: Callable[[torch.Tensor], torch.Tensor],
    target_feature: torch.Tensor,
    pixels: torch.Tensor,
    size: int = 4,
    position: Position = "bottom-right",
    margin: int = 1,
    steps: int = 300,
    lr: float = 0.1,
    batch_size: int = 64,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> MaskPatternTrigger:
    """Optimise a ``size`` patch so that patched ``pixels`` move to ``target_feature``.

    ``encode_image`` maps pixel images in ``[0, 1]`` to L2-normalised features (gradients must
    flow); ``target_feature`` is the normalised text feature of the target caption(s). The
    patch is tanh-parametrised and maximises the mean cosine to the target over random
    batches of ``pixels``, each randomly flipped so that the patch does not depend on one view.
    """
    image_size = int(pixels.shape[-1])
    row, col = patch_origin(position, image_size, size, margin)
    generator = torch.Generator().manual_seed(seed)
    raw = (torch.rand(3, size, size, generator=generator) * 2 - 1).requires_grad_(True)
    optimiser = torch.optim.Adam([raw], lr=lr)
    mask = torch.zeros(1, image_size, image_size)
    mask[:, row : row + size, col : col + size] = 1
    target = F.normalize(target_feature.detach().flatten(), dim=0)
    for _ in range(steps):
        index = torch.randint(
            pixels.shape[0], (min(batch_size, pixels.shape[0]),), generator=generator
        )
        batch = pixels[index]
        patch = (torch.tanh(raw) + 1) / 2
        pattern = F.pad(patch, (col, image_size - col - size, row, image_size - row - size))
        stamped = (1 - mask) * batch + mask * pattern
        features = encode_image(stamped)
        loss = -(features @ target).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if progress is not None:
            progress(1)
    with torch.no_grad():
        patch = (torch.tanh(raw) + 1) / 2
        pattern = F.pad(patch, (col, image_size - col - size, row, image_size - row - size))
    return MaskPatternTrigger(mask=mask, pattern=pattern.detach(), family=BadClipLike.name)


def write_badclip_patch(
    path: Path,
    trigger: MaskPatternTrigger,
    model_sha256: str,
    classnames: Sequence[str],
    settings: dict[str, Any],
) -> None:
    """Store an optimised BadCLIP-like patch as a clipguard trigger file (atomic)."""
    save_trigger_file(
        Path(path),
        TriggerFile(
            trigger=trigger,
            model_sha256=model_sha256,
            classnames=list(classnames),
            settings=settings,
            producer="clipguard.lab.attacks.badclip-like",
        ),
    )


# --------------------------------------------------------------------------- registration

#: every family this module registers, in registration order
LAB_FAMILIES: tuple[type[TriggerFamily], ...] = (
    Blended,
    Sig,
    WaNet,
    BadNetsLC,
    IssbaLike,
    BadClipLike,
)
