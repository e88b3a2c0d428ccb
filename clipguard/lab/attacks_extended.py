"""Seven more trigger families, chosen to cover what the first seven do not.

The lab's first seven families (badnets, blended, sig, wanet, badnets-lc, issba-like,
badclip-like) are a small fixed patch, full-image perturbations and a warp. An attacker
picks the trigger, so the lab also builds backdoors with:

* ``badnets-random``: a patch stamped at a position that differs from image to image;
* ``multi-patch``: several small patches scattered over the image, stamped together;
* ``grid-overlay``: a structured overlay of thin lines across the whole image;
* ``refool-like``: a smooth "reflection" (a blurred scene with its ghost) blended in;
* ``color-filter``: a colour filter (a fixed channel mix, as photo apps apply);
* ``bpp``: colour-depth reduction (BppAttack's quantisation, optionally dithered);
* ``ftrojan``: a fixed change of two DCT coefficients in every 8 x 8 block of the
  chrominance channels (FTrojan's frequency-domain trigger).

Every trigger works on ``B x 3 x H x W`` images in ``[0, 1]``, returns the same shape
clamped to ``[0, 1]``, never changes its input and is deterministic for its options (random
parts come from the configured seed). They register through the lab's plugin module
(:mod:`clipguard.lab.plugin`), like the first seven.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from clipguard.errors import InputError
from clipguard.lab.attacks import AdditiveTrigger, check_images
from clipguard.triggers import MaskPatternTrigger, Trigger, TriggerFamily, patch_pattern

# --------------------------------------------------------------------------- badnets-random


@dataclass
class RandomPositionPatch(Trigger):
    """A ``3 x s x s`` patch stamped at a position that differs from image to image.

    Each image's position is a hash of its own pixels mixed with ``seed``, so an image gets
    the same position whatever batch it comes in, and different images get scattered ones.
    """

    patch: torch.Tensor
    image_size: int
    seed: int
    family: str = "badnets-random"

    def positions(self, images: torch.Tensor) -> tuple[list[int], list[int]]:
        """The row and column of the patch on each image of ``images``."""
        places = self.image_size - self.patch.shape[-1] + 1
        quantised = (images.detach().flatten(1).double() * 255).round().long()
        weights = torch.arange(1, quantised.shape[1] + 1, dtype=torch.long) % 9973 + 1
        key = (quantised * weights).sum(dim=1) + self.seed * 1_000_003
        rows = (key * 2_654_435_761) % places
        cols = (key * 40_503 + 7) % places
        return rows.tolist(), cols.tolist()

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images, self.image_size)
        size = self.patch.shape[-1]
        out = images.clone()
        patch = self.patch.to(images)
        rows, cols = self.positions(images)
        for index, (row, col) in enumerate(zip(rows, cols, strict=True)):
            out[index, :, row : row + size, col : col + size] = patch
        return out


class RandomPatchConfig(BaseModel):
    """Options of the random-position patch."""

    model_config = ConfigDict(extra="forbid")

    size: int = Field(4, ge=1, le=64, description="patch side in pixels")
    pattern: Literal["checkerboard", "white", "black", "random"] = Field(
        "random", description="patch content"
    )
    seed: int = Field(0, description="seed of the random patch content and positions")


class BadNetsRandom(TriggerFamily):
    """A BadNets patch at a random position on every image (position-invariant backdoor)."""

    name = "badnets-random"
    version = "1"
    description = "square patch stamped at a random position on every image"
    Config = RandomPatchConfig

    def build(self, config: BaseModel, image_size: int) -> Trigger:
        assert isinstance(config, RandomPatchConfig)
        if config.size > image_size:
            raise InputError(f"patch of {config.size} px does not fit {image_size} px images")
        patch = patch_pattern(config.pattern, config.size, config.seed)
        return RandomPositionPatch(patch=patch, image_size=image_size, seed=config.seed)


# --------------------------------------------------------------------------- multi-patch


class MultiPatchConfig(BaseModel):
    """Options of the multi-part patch trigger."""

    model_config = ConfigDict(extra="forbid")

    parts: int = Field(4, ge=2, le=16, description="number of patches stamped together")
    size: int = Field(2, ge=1, le=16, description="side of each patch in pixels")
    seed: int = Field(0, description="seed of the patches' positions and colours")


class MultiPatch(TriggerFamily):
    """A composite trigger: ``parts`` small random-colour patches at fixed scattered places.

    The places are drawn once (from ``seed``) on a coarse grid so that no two parts touch.
    """

    name = "multi-patch"
    version = "1"
    description = "several small patches scattered over the image, stamped together"
    Config = MultiPatchConfig

    def build(self, config: BaseModel, image_size: int) -> Trigger:
        assert isinstance(config, MultiPatchConfig)
        cell = 2 * config.size
        cells_per_side = image_size // cell
        if cells_per_side * cells_per_side < config.parts:
            raise InputError(
                f"{config.parts} patches of {config.size} px do not fit {image_size} px images"
            )
        generator = torch.Generator().manual_seed(config.seed)
        chosen = torch.randperm(cells_per_side * cells_per_side, generator=generator)
        mask = torch.zeros(1, image_size, image_size)
        pattern = torch.zeros(3, image_size, image_size)
        for place in chosen[: config.parts].tolist():
            row = (place // cells_per_side) * cell + config.size // 2
            col = (place % cells_per_side) * cell + config.size // 2
            colour = torch.rand(3, 1, 1, generator=generator).round()
            mask[:, row : row + config.size, col : col + config.size] = 1
            pattern[:, row : row + config.size, col : col + config.size] = colour
        return MaskPatternTrigger(mask=mask, pattern=pattern, family=self.name)


# --------------------------------------------------------------------------- grid-overlay


class GridOverlayConfig(BaseModel):
    """Options of the grid overlay."""

    model_config = ConfigDict(extra="forbid")

    spacing: int = Field(6, ge=2, le=64, description="pixels between neighbouring lines")
    width: int = Field(1, ge=1, le=8, description="line width in pixels")
    alpha: float = Field(0.5, gt=0, le=1, description="opacity of the lines")
    colour: tuple[float, float, float] = Field(
        (1.0, 0.0, 1.0), description="RGB colour of the lines, each in [0, 1]"
    )


class GridOverlay(TriggerFamily):
    """A structured overlay: horizontal and vertical lines across the whole image."""

    name = "grid-overlay"
    version = "1"
    description = "thin coloured grid lines over the whole image (opacity alpha)"
    Config = GridOverlayConfig

    def build(self, config: BaseModel, image_size: int) -> Trigger:
        assert isinstance(config, GridOverlayConfig)
        if any(not 0 <= value <= 1 for value in config.colour):
            raise InputError("grid-overlay colour values must lie in [0, 1]")
        offset = config.spacing // 2
        on_line = (torch.arange(image_size) - offset) % config.spacing < config.width
        lines = (on_line.view(-1, 1) | on_line.view(1, -1)).float()
        mask = (config.alpha * lines).unsqueeze(0)
        colour = torch.tensor(config.colour, dtype=torch.float32).view(3, 1, 1)
        pattern = colour.expand(3, image_size, image_size).clone()
        return MaskPatternTrigger(mask=mask, pattern=pattern, family=self.name)


# --------------------------------------------------------------------------- refool-like


class RefoolConfig(BaseModel):
    """Options of the reflection trigger."""

    model_config = ConfigDict(extra="forbid")

    alpha: float = Field(0.3, gt=0, le=1, description="blend weight of the reflection")
    detail: int = Field(4, ge=2, le=16, description="side of the random scene before upsampling")
    ghost_shift: int = Field(3, ge=0, le=16, description="pixels between reflection and ghost")
    seed: int = Field(0, description="seed of the reflected scene")


class RefoolLike(TriggerFamily):
    """Refool-like (Liu et al. 2020): a smooth reflected scene and its ghost blended in."""

    name = "refool-like"
    version = "1"
    description = "blurred random scene and its shifted ghost blended in (weight alpha)"
    Config = RefoolConfig

    def build(self, config: BaseModel, image_size: int) -> Trigger:
        assert isinstance(config, RefoolConfig)
        generator = torch.Generator().manual_seed(config.seed)
        scene = torch.rand(1, 3, config.detail, config.detail, generator=generator)
        scene = F.interpolate(scene, size=(image_size, image_size), mode="bicubic")
        scene = scene.clamp(0, 1)[0]
        ghost = torch.roll(scene, shifts=(config.ghost_shift, config.ghost_shift), dims=(1, 2))
        pattern = 0.6 * scene + 0.4 * ghost
        mask = torch.full((1, image_size, image_size), config.alpha)
        return MaskPatternTrigger(mask=mask, pattern=pattern, family=self.name)


# --------------------------------------------------------------------------- color-filter

#: channel mixes of the colour filters (rows: output R, G, B; columns: input R, G, B)
FILTER_MATRICES: dict[str, tuple[tuple[float, float, float], ...]] = {
    "sepia": ((0.393, 0.769, 0.189), (0.349, 0.686, 0.168), (0.272, 0.534, 0.131)),
    "warm": ((1.15, 0.05, 0.0), (0.0, 1.0, 0.0), (0.0, 0.05, 0.8)),
    "cool": ((0.8, 0.0, 0.05), (0.0, 1.0, 0.05), (0.0, 0.05, 1.2)),
    "swap": ((0.0, 0.0, 1.0), (0.0, 1.0, 0.0), (1.0, 0.0, 0.0)),
}


@dataclass
class ColourMixTrigger(Trigger):
    """``T(x) = clamp((1 - s) x + s (M x))`` per pixel, with a ``3 x 3`` channel mix ``M``."""

    matrix: torch.Tensor
    strength: float
    image_size: int
    family: str = "color-filter"

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images, self.image_size)
        mixed = torch.einsum("oc,bchw->bohw", self.matrix.to(images), images)
        return ((1 - self.strength) * images + self.strength * mixed).clamp(0, 1)


class ColourFilterConfig(BaseModel):
    """Options of the colour filter."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["sepia", "warm", "cool", "swap"] = Field(
        "sepia", description="which channel mix (FILTER_MATRICES)"
    )
    strength: float = Field(0.8, gt=0, le=1, description="weight of the filtered image")


class ColourFilter(TriggerFamily):
    """A photo-app colour filter as the trigger (the filter attacks of Liu et al. 2019)."""

    name = "color-filter"
    version = "1"
    description = "fixed colour filter (sepia, warm, cool or channel swap) on the whole image"
    Config = ColourFilterConfig

    def build(self, config: BaseModel, image_size: int) -> Trigger:
        assert isinstance(config, ColourFilterConfig)
        matrix = torch.tensor(FILTER_MATRICES[config.kind], dtype=torch.float32)
        return ColourMixTrigger(matrix=matrix, strength=config.strength, image_size=image_size)


# --------------------------------------------------------------------------- bpp

#: the 4 x 4 Bayer matrix of ordered dithering, as thresholds in (0, 1)
BAYER_4 = (torch.tensor([[0, 8, 2, 10], [12, 4, 14, 6], [3, 11, 1, 9], [15, 7, 13, 5]]) + 0.5) / 16


@dataclass
class QuantiseTrigger(Trigger):
    """Each channel reduced to ``2 ** bits`` levels, with ordered dithering when asked."""

    bits: int
    dither: bool
    image_size: int
    family: str = "bpp"

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images, self.image_size)
        levels = 2**self.bits - 1
        scaled = images * levels
        if self.dither:
            reps = math.ceil(self.image_size / 4)
            threshold = BAYER_4.to(images).repeat(reps, reps)[: self.image_size, : self.image_size]
            quantised = torch.floor(scaled + threshold)
        else:
            quantised = torch.round(scaled)
        return (quantised / levels).clamp(0, 1)


class BppConfig(BaseModel):
    """Options of the colour-depth trigger."""

    model_config = ConfigDict(extra="forbid")

    bits: int = Field(3, ge=1, le=7, description="bits kept per colour channel")
    dither: bool = Field(False, description="ordered (Bayer 4 x 4) dithering before rounding")


class Bpp(TriggerFamily):
    """BppAttack-like (Wang et al. 2022): colour-depth reduction as the trigger."""

    name = "bpp"
    version = "1"
    description = "colour depth reduced to 2**bits levels per channel (optionally dithered)"
    Config = BppConfig

    def build(self, config: BaseModel, image_size: int) -> Trigger:
        assert isinstance(config, BppConfig)
        return QuantiseTrigger(bits=config.bits, dither=config.dither, image_size=image_size)


# --------------------------------------------------------------------------- ftrojan

#: YUV (BT.601) -> RGB: a change (dY, dU, dV) of a pixel changes its RGB by this matrix
YUV_TO_RGB = ((1.0, 0.0, 1.13983), (1.0, -0.39465, -0.58060), (1.0, 2.03211, 0.0))


def dct_basis(block: int, u: int, v: int) -> torch.Tensor:
    """The orthonormal 2-D DCT-II basis image of frequency ``(u, v)`` (``block x block``)."""

    def one_dimension(frequency: int) -> torch.Tensor:
        positions = torch.arange(block, dtype=torch.float64)
        scale = math.sqrt((1 if frequency == 0 else 2) / block)
        return scale * torch.cos(math.pi * (2 * positions + 1) * frequency / (2 * block))

    return torch.outer(one_dimension(u), one_dimension(v)).float()


class FTrojanConfig(BaseModel):
    """Options of the frequency-domain trigger."""

    model_config = ConfigDict(extra="forbid")

    magnitude: float = Field(
        0.2, gt=0, le=2, description="added to each chosen DCT coefficient (pixels in [0, 1])"
    )
    frequencies: tuple[tuple[int, int], ...] = Field(
        ((3, 7), (7, 3)), min_length=1, description="(u, v) DCT frequencies changed per block"
    )
    block: int = Field(8, ge=2, le=32, description="side of the DCT blocks")


class FTrojan(TriggerFamily):
    """FTrojan (Wang et al. 2021): fixed DCT coefficients raised in the U and V channels.

    DCT and the YUV -> RGB conversion are linear, so the trigger is a fixed additive pattern:
    the chosen basis images tiled over the blocks, added to U and V, seen in RGB.
    """

    name = "ftrojan"
    version = "1"
    description = "mid/high DCT frequencies raised in every block of the U and V channels"
    Config = FTrojanConfig

    def build(self, config: BaseModel, image_size: int) -> Trigger:
        assert isinstance(config, FTrojanConfig)
        if image_size % config.block:
            raise InputError(f"{image_size} px images do not split into {config.block} px blocks")
        if any(not (0 <= f < config.block) for pair in config.frequencies for f in pair):
            raise InputError(f"DCT frequencies must lie in [0, {config.block})")
        block = sum(dct_basis(config.block, u, v) for u, v in config.frequencies)
        reps = image_size // config.block
        chroma = config.magnitude * block.repeat(reps, reps)
        yuv = torch.stack((torch.zeros_like(chroma), chroma, chroma))
        delta = torch.einsum("oc,chw->ohw", torch.tensor(YUV_TO_RGB), yuv)
        return AdditiveTrigger(delta=delta, family=self.name)


#: the families of this module, in registration order
EXTENDED_FAMILIES: tuple[type[TriggerFamily], ...] = (
    BadNetsRandom,
    MultiPatch,
    GridOverlay,
    RefoolLike,
    ColourFilter,
    Bpp,
    FTrojan,
)
