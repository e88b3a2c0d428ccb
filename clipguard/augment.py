"""Batched, seeded, differentiable image augmentation in pixel space.

A random resized crop (side fraction in ``[crop_scale, 1]``, random position) with a random
horizontal flip, as one affine warp per image. Deterministic for a ``torch.Generator`` on CPU,
and differentiable with respect to the images (trigger inversion back-propagates through it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_affine(
    batch: int, crop_scale: float, generator: torch.Generator, flip: bool = True
) -> torch.Tensor:
    """``B x 2 x 3`` affine matrices of a random resized crop with a random horizontal flip."""
    side = crop_scale + (1 - crop_scale) * torch.rand(batch, generator=generator)
    room = 1 - side
    shift_x = (torch.rand(batch, generator=generator) * 2 - 1) * room
    shift_y = (torch.rand(batch, generator=generator) * 2 - 1) * room
    sign = torch.ones(batch)
    if flip:
        sign = torch.where(torch.rand(batch, generator=generator) < 0.5, -1.0, 1.0)
    theta = torch.zeros(batch, 2, 3)
    theta[:, 0, 0] = side * sign
    theta[:, 0, 2] = shift_x
    theta[:, 1, 1] = side
    theta[:, 1, 2] = shift_y
    return theta


def apply_affine(images: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Warp ``images`` (``B x C x H x W``) with ``B x 2 x 3`` matrices (bilinear)."""
    grid = F.affine_grid(theta.to(images), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def augment(
    images: torch.Tensor, generator: torch.Generator, crop_scale: float = 0.7, flip: bool = True
) -> torch.Tensor:
    """A random resized crop and flip of each image of the batch."""
    return apply_affine(images, random_affine(images.shape[0], crop_scale, generator, flip))
