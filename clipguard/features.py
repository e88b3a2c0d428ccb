"""Image features in batches, and the feature statistics built on them: one copy each.

Every part of clipguard that encodes a stack of images without gradients (the scanner's
screenings and probes, the purifier's cached views, the oracle probe, the lab's model
cards, the benchmarks) calls :func:`encode_images`; every mean pairwise cosine of a set of
features is :func:`mean_pairwise_cosine`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from clipguard.model import ModelBundle

#: images per forward pass of :func:`encode_images` unless told otherwise
DEFAULT_ENCODE_BATCH = 128


@torch.no_grad()
def encode_images(
    bundle: ModelBundle, pixels: torch.Tensor, batch_size: int = DEFAULT_ENCODE_BATCH
) -> torch.Tensor:
    """Normalised image features (``N x E``) of ``pixels`` (``N x 3 x H x W`` in [0, 1]).

    The images are encoded ``batch_size`` at a time, without gradients; the result is the
    concatenation in input order. An empty stack gives an empty ``0 x E`` tensor only if the
    model can encode an empty batch; callers pass at least one image.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    return torch.cat([bundle.encode_image(chunk) for chunk in pixels.split(batch_size)])


def mean_pairwise_cosine(features: torch.Tensor) -> float:
    """Mean cosine similarity over the distinct pairs of normalised ``features`` (``N x E``).

    1.0 for fewer than two rows: a single point is as collapsed as a set can be, and the
    value stays a finite number that JSON reports and model cards can hold.
    """
    n = features.shape[0]
    if n < 2:
        return 1.0
    gram = features @ features.T
    return float(((gram.sum() - gram.diagonal().sum()) / (n * (n - 1))).item())
